"""The mesh's connections: the link this worker sends on to each peer, the links peers send on
to it, and the listener that admits them (``mesh.py`` has the theory of operation).

- ``OutLink``: one per peer, made on first use; sends the turn's batch through a ``SendQueue``
  and keeps what was forwarded to that peer and not yet taken (``forwarding.Outbox``). The
  owner's ``TAKEN`` rides in the owner's own batch to us when it has one, and otherwise comes
  back on this same connection, which is not watched for input, so it never wakes this worker:
  it is read when convenient (``read_acks``), and all of it before the link's kept pushes are
  sent again (``close``).
- ``InLink``: a peer's connection to this worker, read to the end of the peer's batch per turn;
  a ``TAKEN`` for the pushes it brought that rides in nothing else goes back on it
  (``acknowledge``).
- ``MeshListener``: accepts links from processes of this node only (``peercred.py``).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Sequence

from rawsse.node import peercred
from rawsse.apns.routing import QUEUE_FULL, UNREACHABLE, push_answer
from rawsse.node.forwarding import Outbox, frame_push
from rawsse.node.sendqueue import SendQueue
from rawsse.node.wire import (
    ANCILLARY_SIZE, HEADER, SENDER, TAKEN, TRUNCATED, address, decoder, iter_records,
    pack_messages, received_fds,
)
from rawsse.server.loop import EPOLLERR, EPOLLHUP, EPOLLOUT, EPOLLRDHUP, READ_EVENTS

if TYPE_CHECKING:
    from rawsse.node.mesh import Mesh

log = logging.getLogger("rawsse.node.mesh")

_decode_taken = decoder(TAKEN)
# A message on the way back holds one TAKEN record: the sender index, the header, the body.
_TAKEN_MESSAGE = struct.Struct(SENDER.format + HEADER.format.lstrip("!") + "QIII")
_pack_taken_message = _TAKEN_MESSAGE.pack  # (sender, TAKEN, _TAKEN_BODY, the body's fields)
_TAKEN_BODY = _TAKEN_MESSAGE.size - SENDER.size - HEADER.size

# An outbound link is watched for its end and for room to write, not for input: what comes back
# on it is the owner's TAKEN, read when convenient (``OutLink.read_acks``).
LINK_EVENTS = EPOLLRDHUP
TAKEN_MESSAGE = 256  # a TAKEN message is 27 bytes
# _RESET: a peer that dies with messages it never read makes our next recv fail once with
# ECONNRESET, before the messages it had sent us (Linux: unix_release_sock sets the error,
# __skb_try_recv_datagram reports it first). Those messages still count (a forwarded push
# answered 200, a TAKEN): read on to the end of the link.

# What one peer's link may bring in one loop turn: 64 messages, or ~4 full ones by bytes (a
# burst of REPLYs to /metrics is a render each; ~1,000 forwarded pushes fit in it).
RECEIVE_MESSAGES = 64
RECEIVE_BYTES = 256 * 1024
UNTIL_EMPTY = 1 << 62  # acks_due meaning "read what is there, to EAGAIN or the end"
# Bytes a peer has not taken yet, at most (``Mesh``'s back-pressure: over it, a 503).
MAX_QUEUED = 8 * 1024 * 1024


class OutLink:
    """The connection this worker sends on to one peer, with what the kernel has not taken
    and the pushes forwarded to that peer that it has not taken yet (``outbox``)."""

    __slots__ = ("mesh", "peer", "sock", "fd", "out", "events", "outbox", "acks_due")

    def __init__(self, mesh: "Mesh", peer: int) -> None:
        self.mesh = mesh
        self.peer = peer
        self.sock: socket.socket | None = None
        self.fd = -1
        self.out: SendQueue | None = None
        self.events = 0
        self.outbox = Outbox(mesh.stats)
        self.acks_due = 0  # messages of pushes sent whose TAKEN was not read (at most: see read_acks)

    @property
    def queued(self) -> int:
        """Bytes the peer has not taken yet."""
        return self.out.queued if self.out is not None else 0

    def connect(self) -> bool:
        """Link up now if the peer listens. A refused connect is not remembered: a peer is
        reachable the moment it listens, which it does before it tells the master it is ready.
        (A 100 ms retry pause here once answered 503 to pushes for a respawned worker that the
        master already counted as up.) A refused connect to an abstract unix name costs ~17 us,
        paid only while a peer is down, by requests that would otherwise get 503 anyway."""
        if self.sock is not None:
            return True
        loop = self.mesh.worker.loop
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(address(self.mesh.node, self.peer))
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self.sock, self.fd, self.out = sock, sock.fileno(), SendQueue(sock)
        self.events = LINK_EVENTS
        loop.add(self.fd, self, LINK_EVENTS)
        if self.outbox.kept:  # promised to the peer's predecessor, never taken: first in line
            resent = self.outbox.resend()
            log.warning("sending %d forwarded pushes again to worker %d (its link broke "
                        "before it took them)", len(resent), self.peer)
            messages = pack_messages(self.mesh.index, resent)
            self.acks_due += len(messages)
            for message, fds in messages:
                self.out.push(message, fds)
            self.flush()
        return self.sock is not None

    def out_of_credit(self, token: bytes, frame: bytes, expires: float, received: float,
                      delay: float, answer: Any, request: Any, apns_id: bytes) -> bool:
        """``Mesh.submit_plain``'s rarer half: the link is down or full, or the credit does not
        cover the push (a new link, a full owner, Redis mode). True when, connected and the
        TAKENs read, the credit covers it now (``Mesh.submit_plain`` promises it); else it is
        answered, or sent asked (answered by its owner's ACK), and False. ``answer``,
        ``request``, ``apns_id``: as in ``forwarding.Forwarded``."""
        mesh = self.mesh
        out = self.out
        if out is None:
            out = self.out if self.connect() else None
            if out is None:
                push_answer(answer, request, apns_id)(UNREACHABLE)
                return False
        if out.queued >= MAX_QUEUED:
            push_answer(answer, request, apns_id)(QUEUE_FULL)
            return False
        outbox = self.outbox
        size = len(frame)
        if outbox.credit <= 0 or size > outbox.credit_bytes:
            self.read_acks()  # the owner's TAKENs may have brought more meanwhile
            if self.out is None:  # and the owner's end with them
                push_answer(answer, request, apns_id)(UNREACHABLE)
                return False
        if outbox.credit > 0 and size <= outbox.credit_bytes:
            return True
        mesh._next_seq = seq = mesh._next_seq + 1
        rid = mesh.expect(self.peer, push_answer(answer, request, apns_id), UNREACHABLE)
        outbox.staged_pushes = True
        mesh.send_record(self.peer, frame_push(rid, seq, expires, received, delay, token, frame))
        return False

    def send(self, messages: list[tuple[bytes, list[int]]]) -> None:
        """Queue this turn's messages behind any still waiting, and send what the kernel takes."""
        out = self.out
        if out is None:  # the link died after these were queued: the waiting requests already
            close_fds(messages)  # failed; the hand-offs' devices reconnect
            return
        if len(messages) == 1 and not out.messages and not messages[0][1]:
            # The usual turn: one message, no fds, nothing waiting: sent here, no queue calls.
            try:
                self.sock.send(messages[0][0])  # type: ignore[union-attr]
            except BlockingIOError:
                pass  # queued below, sent once writable
            except OSError:
                out.push(*messages[0])
                self.close("send failed")
                return
            else:
                if self.outbox.unsent:
                    self.outbox.sent()
                return
        for message, fds in messages:
            out.push(message, fds)
        self.flush()

    def send_fd_now(self, body: bytes, fd: int) -> bool:
        """One record carrying ``fd``, sent at once, outside the turn's batch. True once the
        kernel took it (the peer's queue holds the fd: close this copy); False when it cannot
        leave now (the peer does not listen, older messages wait for its socket, or it is
        full), and then nothing was sent and the fd is still only the caller's."""
        if not self.connect() or self.out is None or not self.out.drained:
            return False
        message = pack_messages(self.mesh.index, [(body, fd)])[0][0]
        try:
            self.out.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [fd]))])
        except BlockingIOError:
            return False
        except OSError:
            self.close("send failed")
            return False
        return True

    def flush(self) -> None:
        if self.out is None:
            return
        try:
            drained = self.out.flush()
        except OSError:
            self.close("send failed")
            return
        self._want_write(not drained)
        if drained and self.outbox.unsent:
            self.outbox.sent()

    def _want_write(self, on: bool) -> None:
        events = LINK_EVENTS | (EPOLLOUT if on else 0)
        if self.fd >= 0 and events != self.events:
            self.events = events
            self.mesh.worker.loop.modify(self.fd, events)

    def handle_events(self, events: int) -> None:
        if events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP):
            self.close("peer closed")
        elif events & EPOLLOUT:
            self.flush()

    def read_acks(self) -> None:
        """Take the owner's ``TAKEN`` messages that came back on this connection. It is not
        watched for input (``LINK_EVENTS``), so an acknowledgement never wakes this worker; and
        a TAKEN only releases pushes kept here and brings credit (their answers left when the
        kernel took their message), so the mesh reads them only when its credit runs low, when
        it is out of credit, or on its tick (``Mesh``)."""
        if self.sock is not None and self.acks_due > 0 and not self._take_acks():
            self.close("peer closed")

    def read_all_acks(self) -> None:
        """Take every TAKEN waiting on this connection, however many were counted."""
        if self.sock is not None:
            due, self.acks_due = self.acks_due, UNTIL_EMPTY
            ended = not self._take_acks()
            self.acks_due = max(0, due - (UNTIL_EMPTY - self.acks_due))  # less what was read
            if ended:
                self.close("peer closed")

    def taken(self, upto: int, pushes: int, size: int, messages: int) -> None:
        """One TAKEN from the owner, from this connection or riding in the owner's own batch
        to this worker (``Mesh.receive``); ``messages``: how many of ours it answers."""
        self.acks_due = max(0, self.acks_due - messages)
        if self.sock is not None:
            self.outbox.taken(upto, pushes, size)
        else:  # for a link that ended: what it holds, yes; credit, no (it died with the link)
            self.outbox.taken(upto, 0, 0)

    def _take_acks(self) -> bool:
        """Read TAKENs while ``acks_due`` messages of pushes are unanswered (each TAKEN says
        how many it answers, so the usual case costs no recv that returns EAGAIN), summed and
        given to the outbox once (``taken``, written out: they are read ~190 at a time). False
        when the link ended."""
        recv = self.sock.recv  # type: ignore[union-attr]
        unpack, size = _TAKEN_MESSAGE.unpack, _TAKEN_MESSAGE.size
        upto = pushes = granted = 0
        ended = False
        while self.acks_due > 0:
            try:
                data = recv(TAKEN_MESSAGE)
            except BlockingIOError:  # the rest rides with the owner's batch, or comes later
                break
            except ConnectionResetError:  # see _RESET
                continue
            except OSError:
                ended = True
                break
            if not data:
                ended = True
                break
            if len(data) == size:  # the one record an owner sends back here
                _, kind, _, seq, more, more_bytes, messages = unpack(data)
                if kind == TAKEN:
                    due = self.acks_due - messages
                    self.acks_due = due if due > 0 else 0
                    upto, pushes, granted = seq, pushes + more, granted + more_bytes
                continue
            for kind, body in iter_records(data):
                if kind == TAKEN:
                    self.taken(*_decode_taken(body))
        if upto:  # cumulative: the last one read covers every push the others did
            self.outbox.taken(upto, pushes, granted)
        return not ended

    def close(self, why: str = "") -> None:
        if self.sock is None or self.out is None:
            return
        # debug: a rolling restart loses every link to each replaced worker (once 130 lines
        # per HUP); what an operator acts on is logged by the master.
        log.debug("link to worker %d lost (%s)", self.peer, why)
        # Every TAKEN the owner sent before its end, here or riding in its own messages to us:
        # a push it took must not be sent again to its replacement.
        self.acks_due = UNTIL_EMPTY
        self._take_acks()
        self.mesh.read_links_from(self.peer)
        self.acks_due = 0
        self.mesh.worker.loop.remove(self.fd)
        self.sock.close()
        close_fds(self.out.close())  # streams that never reached their owner: devices reconnect
        self.sock, self.fd, self.out = None, -1, None
        self.outbox.lost()
        self.mesh.link_lost(self.peer)


def close_fds(messages: Sequence[tuple[bytes, Sequence[int]]]) -> None:
    for _message, fds in messages:
        for fd in fds:
            os.close(fd)


class InLink:
    """A peer's connection to us: reads its messages."""

    __slots__ = ("mesh", "sock", "fd", "peer", "backlog")

    def __init__(self, mesh: "Mesh", sock: socket.socket) -> None:
        self.mesh = mesh
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = -1  # known from its first message
        # a TAKEN the socket did not take: (upto, pushes, bytes, messages)
        self.backlog: tuple[int, int, int, int] | None = None

    def acknowledge(self, upto: int, pushes: int, size: int, messages: int) -> None:
        """Send ``TAKEN`` back on this connection, now (``forwarding.py``): the turn's TAKEN
        for a peer this worker sends nothing else to. The peer reads it when convenient
        (``OutLink.read_acks``); if it left a socket buffer's worth unread (278 TAKEN-sized
        messages with the default 208 KiB net.core.wmem_default, measured by sending 23-byte
        messages on a connected pair until EAGAIN; net.unix.max_dgram_qlen does not bound a
        connected pair), the newest waits here, merged, for the next one."""
        if self.fd < 0:
            return  # the sender's link ended: its credit is void, it sends its pushes again
        if self.backlog is not None:
            _, old_pushes, old_size, old_messages = self.backlog
            pushes, size, messages = pushes + old_pushes, size + old_size, messages + old_messages
        try:
            self.sock.send(_pack_taken_message(self.mesh.index, TAKEN, _TAKEN_BODY, upto, pushes,
                                               size, messages))
        except BlockingIOError:
            self.backlog = (upto, pushes, size, messages)
        except OSError:
            pass  # the peer is gone: its end of the link reports it
        else:
            self.backlog = None

    def handle_events(self, events: int, messages: int = RECEIVE_MESSAGES,
                      budget: int = RECEIVE_BYTES, batch: bool = True) -> None:
        """Read up to ``messages`` messages or ``budget`` bytes, and stop after the last
        message of a batch if ``batch`` (else at EAGAIN or the end of the link: ``read_all``).

        One recvmsg is one message (SOCK_SEQPACKET); read to the end of the peer's batch, at
        most RECEIVE_MESSAGES or RECEIVE_BYTES per turn, so one busy peer cannot starve the
        others nor the worker's timers (its heartbeat: issue 12). What is left waits in the
        kernel and level-triggered epoll brings us back next turn. Linux has no flag on a
        received message saying another one waits; the sender's MORE bit says whether its
        batch goes on, which spares the recvmsg that would only return EAGAIN. (The loop's
        handler itself, not a call to a reader: this runs once per wakeup for the mesh.)"""
        # Into the mesh's one buffer, then copied: ``recvmsg`` would allocate RECV_SIZE per
        # message, an mmap, mremap and munmap each time under glibc's default threshold
        # (strace -f of bench/mesh_probe.py).
        recvmsg_into, buffers, view = self.sock.recvmsg_into, self.mesh.receive_buffers, \
            self.mesh.receive_view
        receive = self.mesh.receive
        for _ in range(messages):
            if budget <= 0:
                return
            try:
                size, ancdata, flags, _addr = recvmsg_into(buffers, ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except ConnectionResetError:  # see _RESET
                continue
            except OSError:
                self.close()
                return
            if not size:
                self.close()
                return
            data = view[:size].tobytes()
            fds = received_fds(ancdata) if ancdata else []
            if flags & TRUNCATED:
                log.error("mesh message truncated (flags %#x): %d fds lost", flags, len(fds))
                self.mesh.worker.stats.disconnect("error")
            budget -= size
            self.peer = receive(data, fds, self)
            if batch and data[0] < 0x80:  # not wire.MORE: the last message of its batch
                return

    def read_all(self) -> None:
        """Read everything the peer sent us, to EAGAIN or the end of the link."""
        self.handle_events(0, 1 << 30, 1 << 62, False)

    def close(self, reason: str = "") -> None:
        if self.fd >= 0:
            self.mesh.worker.loop.remove(self.fd)
            self.sock.close()
            self.fd = -1
            self.mesh.inbound_closed(self)


class MeshListener:
    __slots__ = ("mesh", "sock", "fd")

    def __init__(self, mesh: "Mesh", sock: socket.socket) -> None:
        self.mesh, self.sock, self.fd = mesh, sock, sock.fileno()

    def handle_events(self, events: int) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("mesh accept failed: %s", exc)
                return
            if not peercred.admit(sock, self.mesh.node):  # only this node's processes
                continue
            sock.setblocking(False)
            link = InLink(self.mesh, sock)
            self.mesh.inbound.add(link)
            self.mesh.worker.loop.add(link.fd, link, READ_EVENTS)

    def close(self, reason: str = "") -> None:
        self.mesh.worker.loop.remove(self.fd)
        self.sock.close()


