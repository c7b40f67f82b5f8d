"""``GET /stats/events``: the node's figures as an SSE stream, one ``data:`` event a second.

Theory of operation
-------------------
The route (``rawsse.apns.operator``) turns the request's connection into a stream as a device's
``GET /events`` does (``request.become_stream``), for ``VIEWER_TOKEN``: the empty token, which no
device can have (``validation.parse_token`` refuses it). The routers place a stream with its
token's owner, and the owner of the empty token is worker 0 (``owner_of``: CRC-32 of no bytes
is 0), so every viewer of a node, whichever worker accepted it, ends here on worker 0 (handed
over with its socket, ``SCM_RIGHTS``, like a device), and ``Worker.open_stream`` or
``adopt_stream`` gives it to this object instead of the registry.

One collection a second for the whole node, however many watch: while at least one viewer is
open, a 1-second timer asks the router for the node's ``/stats`` document (every worker, and in
Redis mode the cluster's view), turns it into figures (``figures.py``) and writes the same
frame to every viewer. The first viewer gets a collection at once; later ones get the last frame
right after the head. No viewer, no timer, no collection.

Bounded: at most ``MAX_VIEWERS`` viewers per node (one more is answered 503 with a JSON reason
and closed); a viewer whose socket has not taken the previous frame gets no new one (a
dashboard wants the latest figures, not a backlog), so each holds at most one frame's bytes, and
one that has taken nothing for ``STALL_SECONDS`` is closed. Viewers are not device streams:
they are in no registry and in no stream count or close reason of ``/stats`` (one handed over
from another worker counts in its ``handoffs``, as the hand-off it is). Over HTTP/2 the route is
refused (505, its detail naming the route): browsers speak HTTP/2 over TLS only, and the operator
listener is plain TCP.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import orjson

from rawsse.apns import answers
from rawsse.server import http1_wire, sse
from rawsse.server.figures import Figures
from rawsse.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, READ_EVENTS, WRITE_EVENTS

if TYPE_CHECKING:
    from rawsse.server.loop import Timer
    from rawsse.server.worker import Worker

VIEWER_TOKEN = b""
MAX_VIEWERS = 16
INTERVAL_SECONDS = 1.0
STALL_SECONDS = 30
RETRY_MS = 1000  # the browser's EventSource reconnects after this (WHATWG HTML §9.2)

HEAD = sse.SSE_HEAD + b"retry: %d\n\n" % RETRY_MS
TOO_MANY = http1_wire.serialize(
    answers.json(503, {"reason": "ServiceUnavailable",
                       "detail": f"at most {MAX_VIEWERS} /stats/events viewers per node"}),
    http1_wire.CLOSE)

_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class Viewer:
    """One open ``/stats/events`` stream: its socket and the rest of a frame it has not taken."""

    __slots__ = ("fd", "hub", "out", "stalled", "writing")

    def __init__(self, fd: int, hub: "StatsEvents") -> None:
        self.fd = fd
        self.hub = hub
        self.out = b""
        self.stalled = 0  # frames skipped in a row because ``out`` was not written yet
        # registered for EPOLLOUT; True at first so the first write sets the events either way
        self.writing = True

    def send(self, frame: bytes) -> None:
        if self.out:
            self.stalled += 1
            if self.stalled > STALL_SECONDS / INTERVAL_SECONDS:
                self.close()
            return
        self.stalled = 0
        self.out = frame
        self._write()

    def _write(self) -> None:
        try:
            written = os.write(self.fd, self.out)
        except BlockingIOError:
            written = 0
        except (_GONE + (OSError,)):
            self.close()
            return
        self.out = self.out[written:]
        if self.writing != bool(self.out):
            self.writing = bool(self.out)
            self.hub.worker.loop.modify(self.fd, WRITE_EVENTS if self.out else READ_EVENTS)

    def handle_events(self, events: int) -> None:
        if events & EPOLLOUT and self.out:
            self._write()
        if self.fd >= 0 and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            try:
                data = os.read(self.fd, 4096)  # a viewer sends nothing we read
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()

    def close(self) -> None:
        fd = self.fd
        if fd < 0:
            return
        self.fd = -1
        self.hub.worker.loop.remove(fd)
        try:
            os.close(fd)
        except OSError:
            pass
        self.hub.viewers.discard(self)


class StatsEvents:
    """The viewers of this node (on worker 0) and their once-a-second collection."""

    __slots__ = ("worker", "viewers", "figures", "timer", "collecting", "last_frame")

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.viewers: set[Viewer] = set()
        self.figures = Figures()
        self.timer: "Timer | None" = None
        self.collecting = False
        self.last_frame = b""

    def adopt(self, fd: int, leftover: bytes, registered: bool) -> None:
        """A viewer's socket (``registered``: still in the loop for its HTTP connection) after
        any earlier answers still owed on it (``leftover``)."""
        loop = self.worker.loop
        if len(self.viewers) >= MAX_VIEWERS:
            if registered:
                loop.remove(fd)
            try:
                os.write(fd, leftover + TOO_MANY)
            except OSError:
                pass
            os.close(fd)
            return
        viewer = Viewer(fd, self)
        if registered:
            loop.replace(fd, viewer)
        else:
            loop.add(fd, viewer, READ_EVENTS)
        self.viewers.add(viewer)
        viewer.send(leftover + HEAD + self.last_frame)
        if self.timer is None:
            self._tick()

    def _tick(self) -> None:
        if not self.viewers:
            self.timer = None
            self.last_frame = b""
            self.figures.reset()
            return
        self.timer = self.worker.loop.call_later(INTERVAL_SECONDS, self._tick)
        if not self.collecting:  # a collection slower than a second is not doubled up
            self.collecting = True
            self.worker.router.collect_stats(self._collected)

    def _collected(self, document: dict[str, Any]) -> None:
        self.collecting = False
        if not self.viewers:
            return
        frame = b"data: " + orjson.dumps(self.figures.update(document)) + b"\n\n"
        self.last_frame = frame
        for viewer in list(self.viewers):
            viewer.send(frame)
