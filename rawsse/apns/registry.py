"""Which device is online here, and where a push waits while its device is not. Its only I/O
is the streams' own: a push written live goes through ``Stream.send``.

Rules (APNs store-and-forward: Apple, "Sending notification requests to APNs", apns-expiration;
the same as Fleet's mock, fleetdm/fleet cmd/apple-apns-mock):
- Device online → the push is written to its stream now ("delivered live").
- Offline → kept as the token's single pending push; a newer push replaces it ("coalesced").
- ``expires`` ≤ now (``apns-expiration: 0`` or a past time) → deliver now or discard, never kept.
- A pending push is handed to the next stream for its token, right after the stream's head
  ("delivered on connect"), unless it expired meanwhile ("expired").
- Newest stream wins: attaching a stream closes the older one for the same token; a push the
  older stream had not finished writing comes back as pending and goes to the new stream.

Where a push waits is the ``PendingStore``: in this worker (``LocalPending`` below),
or in Redis for a node of a cluster (``rawsse.cluster.routing.RedisPending``). The registry
decides *whether* a push waits; the store decides *where*.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from typing import TYPE_CHECKING, Iterator, Protocol

from rawsse.server.latency import BOUNDS as LATENCY_BOUNDS
from rawsse.apns.deliverylog import (
    DELIVERED, DELIVERED_ON_CONNECT, DISCARDED, EXPIRED, REPLACED, REQUEUED, STORED,
)
from rawsse.server.stats import Stats
from rawsse.server.stream import Stream

if TYPE_CHECKING:
    from rawsse.apns.deliverylog import DeliveryLog

# The latency bucket of a push written in the loop turn that received it
# (``Delivery.take_plain``).
SAME_TURN = bisect_right(LATENCY_BOUNDS, 0.0)


class Push:
    """One accepted push as it travels: the encoded SSE event, its absolute expiry, and when it
    was received (``time.monotonic()`` seconds, for the delivery latency: ``latency.py``)."""

    __slots__ = ("frame", "expires", "received")

    def __init__(self, frame: bytes, expires: float, received: float) -> None:
        self.frame = frame
        self.expires = expires  # unix seconds; 0 = deliver now or discard
        self.received = received

    def expired(self, now: float) -> bool:
        """Past its ``apns-expiration`` (always, for 0: deliver now or discard)."""
        return self.expires < now


class Clock(Protocol):
    """What dates a delivery: the worker's ``Loop`` (``now``: monotonic, once per turn)."""

    now: float


class PendingStore(Protocol):
    """Where a push waits for its device, and what a stream is handed when it attaches."""

    def attached(self, stream: "Stream") -> None:
        """``stream`` became its token's current stream: give it the push waiting for it."""

    def detached(self, token: bytes) -> None:
        """The token has no stream here any more."""

    def store(self, token: bytes, push: Push) -> None:
        """Keep ``push`` (not expired) for an offline device; newest wins."""

    def store_requeued(self, token: bytes, push: Push) -> None:
        """Keep ``push`` taken back from an ended stream, unless a newer one waits already."""


class Registry:
    __slots__ = ("streams", "pending", "stats", "clock", "store", "log", "_sweep_iter")

    def __init__(self, stats: Stats, clock: "Clock") -> None:
        """``clock``: the worker's ``Loop``, whose ``now`` (monotonic, read once per loop turn)
        dates deliveries for the latency histogram: an attribute read where ``time.monotonic()``
        is a call, 68 ns a push (``python -m timeit -s "import time" "time.monotonic()"``)."""
        self.streams: dict[bytes, Stream] = {}
        # Pushes held in this process: every pending push (one worker, a prefork node), or the
        # ones Redis could not take yet (a cluster node).
        self.pending: dict[bytes, Push] = {}
        self.stats = stats
        self.clock = clock
        self.store: PendingStore = LocalPending(self)
        # Where each push's outcome is recorded (--delivery-log); None when it is off.
        self.log: DeliveryLog | None = None
        self._sweep_iter: Iterator[bytes] | None = None

    # -- streams ------------------------------------------------------------------------------

    def attach(self, stream: "Stream") -> None:
        """Make ``stream`` the token's current stream and give it what waits for it."""
        token = stream.token
        older = self.streams.get(token)
        if older is not None:
            self.stats.takeovers += 1
            older.close("takeover")  # detaches itself and requeues its unsent push
        self.streams[token] = stream
        self.store.attached(stream)

    def detach(self, stream: "Stream") -> None:
        """Forget ``stream`` if it is still the current one (a replaced stream must not evict
        its successor: Fleet's StaleUnsubscribeDoesNotEvictReplacement test)."""
        if self.streams.get(stream.token) is stream:
            del self.streams[stream.token]
            self.store.detached(stream.token)

    def hand_pending(self, stream: "Stream") -> None:
        """Write the push held here for ``stream``'s token, if any and not expired."""
        push = self.pending.pop(stream.token, None)
        if push is None:
            return
        log = self.log
        if push.expired(time.time()):
            self.stats.expired += 1
            if log is not None:
                log.record(EXPIRED, stream.token, push.frame, push.expires)
            return
        self.stats.delivered_on_connect += 1
        if stream.send(push.frame, push) and log is not None:
            log.record(DELIVERED_ON_CONNECT, stream.token, push.frame, push.expires)

    # -- pushes -------------------------------------------------------------------------------

    def deliver(self, token: bytes, push: Push) -> None:
        """Write ``push`` to the token's stream, or let it wait, or discard it."""
        stream = self.streams.get(token)
        if stream is not None:
            self.write_live(stream, push)
        elif push.expired(time.time()):
            self.stats.discarded += 1
            if self.log is not None:
                self.log.record(DISCARDED, token, push.frame, push.expires)
        else:
            self.store.store(token, push)

    def write_live(self, stream: Stream, push: Push) -> None:
        """Write ``push`` to its device's open stream, and count it: the latency histogram (the
        live view) and the delivery log (``/admin/deliveries``)."""
        stats = self.stats
        stats.delivered_live += 1
        stats.latency[bisect_right(LATENCY_BOUNDS, self.clock.now - push.received)] += 1
        # The stream's token, not the request's: the log then keeps no token of its own.
        if stream.send(push.frame, push) and self.log is not None:
            self.log.record(DELIVERED, stream.token, push.frame, push.expires)

    def keep(self, token: bytes, push: Push, newly_stored: bool = True) -> None:
        """Hold ``push`` here (newest wins): the local store, and a cluster's fallback (whose
        push was counted when Redis was first asked: ``newly_stored=False``)."""
        log = self.log
        if push.expired(time.time()):
            self.stats.discarded += 1
            if log is not None:
                log.record(DISCARDED, token, push.frame, push.expires)
            return
        older = self.pending.get(token)
        if older is not None:
            self.stats.coalesced += 1
            if log is not None:
                log.record(REPLACED, token, older.frame, older.expires)
        elif newly_stored:
            self.stats.stored += 1
        self.pending[token] = push
        if log is not None:
            log.record(STORED, token, push.frame, push.expires)

    def requeue(self, token: bytes, push: Push) -> None:
        """A stream ended before ``push`` was all written: keep it for the next stream, unless
        a newer push is already pending (newest wins) or it was deliver-now-or-discard."""
        self.stats.requeued += 1
        log = self.log
        if push.expired(time.time()):
            self.stats.discarded += 1
            if log is not None:
                log.record(DISCARDED, token, push.frame, push.expires)
            return
        if token in self.pending:
            self.stats.coalesced += 1
            if log is not None:
                log.record(REPLACED, token, push.frame, push.expires)
            return
        stream = self.streams.get(token)
        if stream is not None:  # a newer stream is already attached: give it straight away
            self.stats.delivered_live += 1
            if stream.send(push.frame, push) and log is not None:
                log.record(DELIVERED, stream.token, push.frame, push.expires)
            return
        if log is not None:
            log.record(REQUEUED, token, push.frame, push.expires)
        self.store.store_requeued(token, push)

    def broadcast(self, frame: bytes, prefix: bytes | str = b"") -> tuple[int, int, int]:
        """Write one shared ``frame`` to every stream (or those whose token starts with
        ``prefix``: raw bytes for an even-length hex prefix, the hex text for an odd one).
        (written, refused, deferred): a refusing stream ended instead (a reader too far behind
        is closed as for any push, ``Stream.send``; or its device had gone); a deferred one
        took part of the frame, the rest follows when its socket is writable."""
        if not prefix:
            targets = list(self.streams.values())
        elif isinstance(prefix, bytes):
            targets = [s for t, s in self.streams.items() if t.startswith(prefix)]
        else:
            targets = [s for t, s in self.streams.items() if t.hex().startswith(prefix)]
        refused, deferred = Stream.send_to_all(targets, frame)
        return len(targets) - refused, refused, deferred

    # -- expiry -------------------------------------------------------------------------------

    def sweep_expired(self, now: float, budget: int) -> int:
        """Drop up to ``budget`` inspected pending pushes that expired; resumable across calls
        so a sweep over a million entries never stalls the loop (one slice per tick)."""
        pending = self.pending
        if self._sweep_iter is None:
            self._sweep_iter = iter(list(pending))
        dropped = 0
        for _ in range(budget):
            token = next(self._sweep_iter, None)
            if token is None:
                self._sweep_iter = None
                break
            push = pending.get(token)
            if push is not None and push.expired(now):
                del pending[token]
                dropped += 1
                if self.log is not None:
                    self.log.record(EXPIRED, token, push.frame, push.expires)
        self.stats.expired += dropped
        return dropped


class LocalPending:
    """Pushes wait in this process (``Registry.pending``), one per token, newest wins."""

    __slots__ = ("registry",)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def attached(self, stream: "Stream") -> None:
        self.registry.hand_pending(stream)

    def detached(self, token: bytes) -> None:
        pass

    def store(self, token: bytes, push: Push) -> None:
        self.registry.keep(token, push)

    def store_requeued(self, token: bytes, push: Push) -> None:
        self.registry.pending[token] = push
