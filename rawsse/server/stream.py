"""A device's SSE stream once its request is answered: an fd, a token, and unsent bytes.

Theory of operation
-------------------
An HTTP/1.1 connection (``http1.py``) that completes a valid ``GET /events`` becomes a ``Stream``: the
parser and every request field are dropped, and the fd's epoll entry is routed to this object.
A stream never parses again; bytes a device sends are read and thrown away, and a read of 0
(peer closed) or an error ends it at once, so a vanished device frees its token without waiting
for the next keepalive (Fleet's mock, fleetdm/fleet cmd/apple-apns-mock, notices only on write).

Rules
-----
- Send first, buffer the rest: ``os.write`` straight away; only what the kernel did not take is
  copied into ``out`` and only then is ``EPOLLOUT`` requested (asyncio's write template). A
  broadcast does the same for every stream in one loop (``send_to_all``), with no call per
  stream that has nothing queued.
- ``held`` is the newest push whose bytes are not all in the kernel yet. A stream that ends with
  ``held`` set hands it back to the registry as pending: nothing accepted is silently lost.
- ``out`` is bounded (``--stream-buffer``): a reader that falls further behind is closed and its
  push kept (nothing accepted is lost).
- Per-stream state is four slots (measured ~64 B object + dict entries + token bytes); every byte
  here is multiplied by 300,000. What all streams of a process share (its worker, the buffer
  limit) lives on the class, set once by ``Stream.bind``: a slot for it would cost 2.4 MB at
  300,000 streams.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

from rawsse.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, READ_EVENTS, WRITE_EVENTS

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

# Errors that mean "the device went away": counted, never logged (tornado's errno sets).
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
STREAM_GONE = _GONE  # for a write made outside (Delivery.take_plain, the push's hot path)

_DISCARD_SIZE = 4096


class Stream:
    __slots__ = ("fd", "token", "out", "held")

    # Shared by every stream of this process (``bind``).
    worker: ClassVar["Worker"]
    limit: ClassVar[int] = 64 * 1024

    @classmethod
    def bind(cls, worker: "Worker", limit: int) -> None:
        """The worker whose loop, stats and registry this process's streams use; the most
        unsent bytes a stream may hold (``--stream-buffer``)."""
        cls.worker = worker
        cls.limit = limit

    def __init__(self, fd: int, token: bytes) -> None:
        self.fd = fd
        self.token = token
        self.out: bytearray | None = None
        self.held: Any = None  # registry.Push not yet fully in the kernel

    # -- writing ------------------------------------------------------------------------------

    def send(self, data: bytes, push: Any = None) -> bool:
        """Write ``data`` (a frame); ``push`` when it carries one. False if the stream ended."""
        out = self.out
        if out is not None:
            if push is not None:
                self.held = push
            if len(out) + len(data) > self.limit:
                self.worker.stats.slow_reader_closes += 1
                self.close("slow_reader")
                return False
            out += data
            return True
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except _GONE:
            if push is not None:
                self.held = push
            self.close("client")
            return False
        if written != len(data):
            self.keep_rest(data, written, push)
        return True

    def keep_rest(self, data: bytes, written: int, push: Any) -> None:
        """Hold what the kernel did not take of ``data`` until the socket is writable."""
        if push is not None:
            self.held = push
        self.out = bytearray(memoryview(data)[written:])
        self.worker.loop.modify(self.fd, WRITE_EVENTS)

    def _flush(self) -> None:
        out = self.out
        if out is None:
            return
        try:
            written = os.write(self.fd, out)
        except BlockingIOError:
            return
        except _GONE:
            self.close("client")
            return
        del out[:written]
        if not out:
            self.out = None
            self.held = None
            self.worker.loop.modify(self.fd, READ_EVENTS)

    @staticmethod
    def send_to_all(streams: list["Stream"], frame: bytes) -> tuple[int, int]:
        """Write one shared ``frame`` (a broadcast) to each of ``streams``: (refused, deferred),
        the streams that ended instead (``send``'s rules) and those whose socket took only part
        of it (the rest waits in ``out``). A stream with nothing queued, nearly every one, costs
        an attribute test and one ``os.write`` here: no call, no object, no counter of its own
        (written = len(streams) - refused)."""
        size = len(frame)
        refused = deferred = 0
        write = os.write
        for stream in streams:
            if stream.out is None:
                try:
                    n = write(stream.fd, frame)
                except BlockingIOError:
                    n = 0
                except _GONE:
                    stream.close("client")
                    refused += 1
                    continue
                if n != size:
                    stream.keep_rest(frame, n, None)
                    deferred += 1
            elif not stream.send(frame):
                refused += 1
        return refused, deferred

    # -- events -------------------------------------------------------------------------------

    def handle_events(self, events: int) -> None:
        if events & EPOLLOUT:
            self._flush()
            if self.fd < 0:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self._read()

    def _read(self) -> None:
        try:
            data = os.read(self.fd, _DISCARD_SIZE)
        except BlockingIOError:
            return
        except (_GONE + (OSError,)):
            self.close("client")
            return
        if not data:
            self.close("client")

    # -- ending -------------------------------------------------------------------------------

    def close(self, reason: str = "client") -> None:
        """End the stream once: unregister, close the fd, give back an unsent push."""
        fd = self.fd
        if fd < 0:
            return
        self.fd = -1
        worker = self.worker
        worker.loop.remove(fd)
        try:
            os.close(fd)
        except OSError:
            pass
        worker.stats.disconnect(reason)
        worker.registry.detach(self)
        held, self.held, self.out = self.held, None, None
        if held is not None:
            worker.registry.requeue(self.token, held)
