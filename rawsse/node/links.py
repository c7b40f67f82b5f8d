"""The mesh's connections: the link this worker sends on to each peer, the links peers send on
to it, and the listener that admits them (``mesh.py`` has the theory of operation).

- ``OutLink``: one per peer, made on first use; sends the turn's batch through a ``SendQueue``
  and keeps what was forwarded to that peer and not yet taken (``forwarding.Outbox``). The
  owner's ``TAKEN`` comes back on this same connection, which is not watched for input, so it
  never wakes this worker: it is read when the worker is awake anyway (``read_acks``).
- ``InLink``: a peer's connection to this worker, read to the end of the peer's batch per turn;
  it sends the ``TAKEN`` for the pushes it brought back on itself (``acknowledge``).
- ``MeshListener``: accepts links from processes of this node only (``peercred.py``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Sequence

from rawsse.node import peercred
from rawsse.node.forwarding import Outbox
from rawsse.node.sendqueue import SendQueue
from rawsse.node.wire import (
    ANCILLARY_SIZE, RECV_SIZE, TAKEN, TRUNCATED, address, decoder, encoder, iter_records,
    more_follows, pack_messages, received_fds, record,
)
from rawsse.server.loop import EPOLLERR, EPOLLHUP, EPOLLOUT, EPOLLRDHUP, READ_EVENTS

if TYPE_CHECKING:
    from rawsse.node.mesh import Mesh

log = logging.getLogger("rawsse.node.mesh")

_encode_taken, _decode_taken = encoder(TAKEN), decoder(TAKEN)

# An outbound link is watched for its end and for room to write, not for input: what comes back
# on it is the owner's TAKEN, read when convenient (``OutLink.read_acks``).
LINK_EVENTS = EPOLLRDHUP
TAKEN_MESSAGE = 256  # a TAKEN message is 23 bytes
# _RESET: a peer that dies with messages it never read makes our next recv fail once with
# ECONNRESET, before the messages it had sent us (Linux: unix_release_sock sets the error,
# __skb_try_recv_datagram reports it first). Those messages still count (a forwarded push
# answered 200, a TAKEN): read on to the end of the link.

# What one peer's link may bring in one loop turn: 64 messages, or ~4 full ones by bytes (a
# burst of REPLYs to /metrics is a render each; ~1,000 forwarded pushes fit in it).
RECEIVE_MESSAGES = 64
RECEIVE_BYTES = 256 * 1024


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
        self.outbox = Outbox()
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
            for message, fds in pack_messages(self.mesh.index, resent):
                self.out.push(message, fds)
            self.flush()
        return self.sock is not None

    def send(self, messages: list[tuple[bytes, list[int]]]) -> None:
        """Queue this turn's messages behind any still waiting, and send what the kernel takes."""
        out = self.out
        if out is None:  # the link died after these were queued: the waiting requests already
            close_fds(messages)  # failed; the hand-offs' devices reconnect
            return
        for message, fds in messages:
            out.push(message, fds)
        self.flush()

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
        """Take the owner's ``TAKEN`` messages. They come back on this connection, which is not
        watched for input (``LINK_EVENTS``): reading them when this worker is awake anyway (its
        mesh flush, a push out of credit, its tick) spares it a wakeup per forwarded push."""
        if self.sock is not None and self.acks_due > 0 and not self._take_acks():
            self.close("peer closed")

    def _take_acks(self) -> bool:
        """Read up to ``acks_due`` TAKENs (one comes per message of pushes, so the usual case
        costs no recv that returns EAGAIN; an owner that sends none, in Redis mode, costs one
        per flush). False when the link ended."""
        recv, taken = self.sock.recv, self.outbox.taken  # type: ignore[union-attr]
        while self.acks_due > 0:
            try:
                data = recv(TAKEN_MESSAGE)
            except BlockingIOError:
                self.acks_due = 0  # what comes later is read at the next flush or tick
                return True
            except ConnectionResetError:  # see _RESET
                continue
            except OSError:
                return False
            if not data:
                return False
            self.acks_due -= 1
            for kind, body in iter_records(data):
                if kind == TAKEN:
                    taken(*_decode_taken(body))
        return True

    def close(self, why: str = "") -> None:
        if self.sock is None or self.out is None:
            return
        # debug: a rolling restart loses every link to each replaced worker (once 130 lines
        # per HUP); what an operator acts on is logged by the master.
        log.debug("link to worker %d lost (%s)", self.peer, why)
        self.acks_due = RECEIVE_MESSAGES * 4  # every TAKEN the owner sent before its end: a
        self._take_acks()  # push it took must not be sent again to its replacement
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
        self.backlog: tuple[int, int, int] | None = None  # a TAKEN the socket did not take

    def acknowledge(self, upto: int, pushes: int, size: int) -> None:
        """Send ``TAKEN`` back on this connection, now (``forwarding.py``). The peer reads it
        when it is awake anyway; if it left a socket buffer's worth unread (278 TAKEN-sized
        messages with the default 208 KiB net.core.wmem_default, measured by sending 23-byte
        messages on a connected pair until EAGAIN; net.unix.max_dgram_qlen does not bound a
        connected pair), the newest waits here, merged, for the next one."""
        if self.backlog is not None:
            _, old_pushes, old_size = self.backlog
            pushes, size = pushes + old_pushes, size + old_size
        try:
            self.sock.send(self.mesh.taken_prefix + record(TAKEN, _encode_taken(upto, pushes, size)))
        except BlockingIOError:
            self.backlog = (upto, pushes, size)
        except OSError:
            pass  # the peer is gone: its end of the link reports it
        else:
            self.backlog = None

    def handle_events(self, events: int) -> None:
        # One recvmsg is one message (SOCK_SEQPACKET); read to the end of the peer's batch, at
        # most RECEIVE_MESSAGES or RECEIVE_BYTES per turn, so one busy peer cannot starve the
        # others nor the worker's timers (its heartbeat: issue 12). What is left waits in the
        # kernel and level-triggered epoll brings us back next turn. Linux has no flag on a
        # received message saying another one waits; the sender's MORE bit says whether its
        # batch goes on, which spares the recvmsg that would only return EAGAIN.
        recvmsg = self.sock.recvmsg
        budget = RECEIVE_BYTES
        for _ in range(RECEIVE_MESSAGES):
            if budget <= 0:
                return
            try:
                data, ancdata, flags, _addr = recvmsg(RECV_SIZE, ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except ConnectionResetError:  # see _RESET
                continue
            except OSError:
                self.close()
                return
            if not data:
                self.close()
                return
            fds = received_fds(ancdata) if ancdata else []
            if flags & TRUNCATED:
                log.error("mesh message truncated (flags %#x): %d fds lost", flags, len(fds))
                self.mesh.worker.stats.disconnect("error")
            budget -= len(data)
            self.peer = self.mesh.receive(data, fds, self)
            if not more_follows(data):
                return

    def close(self, reason: str = "") -> None:
        if self.fd >= 0:
            self.mesh.worker.loop.remove(self.fd)
            self.sock.close()
            self.fd = -1
            self.mesh.sender_gone(self.peer)


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
            self.mesh.worker.loop.add(link.fd, link, READ_EVENTS)

    def close(self, reason: str = "") -> None:
        self.mesh.worker.loop.remove(self.fd)
        self.sock.close()


