"""The owner's half of a push: accept it into bounded queues, deliver it now or after its delay.

A push is accepted (answered 200) only if it has a place: the token's stream, its pending slot,
or room under ``--max-pending`` pushes and ``--max-pending-bytes`` frame bytes, counting both the
pending store and the pushes waiting out a delivery delay (themselves bounded by
``--max-delayed``). Past those bounds the answer is 503 (the sender retries), never a 200 that is
then dropped.

Every push for a token this worker owns comes in through ``take_plain``: the routes' own
through the router, a peer's through the mesh (in Redis mode a push routed in from another node
is ``accept``ed: ``rawsse/cluster/routing.py``). One with no delay whose token has a live stream
with nothing queued is written at once, with no ``Push`` made for it (the hot path); any other
is ``accept``ed.

Room reserved for pushes that peers already answered 200 on their way here (``reserved_pushes``,
``reserved_bytes``: the mesh's credit, ``rawsse/node/forwarding.py``) counts as taken, so those
pushes always find their place.

Delayed pushes wait in this object's own heap, ordered by deadline, with one loop timer armed
for the earliest: never found by scanning the loop's timers. A drain (``flush_delayed``)
delivers, or keeps pending, every one of them in deadline order, so the push due last is the one
left pending for its token, as it would have been without the drain; a delayed push arriving
after that (forwarded by a peer to a draining owner) is delivered or kept at once: a timer would
outlive the drain and the push, answered 200, would be lost.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from os import write as _write
from typing import TYPE_CHECKING, Any, Iterable

from rawsse.apns.deliverylog import DELAYED, DELIVERED
from rawsse.apns.registry import SAME_TURN, Push, Registry
from rawsse.apns.routing import HELD, QUEUE_FULL, Accepted
from rawsse.server.latency import BOUNDS as LATENCY_BOUNDS
from rawsse.server.stream import STREAM_GONE

if TYPE_CHECKING:
    from rawsse.config import ServeConfig
    from rawsse.server.loop import Loop, Timer


_MISSING = object()


class PendingPushes(dict[bytes, Push]):
    """The registry's pending store, which also counts its frame bytes (``--max-pending-bytes``).

    A dict subclass so every place that stores, replaces, hands over or expires a pending push
    keeps the count right without knowing about it. ``pop`` returning the default is the one
    path with no change of size."""

    __slots__ = ("frame_bytes",)

    def __init__(self, items: Iterable[tuple[bytes, Push]] = ()) -> None:
        super().__init__()
        self.frame_bytes = 0
        self.update(items)

    def __setitem__(self, token: bytes, push: Push) -> None:
        old = dict.get(self, token)
        if old is not None:
            self.frame_bytes -= len(old.frame)
        self.frame_bytes += len(push.frame)
        dict.__setitem__(self, token, push)

    def __delitem__(self, token: bytes) -> None:
        self.frame_bytes -= len(dict.__getitem__(self, token).frame)
        dict.__delitem__(self, token)

    def pop(self, token: bytes, default: object = _MISSING) -> Push:
        if token in self:
            push = dict.pop(self, token)
            self.frame_bytes -= len(push.frame)
            return push
        if default is _MISSING:
            raise KeyError(token)
        return default  # type: ignore[return-value]

    def update(self, items: object = ()) -> None:
        pairs = items.items() if isinstance(items, dict) else items
        for token, push in pairs:  # type: ignore[attr-defined]
            self[token] = push

    def clear(self) -> None:
        dict.clear(self)
        self.frame_bytes = 0


class Delivery:
    __slots__ = ("registry", "loop", "config", "waiting", "delayed_bytes", "timer", "_seq",
                 "flushed", "reserved_pushes", "reserved_bytes")

    def __init__(self, registry: Registry, loop: "Loop", config: "ServeConfig") -> None:
        self.registry = registry
        self.loop = loop
        self.config = config
        if not isinstance(registry.pending, PendingPushes):
            registry.pending = PendingPushes(registry.pending.items())
        # (deadline, sequence, token, push): a heap, earliest deadline first; the sequence
        # keeps equal deadlines in arrival order and never compares pushes.
        self.waiting: list[tuple[float, int, bytes, Push]] = []
        self.delayed_bytes = 0
        self.timer: "Timer | None" = None  # armed for waiting[0]'s deadline
        self._seq = 0
        self.flushed = False  # a drain began: no push waits for a timer any more
        # Room held for pushes peers promised (module docstring): counted as taken.
        self.reserved_pushes = 0
        self.reserved_bytes = 0

    @property
    def delayed(self) -> int:
        """Pushes waiting out their delivery delay."""
        return len(self.waiting)

    def accept(self, token: bytes, push: Push, delay: float) -> Accepted:
        """Deliver now or after ``delay``; QUEUE_FULL when a bounded queue is full (→ 503)."""
        if delay > 0 and not self.flushed:
            if len(self.waiting) + self.reserved_pushes >= self.config.max_delayed \
                    or not self._has_room(token, push):
                return QUEUE_FULL
            self._wait(token, push, self.loop.now + delay)
            return HELD
        registry = self.registry
        stream = registry.streams.get(token)
        if stream is not None:  # online: written now, no queue bound applies (the hot path)
            registry.write_live(stream, push)
            return HELD
        if not self._has_room(token, push):
            return QUEUE_FULL
        registry.deliver(token, push)
        return HELD

    def take_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                   delay: float = 0.0, answer: Any = None, request: Any = None,
                   apns_id: bytes = b"") -> Accepted:
        """``LocalOwner.take_plain``, every push for a token this worker owns: with no delay,
        written to the token's live stream at once with no ``Push`` made (unless part of the
        frame stays queued), else ``accept``. ``received`` is the loop turn's ``now`` for a
        push received in it (latency 0: the first bucket), or when a peer received it
        (``time.monotonic()``, any process's). The answer is the caller's: ``answer``,
        ``request`` and ``apns_id`` are the ``Owner`` signature's, unused here."""
        if not delay:
            registry = self.registry
            stream = registry.streams.get(token)
            if stream is not None and stream.out is None:  # no backlog: a write of our own
                # Stream.send's write of a whole frame, here without a call or a Push.
                try:
                    written = _write(stream.fd, frame)
                except BlockingIOError:
                    written = 0
                except STREAM_GONE:  # its device went away: accept's send closes it
                    written = -1
                if written >= 0:
                    stats = registry.stats
                    stats.delivered_live += 1
                    now = self.loop.now  # received == now: latency 0, no bisect to find it
                    stats.latency[SAME_TURN if received == now
                                  else bisect_right(LATENCY_BOUNDS, now - received)] += 1
                    if written != len(frame):
                        stream.keep_rest(frame, written, Push(frame, expires, received))
                    if registry.log is not None:
                        registry.log.record(DELIVERED, stream.token, frame, expires)
                    return HELD
        return self.accept(token, Push(frame, expires, received), delay)

    def _has_room(self, token: bytes, push: Push) -> bool:
        """The pending store is bounded (--max-pending, --max-pending-bytes); pushes already
        counted in it or in the delay queue reserve their place, so a push answered 200 is never
        dropped later."""
        registry = self.registry
        if token in registry.streams or token in registry.pending or push.expires <= 0:
            return True
        pending = registry.pending
        config = self.config
        if len(pending) + len(self.waiting) + self.reserved_pushes >= config.max_pending:
            return False
        stored = pending.frame_bytes if isinstance(pending, PendingPushes) else 0
        return stored + self.delayed_bytes + self.reserved_bytes + len(push.frame) \
            <= config.max_pending_bytes

    def _wait(self, token: bytes, push: Push, deadline: float) -> None:
        self._seq += 1
        heapq.heappush(self.waiting, (deadline, self._seq, token, push))
        self.delayed_bytes += len(push.frame)
        if self.registry.log is not None:
            self.registry.log.record(DELAYED, token, push.frame, push.expires)
        if self.waiting[0][1] == self._seq:  # the new earliest: the timer moves up
            self._arm()

    def _arm(self) -> None:
        self.loop.cancel(self.timer)
        self.timer = None
        if self.waiting:
            self.timer = self.loop.call_later(max(0.0, self.waiting[0][0] - self.loop.now),
                                              self._deliver_due)

    def _deliver_due(self) -> None:
        self.timer = None
        now = self.loop.now
        waiting = self.waiting
        while waiting and waiting[0][0] <= now:
            self._deliver_first()
        self._arm()

    def _deliver_first(self) -> None:
        _deadline, _seq, token, push = heapq.heappop(self.waiting)
        self.delayed_bytes -= len(push.frame)
        self.registry.deliver(token, push)

    def flush_delayed(self) -> None:
        """Deliver (or keep pending) every push still waiting out its delivery delay, in
        deadline order: they were answered 200, so a stop must not drop them. From now on a
        delayed push is delivered or kept at once (see the module docstring)."""
        self.flushed = True
        self.loop.cancel(self.timer)
        self.timer = None
        while self.waiting:
            self._deliver_first()
