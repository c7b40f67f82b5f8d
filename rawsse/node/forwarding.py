"""Forwarded pushes: answered at once within the owner's credit, kept until the owner holds them.

Theory of operation
-------------------
A push that lands on a worker other than its token's owner is forwarded over the mesh
(``mesh.py``). Waiting for the owner's answer before answering the sender would cost every
forwarded push a round trip between two processes (two loop turns, two context switches on a
busy node: 110 µs per push with 2 workers against 55 µs with one, issue 14). Instead:

- **Credit.** Each owner reserves room in its bounded queues (``Delivery.reserved_pushes``,
  ``reserved_bytes``: counted against ``--max-pending``, ``--max-pending-bytes`` and
  ``--max-delayed`` like pushes it holds) for each peer, up to ``CREDIT_PUSHES`` pushes and
  ``CREDIT_BYTES`` frame bytes, and grants it to the peer in its acknowledgements (``TAKEN``):
  all of it again each time the peer's falls below half (``GRANT_BELOW``), so the usual message
  grants nothing and costs no look at the queues' room. It grants only what its queues can
  still take, so a reservation is never a promise it cannot keep.
- **Promise.** A worker holding credit for the owner sends the push marked *promised* (request
  id 0) and answers 200 as soon as the kernel has taken the message carrying it: from then on
  the push sits in the owner's socket queue, where it survives a ``kill -9`` of the worker that
  took the request (the owner reads what a dead peer sent before it sees the end of the link).
  Without credit (a new link, a full owner, Redis mode) the push is *asked*: it carries a
  request id and is answered with the owner's ``ACK`` (HELD, or QUEUE_FULL → 503), as before.
- **Acknowledgement.** The owner answers the pushes a sender sent it in one loop turn with one
  ``TAKEN``: "every push of yours up to sequence number ``upto`` is held, here is more credit,
  and this answers ``messages`` of your messages". It sends it in that turn's mesh flush,
  *before* it accepts (writes) any of those pushes (``Mesh._accept_taken``), so a push it
  acknowledged is one it holds (its crash loses it, as it loses everything it holds: counted by
  the master from its heartbeat), and a push it did not acknowledge is one it never wrote. When
  the owner sends that sender anything else in the turn (its own forwarded pushes, with both
  workers taking requests), the TAKEN rides in that message: one ``sendmsg`` per peer per turn.
  Otherwise it goes back on the connection the pushes came on, which the sender does not watch
  for input, so an acknowledgement never costs it a wakeup: it reads those when its credit runs
  low (``LOW_CREDIT``), when it is out of it, on its tick, and before it sends anything again
  to a replacement (``links.OutLink.read_acks``). Delaying them only keeps the promised pushes
  here a little longer, at most the credit's worth.
- **Kept until taken.** The worker that promised a push keeps it (``Outbox.kept``, at most the
  credit: ``CREDIT_PUSHES`` per owner) until a ``TAKEN`` covers it. When the link to the owner
  breaks (the owner died), whatever is kept is sent again, in order, to whatever listens at the
  owner's address next (its respawned replacement), on the next push for it or the next tick.
  The owner skips a push whose sequence number it has seen from that sender (a link that broke
  while both ends lived), so no push is taken twice; a replacement has seen none, and none of
  them reached a stream before (see Acknowledgement).
- **Numbers.** A sender numbers its forwarded pushes from ``time.monotonic_ns()`` at its start,
  one up per push: always rising per sender, and a respawned sender (same index, new process)
  starts above anything its predecessor sent, so an owner needs no per-process bookkeeping.

Bounds and edges. A promised push that finds the owner's queue full anyway (a replacement that
received more resent pushes than its room, or a credit granted just as a link broke) is still
held, over the bound, and counted (``promised_over_limit``): never a 200 then a drop. A promised
push whose message the kernel had not taken when its link broke is answered 503 and forgotten.
A worker that stops while it keeps pushes for an owner that is not back logs their count.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rawsse.apns.registry import Push
from rawsse.apns.routing import HELD, UNREACHABLE, Accepted
from rawsse.node.wire import PUSH, framer

if TYPE_CHECKING:
    from rawsse.apns.delivery import Delivery

# The credit an owner grants each peer. A worker's pushes in flight to one owner within a loop
# turn are what its senders have in flight (5 keep-alive senders: 5; pipelined 5 x 16: 80);
# 256 leaves room for bursts, and bounds what each worker keeps per owner (256 pushes, 1 MiB).
CREDIT_PUSHES = 256
CREDIT_BYTES = 1024 * 1024
# Below this much credit a sender reads the TAKENs waiting for it (``Mesh``): reading them
# sooner only frees the pushes it keeps sooner (at most the credit), for a recv either way.
LOW_CREDIT = CREDIT_PUSHES // 4
LOW_CREDIT_BYTES = CREDIT_BYTES // 4
# An owner grants a sender more credit once what it holds falls below this (``Ledgers.arrived``):
# a grant then, not a little with every message, and no look at the queues' room in between.
GRANT_BELOW = CREDIT_PUSHES // 2
GRANT_BELOW_BYTES = CREDIT_BYTES // 2

frame_push = framer(PUSH)  # a framed PUSH record, header and fixed part in one pack

# A decoded PUSH: (rid, seq, expires, received, delay, token, frame)
Decoded = tuple[int, int, float, float, float, bytes, bytes]


def first_sequence() -> int:
    """Where a sender's numbers start (module docstring, Numbers)."""
    return time.monotonic_ns()


# One promised push, kept until its owner says it holds it: a list, not an object, so that
# promising one costs no Python call (``Mesh.submit_plain`` makes it), and no ``Push``: its
# fields are the record's. Its answer is ``ANSWER(accepted)`` when REQUEST is None, else (a push
# the routes submitted plain: ``Router.submit_plain``) a 200 is ``request.channel.answer_ok(
# request, apns_id)``, written here with no call of the routes', and anything else is
# ``ANSWER(request, apns_id, accepted)``. Its fields:
SEQ, TOKEN, FRAME, EXPIRES, RECEIVED, DELAY, ANSWER, REQUEST, APNS_ID = range(9)  # FRAME is
# None once forgotten (answered 503 after a broken link); ANSWER is None once answered
Forwarded = list[Any]  # [seq, token, frame | None, expires, received, delay, answer | None,
#                         request | None, apns_id]


def answer_entry(entry: Forwarded, accepted: Accepted) -> bool:
    """Answer one promised push, once; True for a plain 200 written (the caller counts those
    in ``pushes_ok``, as the routes would have)."""
    answer = entry[ANSWER]
    if answer is None:
        return False
    entry[ANSWER] = None
    request = entry[REQUEST]
    if request is None:
        answer(accepted)
    elif accepted is HELD:
        request.channel.answer_ok(request, entry[APNS_ID])
        return True
    else:
        answer(request, entry[APNS_ID], accepted)
    return False


class Outbox:
    """The sender's side, for one owner: the credit it holds and the pushes it promised."""

    __slots__ = ("stats", "credit", "credit_bytes", "kept", "staged", "unsent", "staged_pushes")

    def __init__(self, stats: Any) -> None:
        self.stats = stats  # the worker's: a plain 200 answered here counts in pushes_ok
        self.credit = 0
        self.credit_bytes = 0
        self.kept: deque[Forwarded] = deque()  # promised, not yet taken, oldest first
        # Promised, not yet answered: in this turn's batch, then in the link's send queue.
        self.staged: list[Forwarded] = []
        self.unsent: list[Forwarded] = []
        self.staged_pushes = False  # this turn's batch has pushes (each message gets a TAKEN)

    def sent(self) -> None:
        """The kernel took every message queued for the owner: the promised pushes are on
        their way, answer them 200."""
        unsent, self.unsent = self.unsent, []
        plain = 0
        for entry in unsent:
            answer = entry[ANSWER]
            if answer is None:  # a TAKEN came first (``taken``)
                continue
            entry[ANSWER] = None
            request = entry[REQUEST]
            if request is None:
                answer(HELD)
            else:  # answer_entry's 200, written out: this runs for every forwarded push
                request.channel.answer_ok(request, entry[APNS_ID])
                plain += 1
        if plain:
            self.stats.pushes_ok += plain

    def taken(self, upto: int, pushes: int, size: int) -> None:
        """The owner holds every push numbered up to ``upto`` and grants more credit."""
        kept = self.kept
        if kept and kept[-1][SEQ] <= upto and not self.unsent and not self.staged:
            kept.clear()  # all taken, every one answered already (``sent``): the usual TAKEN
        plain = 0
        while kept and kept[0][SEQ] <= upto:
            entry = kept.popleft()
            if entry[ANSWER] is not None:  # taken before this side saw its message leave
                plain += answer_entry(entry, HELD)
        if plain:
            self.stats.pushes_ok += plain
        self.credit += pushes
        self.credit_bytes += size

    def lost(self) -> None:
        """The link broke: the credit went with it; promised pushes the kernel never took are
        answered 503 and forgotten (the sender sends them again); the rest stay kept."""
        self.credit = self.credit_bytes = 0
        if not self.unsent and not self.staged:
            return
        unsent, self.unsent, self.staged = self.unsent + self.staged, [], []
        for entry in unsent:
            if entry[ANSWER] is not None:
                answer_entry(entry, UNREACHABLE)
                entry[FRAME] = None
        self.kept = deque(entry for entry in self.kept if entry[FRAME] is not None)

    def resend(self) -> list[tuple[bytes, int]]:
        """The kept pushes as framed records, oldest first, for a new link to the owner."""
        return [(frame_push(0, entry[SEQ], entry[EXPIRES], entry[RECEIVED], entry[DELAY],
                            entry[TOKEN], entry[FRAME]), -1)
                for entry in self.kept if entry[FRAME] is not None]


class Ledger:
    """The owner's side, for one sender: the last number taken and the credit reserved."""

    __slots__ = ("last_seq", "pushes", "bytes")

    def __init__(self) -> None:
        self.last_seq = 0
        self.pushes = 0
        self.bytes = 0


class Ledgers:
    """What an owner with its own bounded queues (``Delivery``) knows of each sender."""

    __slots__ = ("delivery", "workers", "senders")

    def __init__(self, delivery: "Delivery", workers: int) -> None:
        self.delivery = delivery
        self.workers = workers  # no peer is granted more than its share of the room
        self.senders: dict[int, Ledger] = {}

    def arrived(self, sender: int, pushes: list[Decoded], size: int,
                asked: bool) -> tuple[list[Decoded], int, int, int, int, int]:
        """The pushes of one message from ``sender`` (their frames' ``size``; ``asked``: one
        of them carries a request id): the ones not taken before, the number to acknowledge
        and the credit to grant (``TAKEN``'s fields), and the count and frame bytes of the
        fresh ones, whose room stays reserved until they are accepted, once this turn's TAKEN
        has left (``Mesh._accept_taken``). Credit is granted once the sender's falls
        to half (``GRANT_BELOW``), up to ``CREDIT_PUSHES`` again: the usual message grants
        none and only releases the room its promised pushes had reserved to them."""
        ledger = self.senders.get(sender)
        if ledger is None:
            ledger = self.senders[sender] = Ledger()
        count = len(pushes)
        if (not asked and pushes[0][1] > ledger.last_seq and ledger.pushes - count >= GRANT_BELOW
                and ledger.bytes - size >= GRANT_BELOW_BYTES):
            # All fresh and promised, within the room reserved for them, no grant due: that
            # room is theirs until they are accepted (``reserved_*`` unchanged), no other count.
            ledger.last_seq = pushes[-1][1]
            ledger.pushes -= count
            ledger.bytes -= size
            return pushes, ledger.last_seq, 0, 0, count, size
        last = ledger.last_seq
        fresh = [p for p in pushes if p[1] > last] if pushes[0][1] <= last else pushes
        delivery = self.delivery
        if len(fresh) != count:
            count = len(fresh)
            size = sum([len(p[6]) for p in fresh])
        asked_sizes = [len(p[6]) for p in fresh if p[0]] if asked else []
        promised = count - len(asked_sizes)
        promised_size = size - sum(asked_sizes) if asked_sizes else size
        if fresh:
            ledger.last_seq = fresh[-1][1]
        # The promised pushes use the room reserved for them: release it, they take it now.
        promised, promised_size = min(promised, ledger.pushes), min(promised_size, ledger.bytes)
        ledger.pushes -= promised
        ledger.bytes -= promised_size
        delivery.reserved_pushes -= promised
        delivery.reserved_bytes -= promised_size
        grant = grant_bytes = 0
        if ledger.pushes < GRANT_BELOW or ledger.bytes < GRANT_BELOW_BYTES:
            room, room_bytes = free_room(delivery)
            share = self.workers
            grant = min(CREDIT_PUSHES - ledger.pushes, (room - count) // share)
            grant_bytes = min(CREDIT_BYTES - ledger.bytes, (room_bytes - size) // share)
            if grant <= 0 or grant_bytes <= 0:
                grant = grant_bytes = 0
        ledger.pushes += grant
        ledger.bytes += grant_bytes
        delivery.reserved_pushes += grant + count
        delivery.reserved_bytes += grant_bytes + size
        return fresh, ledger.last_seq, grant, grant_bytes, count, size

    def sender_gone(self, sender: int) -> None:
        """``sender``'s link ended: the credit it held is void (a replacement starts with none)
        and its room is free again. Its last number stays: a replacement's are higher."""
        ledger = self.senders.get(sender)
        if ledger is None:
            return
        self.delivery.reserved_pushes -= ledger.pushes
        self.delivery.reserved_bytes -= ledger.bytes
        ledger.pushes = ledger.bytes = 0

    def hold_over_limit(self, token: bytes, push: Push) -> None:
        """A promised push met a full queue (module docstring, Bounds): hold it anyway."""
        delivery = self.delivery
        delivery.registry.stats.promised_over_limit += 1
        delivery.registry.deliver(token, push)


def free_room(delivery: "Delivery") -> tuple[int, int]:
    """Pushes and frame bytes ``delivery``'s bounded queues can still take, reservations
    counted: what an owner may still grant."""
    config = delivery.config
    pending: Any = delivery.registry.pending
    waiting = len(delivery.waiting) + delivery.reserved_pushes
    pushes = min(config.max_pending - len(pending), config.max_delayed) - waiting
    stored = getattr(pending, "frame_bytes", 0)
    size = config.max_pending_bytes - stored - delivery.delayed_bytes - delivery.reserved_bytes
    return pushes, size
