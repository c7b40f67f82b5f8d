"""The delivery log: the last N outcomes of pushes in one worker (``--delivery-log N``).

Theory of operation
-------------------
Every place a push's fate is decided records one entry in its worker's ring: written to a
stream (live, or handed to a stream that connected), kept pending, waiting out a delivery delay,
routed to another node or stored in Redis, given back by a stream that ended, expired,
discarded (``apns-expiration`` 0 with no stream), replaced by a newer push (newest wins), or
rejected (the status and Apple's reason). ``GET /admin/deliveries`` asks every worker, and in
Redis mode every node, for the entries of an apns-id or a token and merges them
(``deliveries.py``).

Storage is preallocated at start, one slot per entry, so recording allocates nothing: a
fixed-size record in one ``bytearray`` (``RECORD``: the apns-id, the outcome code, the loop's
clock, the push's expiry and its frame size, written by one ``pack_into``) and the token as a
reference in a list (a delivered push records its stream's own token object, shared while the
stream lives).
``ENTRY_BYTES`` is what one entry holds, measured (``tests/test_deliveries.py`` measures it
again with ``tracemalloc``: a ring of distinct tokens, so each entry keeps its own token object
alive). With ``--delivery-log 0`` the ring does not exist and each hook is one ``is None`` test.

Times are the loop's monotonic clock (read once per loop turn; ``CLOCK_MONOTONIC`` is one clock
for every process of a host), turned into unix time when a query is answered.

The apns-id of a push is its frame's bytes 4 to 40: ``sse.encode_event`` writes ``id: <apns-id>``
first, and an apns-id is always a 36-character UUID (``validation.is_apns_id``, or ours).
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any, Iterable

from rawsse.apns import apple

if TYPE_CHECKING:
    from rawsse.apns.delivery import Delivery
    from rawsse.apns.registry import Registry
    from rawsse.server.loop import Loop

ID_LEN = 36
_ID_START, _ID_END = 4, 4 + ID_LEN  # the apns-id in a frame (module docstring)

# One entry: the frame's first 40 bytes ("id: " + apns-id: ``40s`` copies them out of the frame
# with no slice made), the outcome code, the loop time, the push's expiry, the frame's size (or
# a rejection's status). One ``pack_into`` writes it all: 0.25 us, where a slice assignment per
# column cost 0.6 us for the apns-id alone (python -m timeit, Python 3.11).
RECORD = struct.Struct("<40sBddI")
_SIZE = RECORD.size
_pack = RECORD.pack_into

# Bytes one entry holds: 134 measured with tracemalloc over a full ring whose entries each keep
# a distinct 32-byte token alive (tests/test_deliveries.py, test_entry_cost_is_what_help_says);
# 69 (the record and the token's reference) when the token is its stream's.
ENTRY_BYTES = 140
DEFAULT_SIZE = 100_000

# Outcome codes (one byte each). Every name is also the "event" the API shows.
DELIVERED = 1  # written to the token's stream
DELIVERED_ON_CONNECT = 2  # the pending push, handed to a stream that connected
STORED = 3  # kept pending in this worker
DELAYED = 4  # waiting out a delivery delay
ROUTED = 5  # published to the node holding the device (Redis mode)
STORED_IN_REDIS = 6  # the device's pending push in Redis
REQUEUED = 7  # its stream ended before it was all written: pending again
EXPIRED = 8  # its apns-expiration passed before a stream came
DISCARDED = 9  # apns-expiration 0 (or past) and no stream
REPLACED = 10  # a newer push for the token took its place (newest wins)
REJECTED = 32  # + the reason's index in REASONS

EVENTS = {DELIVERED: "delivered", DELIVERED_ON_CONNECT: "delivered_on_connect",
          STORED: "stored", DELAYED: "delayed", ROUTED: "routed",
          STORED_IN_REDIS: "stored_in_redis", REQUEUED: "requeued", EXPIRED: "expired",
          DISCARDED: "discarded", REPLACED: "replaced"}
REASONS = tuple(apple.REASON_STATUS)
_REASON_CODE = {reason: REJECTED + i for i, reason in enumerate(REASONS)}
_UNKNOWN_REASON = REJECTED + len(REASONS) - 1  # never used: every reason rawsse sends is listed


class DeliveryLog:
    """One worker's ring of outcomes (module docstring)."""

    __slots__ = ("size", "clock", "next", "full", "records", "tokens")

    def __init__(self, size: int, clock: "Loop") -> None:
        self.size = size
        self.clock = clock  # its ``now``: the loop's monotonic time of this turn
        self.next = 0  # the slot the next entry takes
        self.full = False  # every slot written once: ``next`` is the oldest entry
        self.records = bytearray(size * RECORD.size)
        self.tokens: list[bytes | None] = [None] * size

    # -- recording (the hot path: one pack and one store) -------------------------------------

    def record(self, code: int, token: bytes, frame: bytes, expires: float,
               at: float = 0.0) -> None:
        """A push (its ``frame`` and ``expires``, for ``token``) met outcome ``code``, now or at
        loop time ``at`` (when a reply tells later what was decided: Redis routed it when it was
        taken). The frame and expiry, not the ``Push``: a push written at once has none."""
        i = self.next
        _pack(self.records, i * _SIZE, frame, code, at or self.clock.now, expires, len(frame))
        self.tokens[i] = token
        i += 1
        if i < self.size:
            self.next = i
        else:
            self.next = 0
            self.full = True

    def rejected(self, apns_id: bytes, token: bytes | None, status: int, reason: str) -> None:
        """A push answered ``status``/``reason`` (the status is the reason's: ``apple.py``)."""
        if len(apns_id) != ID_LEN:
            return  # not a UUID (a 400 BadMessageId echoes what was sent): nothing to find it by
        i = self.next
        _pack(self.records, i * _SIZE, b"id: " + apns_id, _REASON_CODE.get(reason, _UNKNOWN_REASON),
              self.clock.now, 0.0, status)
        self.tokens[i] = token
        self.next = i + 1 if i + 1 < self.size else 0
        self.full = self.full or self.next == 0

    # -- queries (operator requests: may scan the ring) ---------------------------------------

    def filled(self) -> int:
        return self.size if self.full else self.next

    def find(self, ids: Iterable[bytes], tokens: Iterable[bytes]) -> list[int]:
        """Slots of the entries of any of ``ids`` (any case) or ``tokens``, oldest first."""
        filled = self.filled()
        slots: set[int] = set()
        wanted = {i.lower() for i in ids}
        if wanted:
            column = bytes(self.records[:filled * _SIZE]).lower()
            if len(wanted) <= 16:  # a few ids: the records searched in C for each
                for apns_id in wanted:
                    start = column.find(apns_id)
                    while start >= 0:
                        if start % _SIZE == _ID_START:
                            slots.add(start // _SIZE)
                        start = column.find(apns_id, start + 1)
            else:  # many (rawsse push --verify): one pass over the ring
                for slot in range(filled):
                    offset = slot * _SIZE + _ID_START
                    if column[offset:offset + ID_LEN] in wanted:
                        slots.add(slot)
        column_tokens = self.tokens
        for token in set(tokens):
            start = 0
            while True:
                try:
                    slot = column_tokens.index(token, start, filled)
                except ValueError:
                    break
                slots.add(slot)
                start = slot + 1
        oldest = self.next if self.full else 0
        return sorted(slots, key=lambda slot: (slot - oldest) % self.size)

    def entry(self, slot: int, wall_offset: float) -> dict[str, Any]:
        head, code, at, expires, size = RECORD.unpack_from(self.records, slot * _SIZE)
        token = self.tokens[slot]
        entry: dict[str, Any] = {
            "apns_id": head[_ID_START:_ID_END].decode("ascii"),
            "token": token.hex() if token is not None else None,
            "at": round(at + wall_offset, 6),
        }
        if code >= REJECTED:
            entry["event"] = "rejected"
            entry["status"] = size
            entry["reason"] = REASONS[code - REJECTED]
        else:
            entry["event"] = EVENTS.get(code, "unknown")
            entry["expires"] = expires
            if code in (DELIVERED, DELIVERED_ON_CONNECT):
                entry["bytes"] = size
        return entry


def wall_offset() -> float:
    """What turns the loop's monotonic times into unix time, now."""
    return time.time() - time.monotonic()


def worker_answer(log: DeliveryLog | None, registry: "Registry", delivery: "Delivery",
                  index: int, query: dict[str, Any]) -> dict[str, Any]:
    """One worker's part of a deliveries query ``{"ids": [...], "tokens": [hex...]}``: its
    entries for them, and the push each token has waiting here (pending, or in the delay
    queue)."""
    ids = [str(i).encode("ascii", "replace") for i in query.get("ids") or ()]
    tokens = [bytes.fromhex(t) for t in query.get("tokens") or ()]
    answer: dict[str, Any] = {"worker": index, "entries": [], "waiting": []}
    if log is None:
        answer["off"] = True
        return answer
    offset = wall_offset()
    answer["entries"] = [log.entry(slot, offset) for slot in log.find(ids, tokens)]
    wanted = set(tokens)
    for token in wanted:
        push = registry.pending.get(token)
        if push is not None:
            answer["waiting"].append(waiting_entry(token, push.frame, push.expires, "pending"))
    for _deadline, _seq, token, push in delivery.waiting:
        if token in wanted:
            answer["waiting"].append(waiting_entry(token, push.frame, push.expires, "delayed"))
    return answer


def waiting_entry(token: bytes, frame: bytes, expires: float, where: str) -> dict[str, Any]:
    """A push held for ``token`` (here, or in Redis: ``where``) as the API shows it."""
    return {"token": token.hex(), "apns_id": frame[_ID_START:_ID_END].decode("ascii"),
            "expires": expires, "where": where}
