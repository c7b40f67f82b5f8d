"""The event loop: ``select.epoll`` + a dict of handlers + a lazy-cancel timer heap.

Theory of operation
-------------------
One ``Loop`` runs per process. It knows nothing about HTTP: it maps file descriptors to handler
objects (a list indexed by fd: descriptors are small dense integers, and a list slot costs 8 bytes
where a dict entry costs ~48, measured per stream at 300,000 streams) and calls
``handler.handle_events(events)`` for each ready fd, runs timers whose time has
come, and runs callbacks queued with ``call_soon`` once per turn (after I/O), which is where
batching happens ("one write per destination per loop turn"). Callbacks queued with
``call_first`` run just before those, so what they queue with ``call_soon`` still runs in the
same turn (the mesh's flush answers requests, whose writes are ``call_soon`` callbacks: without
this each forwarded push cost one more loop turn).

Rules
-----
- Level-triggered epoll. Every handler is registered for ``EPOLLIN`` (reads and peer close) and
  gets ``EPOLLOUT`` only while it holds unsent bytes, so an idle stream costs no wakeups. Level
  triggering is chosen over edge triggering because a handler may stop reading part-way (a
  pipelined client whose responses are not yet written) and must be woken again for what is left
  in the kernel buffer without draining it first.
- ``epoll.poll(timeout, 1024)``: at most 1024 events per wakeup, so a connect storm cannot starve
  timers (tornado caps accepts per wakeup for the same reason).
- Timers are ``[when, seq, callback, args]`` lists in a heap. Cancelling sets the callback to
  ``None`` (lazy cancel, tornado 4.5); the heap is rebuilt when more than half its entries are
  dead, so cancelled delays cannot pile up.
- A handler that raises is logged with its fd and closed; the loop goes on. ``SystemExit`` and
  ``KeyboardInterrupt`` pass through (the asyncio per-callback template). If the handler's own
  close leaves the fd registered (it raised too, or thought the fd was no longer its own), the
  loop unregisters and closes it: a socket dropped without a close sits in CLOSE-WAIT, unanswered,
  until the process runs out of descriptors (issue 12). A code path that takes an fd out of the
  loop to hand it on closes it itself when the hand-on fails (``MeshRouter.place_stream``).
- Signals never run code in the handler: ``signal.set_wakeup_fd`` wakes the loop and the owner of
  the loop polls its flags in a ``call_soon``/``on_wakeup`` hook (gunicorn #3198: logging inside a
  signal handler can deadlock).
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import socket
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
READ_EVENTS = EPOLLIN | EPOLLRDHUP
WRITE_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLOUT

MAX_EVENTS_PER_POLL = 1024
# Longest sleep when no timer is due: bounds how late a flag set by a signal can be noticed if the
# wakeup fd were ever lost, and costs one idle wakeup a second.
MAX_POLL_SECONDS = 1.0


Timer = list  # [when, seq, callback | None, args]


class Loop:
    """A minimal epoll loop with timers and per-turn callbacks."""

    __slots__ = (
        "epoll", "handlers", "timers", "_seq", "_cancelled", "_soon", "_first", "now", "running",
        "_wakeup_r", "_wakeup_w", "on_wakeup",
    )

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: list[Any] = [None] * 1024
        self.timers: list[Timer] = []
        self._seq = 0
        self._cancelled = 0
        self._soon: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._first: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.now = time.monotonic()
        self.running = False
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.on_wakeup: Callable[[], None] | None = None
        self.epoll.register(self._wakeup_r.fileno(), EPOLLIN)

    # -- registration -----------------------------------------------------------------------

    def add(self, fd: int, handler: Any, events: int = READ_EVENTS) -> None:
        """Register ``handler`` for ``fd``."""
        self.epoll.register(fd, events)
        handlers = self.handlers
        if fd >= len(handlers):
            handlers.extend([None] * (fd + 1 - len(handlers) + len(handlers) // 2))
        handlers[fd] = handler

    def replace(self, fd: int, handler: Any) -> None:
        """Route ``fd``'s events to a new handler (an HTTP connection becoming a stream)."""
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self.epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        """Forget ``fd``; the caller closes it. Unregistering a closed fd is not an error here."""
        handlers = self.handlers
        if 0 <= fd < len(handlers) and handlers[fd] is not None:
            handlers[fd] = None
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def wakeup_fd(self) -> int:
        """The write end for ``signal.set_wakeup_fd``."""
        return self._wakeup_w.fileno()

    def wake(self) -> None:
        try:
            self._wakeup_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- timers and callbacks ---------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` after ``delay`` seconds; returns a handle for ``cancel``."""
        self._seq += 1
        timer: Timer = [self.now + delay, self._seq, callback, args]
        heapq.heappush(self.timers, timer)
        return timer

    def cancel(self, timer: Timer | None) -> None:
        if timer is not None and timer[2] is not None:
            timer[2] = None
            timer[3] = ()
            self._cancelled += 1

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at the end of this loop turn, after all I/O events."""
        self._soon.append((callback, args))

    def call_first(self, callback: Callable[..., Any], *args: Any) -> None:
        """Like ``call_soon``, but before this turn's ``call_soon`` callbacks are taken: what
        ``callback`` queues with ``call_soon`` runs in this turn too."""
        self._first.append((callback, args))

    # -- running ------------------------------------------------------------------------------

    def stop(self) -> None:
        self.running = False
        self.wake()

    def run(self) -> None:
        """Turn until ``stop()``."""
        self.running = True
        while self.running:
            self.run_once()

    def run_once(self) -> None:
        timeout = self._poll_timeout()
        try:
            events = self.epoll.poll(timeout, MAX_EVENTS_PER_POLL)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            events = []
        self.now = now = time.monotonic()
        handlers = self.handlers
        wake_fd = self._wakeup_r.fileno()
        for fd, ev in events:
            if fd == wake_fd:
                self._drain_wakeup()
                continue
            handler = handlers[fd]
            if handler is None:
                continue
            try:
                handler.handle_events(ev)
            except (SystemExit, KeyboardInterrupt):
                raise
            except Exception:
                log.exception("handler for fd %d failed; closing it", fd)
                self._close_failed(fd, handler)
        timers = self.timers
        if timers and timers[0][0] <= now:
            self._run_timers(now)
        if self._first:
            first, self._first = self._first, []
            for callback, args in first:
                self._call(callback, args)
        if self._soon:
            self._run_soon()

    def _poll_timeout(self) -> float:
        if self._soon or self._first:
            return 0.0
        timers = self.timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
            self._cancelled -= 1
        if not timers:
            return MAX_POLL_SECONDS
        return max(0.0, min(MAX_POLL_SECONDS, timers[0][0] - time.monotonic()))

    def _run_timers(self, now: float) -> None:
        timers = self.timers
        due = []
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)
            if timer[2] is None:
                self._cancelled -= 1
            else:
                due.append(timer)
        for timer in due:
            callback, args = timer[2], timer[3]
            timer[2] = None
            if callback is None:  # cancelled by an earlier timer of this turn
                continue
            self._call(callback, args)
        if self._cancelled > 512 and self._cancelled > len(timers) // 2:
            self.timers = [t for t in timers if t[2] is not None]
            heapq.heapify(self.timers)
            self._cancelled = 0

    def _run_soon(self) -> None:
        # Snapshot: callbacks queued by these callbacks run next turn (tornado's rule), so a
        # callback that re-queues itself cannot starve I/O.
        soon, self._soon = self._soon, []
        for callback, args in soon:
            self._call(callback, args)

    def _call(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("callback %r failed", callback)

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if self.on_wakeup is not None:
            self._call(self.on_wakeup, ())

    def drop(self, fd: int) -> None:
        """After a failure: close ``fd`` through its handler if one holds it, else directly."""
        handlers = self.handlers
        handler = handlers[fd] if 0 <= fd < len(handlers) else None
        if handler is not None:
            self._close_failed(fd, handler)
            return
        try:
            os.close(fd)
        except OSError:
            pass

    def _close_failed(self, fd: int, handler: Any) -> None:
        try:
            handler.close("error")
        except Exception:
            log.exception("closing a failed handler failed too")
        if self.handlers[fd] is handler:  # still ours: nobody else will ever close it
            self.remove(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        self.epoll.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
