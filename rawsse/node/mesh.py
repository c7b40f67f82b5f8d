"""Routing between the workers of one node: token shards, batched messages, stream hand-off.

Theory of operation
-------------------
Each worker owns a hash shard of tokens (``routing.owner_of``: CRC-32 of the raw token, modulo the
worker count). The kernel's SO_REUSEPORT hash decides which worker accepts a connection, so a
push or a device can land anywhere; the mesh moves it to the owner:

- a device's socket is handed to the owner with ``SCM_RIGHTS`` once its ``GET /events`` is
  parsed (``HANDOFF``); the owner writes the head and any pending push, so every stream of a
  token lives in exactly one process and "newest wins" stays a local decision;
- a push is one call, ``submit_plain``, whatever its token (the routes' one call for every
  push): its owner is computed there, once. One for this worker's own shard goes to its
  owner's ``take_plain`` at once, no ``Push`` made (written to the live stream, else kept in
  this worker's queues), and the routes answer what it returns; any other is forwarded to the
  owner (``PUSH``), with no ``Push`` or callback made either. Within the credit the owner
  granted, the receiving worker answers 200 as soon as the kernel took the message carrying
  it, and keeps the push until the owner's cumulative acknowledgement (``TAKEN``) covers it; a
  broken link sends what is kept again to the owner's replacement. Without credit it waits for
  the owner's ``ACK``. The owner takes what it receives with the same ``take_plain``. Either
  way a 200 means the push is held by its owner or in the owner's socket queue (it survives a
  ``kill -9`` of the worker that took the request); a full owner queue is a 503 before any
  200, never a drop after one; an owner's crash loses what it held, no more (``forwarding.py``
  has the protocol);
- a push sender's connection may move, after its first read, to the worker holding the fewest
  (``CONNECTION``, ``balance.py``): sent at once (``send_now``), so it either left with the
  kernel's word or stays, never waiting in a queue that could close it;
- a broadcast goes once to each worker (``BCAST``), which writes its own streams and replies with
  how many took it and how many refused it (``BCAST_DONE``), after the pushes answered before it
  (``peer_requests.py``); ``/stats`` asks each worker once (``STATS``/``REPLY``); admin
  commands are applied everywhere (``ADMIN``).

Links: every worker listens on an abstract-namespace ``SOCK_SEQPACKET`` socket named after the
master's pid and its index, and connects to a peer the first time it has something to send
(an outbound link per direction, ``2 × (N−1)`` fds per worker). A respawned worker binds the same
name; its peers notice the old link close and reconnect on their next send. Any local process
can see and connect to an abstract name, so an accepted link whose peer is not a process of this
node (``SO_PEERCRED``: another uid, or not a child of our master) is closed at once
(``peercred.py``).

Batching: records for one peer accumulate during a loop turn and leave as one ``sendmsg`` per
peer per turn (split at ``MAX_MESSAGE`` bytes or ``MAX_FDS`` fds); the framing and the record
codecs are ``wire.py``'s, the ordered queue of what the kernel has not taken ``sendqueue.py``'s.
A reader stops after the last message of a batch (``wire.more_follows``) rather than pay a
``recvmsg`` that returns EAGAIN, and reads into one buffer per worker (``recvmsg`` would allocate
``RECV_SIZE`` per message: an mmap, mremap and munmap each). An owner decodes the pushes of a
message before its other records; their ``TAKEN`` leaves in the turn's flush, inside the batch
for that peer if there is one, and only then are they accepted (``forwarding.py``).
Back-pressure: bytes a peer has not taken yet are bounded (``MAX_QUEUED``); over it, pushes for
that peer are answered 503, never dropped.

Extra peers: in Redis mode the node's Redis agent is one more peer (index = worker count, see
``rawsse/cluster/records.py``). ``add_peer`` links to it and ``handle`` routes its record kinds;
it takes no part in broadcasts, ``/stats`` collection or admin commands, which go to workers only
(it sends ``BCAST`` itself, for a broadcast another node took: ``rawsse/cluster/broadcast.py``).
"""

from __future__ import annotations

import logging
import os
import random
import socket
from functools import partial
from zlib import crc32
from typing import Any, Callable

import orjson

from rawsse.apns.registry import Push
from rawsse.apns.routing import (
    HELD, UNREACHABLE, Accepted, LocalOwner, Owner, PlainSubmit, PushAnswer,
)
from rawsse.node.forwarding import LOW_CREDIT, LOW_CREDIT_BYTES, Decoded, Ledgers, first_sequence
from rawsse.node import peer_requests
from rawsse.node.links import MAX_QUEUED, InLink, MeshListener, OutLink, close_fds
from rawsse.node.wire import (
    ACK, ADMIN, BCAST, BCAST_DONE, CONNECTION, HANDOFF, MAX_MESSAGE, PUSH, PUSH_FIXED, PUSH_HEAD,
    RECV_SIZE, REPLY, SENDER, STATS, TAKEN, address, decode, decoder, encode, encoder, framer,
    iter_records, pack_messages, pushing, read_pushes, record,
)
from rawsse.server.loop import EPOLLIN

log = logging.getLogger(__name__)

# The hot kinds' codecs, bound once (``wire.encode``/``decode`` look the kind up per call).
_encode_ack, _decode_ack = encoder(ACK), decoder(ACK)
_frame_taken, _decode_taken = framer(TAKEN), decoder(TAKEN)
_push_head = PUSH_HEAD.pack
_ALONE_MAX = MAX_MESSAGE - SENDER.size  # a record this long or shorter is a message alone
_ACK_MEANING = {int(a): a for a in Accepted}  # an ACK's value byte -> its Accepted

REQUEST_TIMEOUT = 5.0
# A broadcast reply comes after the peer wrote to every one of its streams: ~18k loopback writes
# per worker took 3-6 s at 300k streams on 2 shared cores (measured with ``python bench/run.py
# --full``), so a 5 s timeout under-counted. The longest --broadcast-worker-wait (and its
# default); a worker that has not answered by then is named in the answer's "missing_workers".
BROADCAST_TIMEOUT = 120.0


class Mesh:
    """This worker's links to its peers and the requests waiting on them."""

    def __init__(self, worker: Any, node: int) -> None:
        self.worker = worker
        self.node = node
        self.index = worker.index
        self.count = worker.count
        self.stats = worker.stats
        # What takes a push for this worker's own shard (``submit_plain``): the owner's
        # ``take_plain``, bound by the ``owner`` setter.
        self.take_own: PlainSubmit = _no_owner
        self.links = {peer: OutLink(self, peer) for peer in range(self.count) if peer != self.index}
        # peer -> records (bytes, fd or -1) queued during this loop turn
        self.batches: dict[int, list[tuple[bytes, int]]] = {}
        self._reply_to = -1  # the peer whose message is being handled
        self.flush_scheduled = False
        # Request ids start at random: a reply sent to a dead worker can reach its replacement
        # (a link rebuilt in between), where it must not match a request of the new process.
        self._next_id = random.getrandbits(32)
        # request id -> (peer, callback, failure value, deadline); a callback gets the reply, or
        # the failure value when the peer is lost or does not answer in REQUEST_TIMEOUT
        self.waiting: dict[int, tuple[int, Callable[[Any], None], Any, float]] = {}
        self.listener: MeshListener | None = None
        # record kind -> handler(body) for kinds this module does not know (the Redis agent's)
        self.handlers: dict[int, Callable[[memoryview], None]] = {}
        self._owner: Owner | None = None
        # Set with a LocalOwner: the senders' credit and numbers (forwarding.py). None for an
        # owner that answers later (Redis mode): every forwarded push is then asked.
        self.ledgers: Ledgers | None = None
        self._next_seq = first_sequence()
        self.message_prefix = SENDER.pack(self.index)  # a message's first bytes (wire.py)
        # The owner's half of this turn (flush): sender -> the TAKEN it is owed, as
        # [link the pushes came on, upto, pushes granted, bytes granted, messages answered];
        # and the pushes taken, accepted once that TAKEN has left: (sender, pushes, count, bytes)
        self.taken_due: dict[int, list[Any]] = {}
        self.taking: list[tuple[int, list[Decoded], int, int]] = []
        self.inbound: set[InLink] = set()  # the peers' links to us
        # broadcasts to write at the end of this turn, after the peers' pushes (peer_requests)
        self.broadcasts_due: list[tuple[bytes, str, Callable[[tuple[int, int] | None], None]]] = []
        self.receive_buffer = bytearray(RECV_SIZE)  # every inbound link reads into it
        self.receive_view = memoryview(self.receive_buffer)
        self.receive_buffers = [self.receive_view]
        self._snapshot: tuple[float, bytes] = (-1.0, b"")  # (loop turn, JSON) for STATS replies
        # What takes a sender's connection handed over by a peer (``balance.py``): fd, bytes read
        self.adopt: Callable[[int, bytes], None] | None = None

    @property
    def owner(self) -> Owner:
        """What this worker does with a push for its own shard (set by the node)."""
        assert self._owner is not None
        return self._owner

    @owner.setter
    def owner(self, owner: Owner) -> None:
        self._owner = owner
        self.take_own = owner.take_plain
        self.ledgers = Ledgers(owner.delivery, self.count) if isinstance(owner, LocalOwner) \
            else None

    def add_peer(self, peer: int) -> None:
        """Link to a peer that is not a worker (the node's Redis agent)."""
        self.links[peer] = OutLink(self, peer)

    def handle(self, kind: int, handler: Callable[[memoryview], None]) -> None:
        """Route records of ``kind`` (one not defined here) to ``handler(body)``."""
        self.handlers[kind] = handler

    def serve(self, kind: int, answer: Callable[[bytes], bytes]) -> None:
        """Answer requests of ``kind`` (a request id, then a payload: ``collect``) with a
        REPLY holding ``answer(payload)``."""
        def handler(body: memoryview) -> None:
            rid, payload = decode(kind, body)
            self._reply(REPLY, encode(REPLY, rid, answer(payload)))

        self.handlers[kind] = handler

    def worker_peers(self) -> list[int]:
        """The other workers that can be reached now."""
        return [peer for peer in self.links if peer < self.count and self.links[peer].connect()]

    def listen(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(address(self.node, self.index))
        sock.listen(128)
        sock.setblocking(False)
        self.listener = MeshListener(self, sock)
        self.worker.loop.add(self.listener.fd, self.listener, EPOLLIN)

    # -- sending ------------------------------------------------------------------------------

    def _new_id(self) -> int:
        """A request id, never 0: on a PUSH, id 0 means promised, no ACK wanted (``wire.py``)."""
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        return self._next_id

    def can_send(self, peer: int) -> bool:
        link = self.links[peer]
        return link.connect() and link.queued < MAX_QUEUED

    def send(self, peer: int, kind: int, body: bytes, fd: int = -1) -> None:
        """Queue one record for ``peer``; it leaves with this turn's batch."""
        self.send_record(peer, record(kind, body), fd)

    def send_record(self, peer: int, framed: bytes, fd: int = -1) -> None:
        """Queue one framed record for ``peer``; it leaves with this turn's batch."""
        batch = self.batches.get(peer)
        if batch is None:
            batch = self.batches[peer] = []
        batch.append((framed, fd))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.worker.loop.call_first(self.flush)  # the answers it gives write this turn

    def flush(self) -> None:
        """One sendmsg per peer per loop turn (split only at the size and fd limits), carrying
        the TAKEN this worker owes that peer for the pushes it sent this turn; then those
        pushes are accepted (``_accept_taken``): a push is written only once its TAKEN left."""
        try:
            while self.batches or self.taken_due or self.taking:
                batches, self.batches = self.batches, {}
                due, self.taken_due = self.taken_due, {}
                for peer, records in batches.items():
                    taken = due.pop(peer, None) if due else None
                    if taken is not None and taken[0].fd < 0:
                        taken = None  # the link it came on ended: its credit is void
                    try:
                        self._send_batch(peer, records, taken)
                    except Exception:
                        log.exception("mesh batch for worker %d failed", peer)
                for taken in due.values():  # nothing else goes to that peer this turn
                    taken[0].acknowledge(taken[1], taken[2], taken[3], taken[4])
                if self.taking:
                    self._accept_taken()  # its ACKs, if any, go in the next round
        finally:
            self.flush_scheduled = False

    def _send_batch(self, peer: int, records: list[tuple[bytes, int]],
                    taken: list[Any] | None) -> None:
        link = self.links[peer]
        outbox = link.outbox
        out = link.out
        # The TAKEN rides in this batch only if nothing waits before it in the send queue:
        # it must be in the kernel before the pushes it answers are written.
        riding = False
        if taken is not None and out is not None and not out.messages:
            riding = True
            records.append((_frame_taken(taken[1], taken[2], taken[3], taken[4]), -1))
        if outbox.kept and (outbox.credit < LOW_CREDIT or outbox.credit_bytes < LOW_CREDIT_BYTES):
            link.read_acks()
        if outbox.staged:  # this turn's promised pushes: answered once their message left
            outbox.unsent += outbox.staged
            outbox.staged = []
        framed, fd = records[0]
        messages: list[tuple[bytes, list[int]]]
        if len(records) == 1 and fd < 0 and len(framed) <= _ALONE_MAX:
            messages = [(self.message_prefix + framed, [])]  # pack_messages' usual, no call
        else:
            messages = pack_messages(self.index, records)
        if outbox.staged_pushes:
            outbox.staged_pushes = False
            if self.ledgers is not None:  # in Redis mode owners answer ACKs, never a TAKEN
                link.acks_due += len(messages) if len(messages) == 1 else pushing(messages)
        link.send(messages)
        if taken is not None and (not riding or link.out is None or link.out.messages):
            # Not in the kernel yet (or not riding): acknowledge on the link the pushes came
            # on; a TAKEN still queued here brings the credit and the count later.
            if riding:
                taken[0].acknowledge(taken[1], 0, 0, 0)
            else:
                taken[0].acknowledge(taken[1], taken[2], taken[3], taken[4])

    def expect(self, peer: int, callback: Callable[[Any], None], failure: Any,
               timeout: float = REQUEST_TIMEOUT) -> int:
        request_id = self._new_id()
        deadline = self.worker.loop.now + timeout
        self.waiting[request_id] = (peer, callback, failure, deadline)
        return request_id

    def expire_waiting(self, now: float) -> None:
        """Fail requests a peer never answered (it hung, or its reply link could not form)."""
        self._fail([rid for rid, entry in self.waiting.items() if entry[3] < now])

    def resend_kept(self) -> None:
        """Once per tick: take the TAKENs a link holds (the kept pushes they release wait at
        most this long), and reconnect to owners that died holding pushes promised to them
        (connecting sends those pushes again to the replacement, as soon as it listens)."""
        for link in self.links.values():
            if link.sock is not None:
                link.read_all_acks()
            elif link.outbox.kept:
                link.connect()

    def settle(self) -> None:
        """Before a stop: read what the peers sent (their pushes are taken, their TAKENs
        release what this worker keeps), then take the TAKENs on every link."""
        for link in list(self.inbound):
            link.read_all()
        self.flush()
        self.resend_kept()

    def read_links_from(self, peer: int) -> None:
        """Read to the end what ``peer`` (or a link not yet known to be its) sent us: the
        TAKENs riding in it must count before its link's kept pushes are sent again."""
        for link in list(self.inbound):
            if link.peer in (peer, -1):
                link.read_all()

    def inbound_closed(self, link: InLink) -> None:
        """A peer's link to us ended: the credit it held is void."""
        self.inbound.discard(link)
        if self.ledgers is not None and link.peer >= 0:
            self.ledgers.sender_gone(link.peer)

    def kept(self) -> int:
        """Promised pushes no owner has taken yet."""
        return sum(len(link.outbox.kept) for link in self.links.values())

    def link_lost(self, peer: int) -> None:
        """Every request waiting on ``peer`` fails now (a forwarded push becomes a 503), and
        this turn's records for it are dropped: a link made again this turn must not carry
        pushes already answered 503."""
        close_fds([(framed, [fd] if fd >= 0 else []) for framed, fd in self.batches.pop(peer, [])])
        self._fail([rid for rid, entry in self.waiting.items() if entry[0] == peer])

    def _fail(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            _, callback, failure, _ = self.waiting.pop(rid)
            callback(failure)

    # -- requests -----------------------------------------------------------------------------

    def submit_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                     delay: float, answer: Any, request: Any, apns_id: bytes) -> Accepted | None:
        """``Router.submit_plain`` with peers, every push the routes take: its owner computed
        once; this worker's own shard to ``take_own`` (the owner's ``take_plain``, whose answer
        it returns), else forwarded and None returned: answered (``forwarding.Forwarded``) HELD
        within credit once the kernel took it, else as the owner's ACK says, QUEUE_FULL or
        UNREACHABLE. Routing and the promise (``Outbox``) in one call, no other when the link
        is up: once per push."""
        peer = crc32(token) % self.count  # routing.owner_of, written out
        if peer == self.index:
            take_own = self.take_own  # read, then called: see Routes.push
            return take_own(token, frame, expires, received, delay, answer, request, apns_id)
        self.stats.forwarded += 1
        link = self.links[peer]
        out = link.out
        outbox = link.outbox
        size = len(frame)
        if out is None or out.queued >= MAX_QUEUED or outbox.credit <= 0 \
                or size > outbox.credit_bytes:
            if not link.out_of_credit(token, frame, expires, received, delay, answer, request,
                                      apns_id):
                return None
        # Promised: kept until a TAKEN covers it, answered by ``Outbox.sent``; a list, no call.
        outbox.credit -= 1
        outbox.credit_bytes -= size
        self._next_seq = seq = self._next_seq + 1
        entry = [seq, token, frame, expires, received, delay, answer, request, apns_id]
        outbox.kept.append(entry)
        outbox.staged.append(entry)
        outbox.staged_pushes = True
        self.stats.forwarded_promised += 1
        length = len(token)
        framed = _push_head(PUSH, PUSH_FIXED + length + size, 0, seq, expires, received, delay,
                            length) + token + frame  # frame_push's record, without its call
        batch = self.batches.get(peer)
        if batch is None:
            self.batches[peer] = [(framed, -1)]
        else:
            batch.append((framed, -1))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.worker.loop.call_first(self.flush)
        return None

    def hand_off(self, peer: int, fd: int, token: bytes, leftover: bytes) -> bool:
        """Queue ``fd`` for ``peer``; False (the caller still owns the fd) when it cannot go."""
        if not self.can_send(peer):
            return False
        body = encode(HANDOFF, token, leftover)  # raises before the fd is queued, if it must
        self.send(peer, HANDOFF, body, fd)
        return True

    def send_now(self, peer: int, kind: int, body: bytes, fd: int) -> bool:
        """One record carrying ``fd`` to ``peer`` at once, outside the turn's batch: True once
        the kernel took it (close this copy), else nothing left (``OutLink.send_fd_now``)."""
        link = self.links.get(peer)
        return link is not None and link.send_fd_now(record(kind, body), fd)

    # requests to every peer at once (peer_requests.py)
    broadcast = peer_requests.broadcast
    broadcast_here = peer_requests.broadcast_here
    write_broadcasts = peer_requests.write_broadcasts
    collect = peer_requests.collect
    share = peer_requests.share

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, data: bytes, fds: list[int], link: InLink) -> int:
        """Handle one message that came on ``link``; returns the index of the peer that sent it."""
        self._reply_to = sender = ((data[0] & 0x7F) << 8) | data[1]  # wire.sender_of
        pushes, size, asked, others = read_pushes(data)
        if pushes:
            try:
                self._take_pushes(sender, pushes, size, asked, link)
            except Exception:
                log.exception("mesh pushes from worker %d failed", sender)
        if not others and not fds:  # the usual message: pushes only
            return sender
        records = iter_records(data)
        fd_index = 0
        for kind, body in records:
            if kind == PUSH:
                continue
            if kind == HANDOFF or kind == CONNECTION:
                fd = fds[fd_index] if fd_index < len(fds) else -1
                fd_index += 1
                if kind == HANDOFF:
                    self._on_handoff(body, fd)
                else:
                    self._on_connection(body, fd)
            elif kind == TAKEN:  # riding in the owner's batch to us (flush)
                out_link = self.links.get(sender)
                if out_link is not None:
                    out_link.taken(*_decode_taken(body))
            else:
                try:
                    self._dispatch(kind, body)
                except Exception:
                    log.exception("mesh record %d failed", kind)
        for fd in fds[fd_index:]:
            os.close(fd)
        return sender

    def _take_pushes(self, sender: int, pushes: list[Decoded], size: int, asked: bool,
                     link: InLink) -> None:
        """The owner's half: the message's pushes are acknowledged (``TAKEN``) in this turn's
        flush, riding in its batch to ``sender`` if it has one, and accepted after it left
        (``_accept_taken``), never before: a push written is a push acknowledged."""
        ledgers = self.ledgers
        if ledgers is None:  # an owner that may answer later (a cluster worker asks Redis)
            self._take_asked(sender, pushes)
            return
        fresh, upto, grant, grant_bytes, count, size = ledgers.arrived(sender, pushes, size,
                                                                       asked)
        due = self.taken_due.get(sender)
        if due is None or due[0] is not link:
            if due is not None:  # two links from one sender in a turn: the old one's first
                due[0].acknowledge(due[1], due[2], due[3], due[4])
            self.taken_due[sender] = [link, upto, grant, grant_bytes, 1]
        else:
            due[1] = upto
            due[2] += grant
            due[3] += grant_bytes
            due[4] += 1
        if fresh:
            self.taking.append((sender, fresh, count, size))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.worker.loop.call_first(self.flush)

    def _accept_taken(self) -> None:
        """Accept the pushes taken this turn, their TAKEN gone; an asked one is answered with
        its ``ACK``; a promised one that meets a full queue is held anyway (forwarding.py)."""
        ledgers = self.ledgers
        assert ledgers is not None
        delivery = ledgers.delivery
        # The owner's one call, as for a push received here: written at once when it can be.
        take_plain = delivery.take_plain
        taking, self.taking = self.taking, []
        for sender, fresh, count, size in taking:
            delivery.reserved_pushes -= count  # the room ``Ledgers.arrived`` kept is theirs
            delivery.reserved_bytes -= size
            try:
                for rid, _seq, expires, received, delay, token, frame in fresh:
                    accepted = take_plain(token, frame, expires, received, delay)
                    if rid:
                        self.reply(sender, ACK, _encode_ack(rid, accepted))
                    elif accepted is not HELD:
                        ledgers.hold_over_limit(token, Push(frame, expires, received))
            except Exception:
                log.exception("mesh pushes from worker %d failed", sender)

    def _take_asked(self, sender: int, pushes: list[Decoded]) -> None:
        # A closure per push, in Redis mode only: its answer may come after a Redis round trip.
        take_plain = self.owner.take_plain
        for rid, _seq, expires, received, delay, token, frame in pushes:
            accepted = take_plain(token, frame, expires, received, delay,
                                  self._acknowledge(sender, rid), None, b"")
            if accepted is not None:  # decided here, at once
                self.reply(sender, ACK, _encode_ack(rid, accepted))

    def _acknowledge(self, peer: int, rid: int) -> PushAnswer:
        def answer(accepted: Accepted) -> None:
            self.reply(peer, ACK, _encode_ack(rid, accepted))
        return answer

    def _dispatch(self, kind: int, body: memoryview) -> None:
        if kind == ACK:
            rid, value = _decode_ack(body)
            self.resolve(rid, _ACK_MEANING.get(value, UNREACHABLE))
        elif kind == BCAST:
            rid, prefix, frame = decode(BCAST, body)
            self.broadcast_here(frame, prefix.decode(), partial(self._broadcast_done,
                                                                self._reply_to, rid))
        elif kind == BCAST_DONE:
            rid, written, refused = decode(BCAST_DONE, body)
            self.resolve(rid, (written, refused))
        elif kind == STATS:
            rid, _ = decode(STATS, body)
            self._reply(REPLY, encode(REPLY, rid, self._snapshot_json()))
        elif kind == REPLY:
            rid, payload = decode(REPLY, body)
            self.resolve(rid, orjson.loads(payload))
        elif kind == ADMIN:
            rid, command = decode(ADMIN, body)
            self.worker.admin.apply(orjson.loads(command))
            self._reply(REPLY, encode(REPLY, rid, b"true"))
        elif kind in self.handlers:
            self.handlers[kind](body)
        else:
            log.error("unknown mesh record %d", kind)

    def _broadcast_done(self, peer: int, rid: int, counts: tuple[int, int] | None) -> None:
        if counts is not None:  # None: the write failed (logged); the asker names us missing
            self.reply(peer, BCAST_DONE, encode(BCAST_DONE, rid, *counts))

    def _snapshot_json(self) -> bytes:
        """This worker's snapshot, made once per loop turn however many peers' STATS records
        arrive in it (a burst of /metrics on a peer asks for one each)."""
        now = self.worker.loop.now
        if self._snapshot[0] != now:
            self._snapshot = (now, orjson.dumps(self.worker.snapshot()))
        return self._snapshot[1]

    def _on_handoff(self, body: memoryview, fd: int) -> None:
        if fd < 0:
            log.error("stream hand-off for a token arrived without its socket")
            return
        try:
            token, leftover = decode(HANDOFF, body)
            self.worker.adopt_stream(fd, token, leftover)
        except Exception:
            log.exception("adopting a handed-over stream failed; closing it")
            self.worker.loop.drop(fd)  # its device reconnects

    def _on_connection(self, body: memoryview, fd: int) -> None:
        if fd < 0 or self.adopt is None:
            log.error("a sender connection handed over arrived without its socket, or here, "
                      "where nothing adopts one")
            if fd >= 0:
                os.close(fd)
            return
        try:
            (received,) = decode(CONNECTION, body)
            self.adopt(fd, received)
        except Exception:
            log.exception("adopting a sender connection failed; closing it")
            self.worker.loop.drop(fd)  # nothing was answered on it: the sender sends again

    def _reply(self, kind: int, body: bytes) -> None:
        self.reply(self._reply_to, kind, body)

    def reply(self, peer: int, kind: int, body: bytes) -> None:
        link = self.links.get(peer)
        if link is None:
            return
        if link.connect():
            self.send(peer, kind, body)

    def resolve(self, rid: int, value: Any) -> None:
        """Hand a reply to the request waiting for it (a reply after the timeout is dropped)."""
        entry = self.waiting.pop(rid, None)
        if entry is not None:
            entry[1](value)


def _no_owner(token: bytes, frame: bytes, expires: float, received: float, delay: float,
              answer: Any, request: Any, apns_id: bytes) -> Accepted:
    return UNREACHABLE  # until a router binds an owner

