"""The owner's half of a push: accept it into bounded queues, deliver it now or after its delay.

A push is accepted (answered 200) only if it has a place: the token's stream, its pending slot,
or room under ``--max-pending`` pending pushes plus ``--max-delayed`` pushes waiting out a
delivery delay. Past those bounds the answer is 503 (the sender retries), never a 200 that is then
dropped. Delayed pushes are loop timers; a drain delivers (or keeps pending) every one of them
first (``flush_delayed``): they were answered 200.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rawsse.apns.registry import Push, Registry
from rawsse.apns.routing import HELD, QUEUE_FULL, Accepted

if TYPE_CHECKING:
    from rawsse.config import ServeConfig
    from rawsse.server.loop import Loop


class Delivery:
    __slots__ = ("registry", "loop", "config", "delayed")

    def __init__(self, registry: Registry, loop: "Loop", config: "ServeConfig") -> None:
        self.registry = registry
        self.loop = loop
        self.config = config
        self.delayed = 0  # pushes waiting out their delivery delay

    def accept(self, token: bytes, push: Push, delay: float) -> Accepted:
        """Deliver now or after ``delay``; QUEUE_FULL when a bounded queue is full (→ 503)."""
        if delay > 0:
            if self.delayed >= self.config.max_delayed or not self._has_room(token, push):
                return QUEUE_FULL
            self.delayed += 1
            self.loop.call_later(delay, self._deliver_delayed, token, push)
            return HELD
        if not self._has_room(token, push):
            return QUEUE_FULL
        self.registry.deliver(token, push)
        return HELD

    def _has_room(self, token: bytes, push: Push) -> bool:
        """The pending store is bounded (--max-pending); pushes already counted in it or in the
        delay queue reserve their place, so a push answered 200 is never dropped later."""
        registry = self.registry
        if token in registry.streams or token in registry.pending or push.expires <= 0:
            return True
        return len(registry.pending) + self.delayed < self.config.max_pending

    def _deliver_delayed(self, token: bytes, push: Push) -> None:
        self.delayed -= 1
        self.registry.deliver(token, push)

    def flush_delayed(self) -> None:
        """Deliver (or keep pending) every push still waiting out its delivery delay: they were
        answered 200, so a stop must not drop them."""
        for timer in list(self.loop.timers):
            if timer[2] == self._deliver_delayed:
                callback, args = timer[2], timer[3]
                self.loop.cancel(timer)
                callback(*args)
