"""Which device is online here, and the one pending push each offline device may have. No I/O.

Rules (APNs store-and-forward, ``apns-and-sse.md`` §A.11; Fleet's mock §3.1):
- Device online → the push is written to its stream now ("delivered live").
- Offline → kept as the token's single pending push; a newer push replaces it ("coalesced").
- ``expires`` ≤ now (``apns-expiration: 0`` or a past time) → deliver now or discard, never kept.
- A pending push is handed to the next stream for its token, right after the stream's head
  ("delivered on connect"), unless it expired meanwhile ("expired").
- Newest stream wins: attaching a stream closes the older one for the same token; a push the
  older stream had not finished writing comes back as pending and goes to the new stream.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from rawsse.server.stats import Stats


class Push:
    """One accepted push as it travels: the encoded SSE event and its absolute expiry."""

    __slots__ = ("frame", "expires")

    def __init__(self, frame: bytes, expires: float) -> None:
        self.frame = frame
        self.expires = expires  # unix seconds; 0 = deliver now or discard


class Registry:
    __slots__ = ("streams", "pending", "stats", "_sweep_iter")

    def __init__(self, stats: Stats) -> None:
        self.streams: dict[bytes, Any] = {}
        self.pending: dict[bytes, Push] = {}
        self.stats = stats
        self._sweep_iter: Iterator[bytes] | None = None

    # -- streams ------------------------------------------------------------------------------

    def attach(self, stream: Any) -> None:
        """Make ``stream`` the token's current stream and give it the pending push, if any."""
        token = stream.token
        older = self.streams.get(token)
        if older is not None:
            self.stats.takeovers += 1
            older.close("takeover")  # detaches itself and requeues its unsent push
        self.streams[token] = stream
        push = self.pending.pop(token, None)
        if push is None:
            return
        if push.expires < time.time():
            self.stats.expired += 1
            return
        self.stats.delivered_on_connect += 1
        stream.send(push.frame, push)

    def detach(self, stream: Any) -> None:
        """Forget ``stream`` if it is still the current one (a replaced stream must not evict
        its successor: Fleet's StaleUnsubscribeDoesNotEvictReplacement)."""
        if self.streams.get(stream.token) is stream:
            del self.streams[stream.token]

    def online(self, token: bytes) -> bool:
        return token in self.streams

    # -- pushes -------------------------------------------------------------------------------

    def deliver(self, token: bytes, push: Push) -> None:
        """Write ``push`` to the token's stream, or keep it pending, or discard it."""
        stream = self.streams.get(token)
        if stream is not None:
            self.stats.delivered_live += 1
            stream.send(push.frame, push)
            return
        self.store(token, push)

    def store(self, token: bytes, push: Push) -> None:
        if push.expires <= 0 or push.expires < time.time():
            self.stats.discarded += 1
            return
        if self.pending.get(token) is not None:
            self.stats.coalesced += 1
        else:
            self.stats.stored += 1
        self.pending[token] = push

    def requeue(self, token: bytes, push: Push) -> None:
        """A stream ended before ``push`` was all written: keep it for the next stream, unless
        a newer push is already pending (newest wins) or it was deliver-now-or-discard."""
        self.stats.requeued += 1
        if push.expires <= 0 or push.expires < time.time():
            self.stats.discarded += 1
            return
        if token in self.pending:
            self.stats.coalesced += 1
            return
        stream = self.streams.get(token)
        if stream is not None:  # a newer stream is already attached: give it straight away
            self.stats.delivered_live += 1
            stream.send(push.frame, push)
            return
        self.keep_requeued(token, push)

    def keep_requeued(self, token: bytes, push: Push) -> None:
        """Where a taken-back push waits for the device: here, pending (Redis mode: Redis)."""
        self.pending[token] = push

    def broadcast(self, frame: bytes, prefix: bytes | str = b"") -> int:
        """Write one shared ``frame`` to every stream (or those whose token starts with
        ``prefix``: raw bytes for an even-length hex prefix, the hex text for an odd one)."""
        if not prefix:
            targets = list(self.streams.values())
        elif isinstance(prefix, bytes):
            targets = [s for t, s in self.streams.items() if t.startswith(prefix)]
        else:
            targets = [s for t, s in self.streams.items() if t.hex().startswith(prefix)]
        written = 0
        for stream in targets:
            if stream.send(frame):
                written += 1
        return written

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
            if push is not None and push.expires < now:
                del pending[token]
                dropped += 1
        self.stats.expired += dropped
        return dropped
