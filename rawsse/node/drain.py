"""Graceful stop of one worker: stop accepting, finish in-flight pushes, spread stream closes.

300,000 devices told to go at the same instant come back at the same instant (a reconnect storm
that the listen backlog and the devices' backoff must absorb), so streams are closed in equal slices over
``--drain-seconds``. Pushes still waiting out a delivery delay are delivered or kept pending first
(they were answered 200); a stream's unsent push becomes pending when it closes, and pending
pushes are then saved by the caller (state file or the master).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

STEP_SECONDS = 0.1
# In-flight requests (a delayed response, a body still arriving) get this long after the
# streams are gone before their connections are cut.
HTTP_GRACE_SECONDS = 5.0


class Drainer:
    def __init__(self, worker: "Worker", seconds: float, done: Callable[[], None]) -> None:
        self.worker = worker
        self.done = done
        self.finished = False
        worker.stop_accepting()
        worker.delivery.flush_delayed()
        for conn in list(worker.http_conns):
            conn.finish_then_close()
        steps = max(1, int(seconds / STEP_SECONDS))
        self.per_step = max(1, math.ceil(len(worker.registry.streams) / steps))
        self.http_deadline = worker.loop.now + seconds + HTTP_GRACE_SECONDS
        worker.loop.call_soon(self._step)

    def _step(self) -> None:
        if self.finished:
            return
        worker = self.worker
        worker.close_streams(self.per_step)
        if worker.registry.streams or (worker.http_conns and worker.loop.now < self.http_deadline):
            worker.loop.call_later(STEP_SECONDS, self._step)
            return
        self.finish_now()

    def finish_now(self) -> None:
        """Close whatever is left at once (a second SIGTERM, or the window is over)."""
        if self.finished:
            return
        self.finished = True
        worker = self.worker
        worker.close_streams(len(worker.registry.streams))
        for conn in list(worker.http_conns):
            conn.close("shutdown")
        self.done()
