"""One HTTP/1.1 keep-alive connection of ``rawsse push`` (``Sender``), and the connection life
every sender shares: a non-blocking connect, a failure counted by kind (``connect_*`` before it was
up, ``lost_*`` for pushes in flight, ``disconnect_*`` when idle), then a reconnect after a doubling
backoff. ``rawsse.load.h2sender`` builds its HTTP/2 connection on the same life.
"""

from __future__ import annotations

import collections
import errno
import socket
import ssl
from typing import TYPE_CHECKING, Any

import httptools

from rawsse.load import loadgen
from rawsse.load.loadgen import CLOSED, CONNECTING, READY
from rawsse.server.loop import EPOLLOUT, READ_EVENTS, WRITE_EVENTS

if TYPE_CHECKING:
    from rawsse.load.driver import Driver

RECV_SIZE = 64 * 1024
RECONNECT_MIN, RECONNECT_MAX = 0.05, 2.0


class Sender:
    """One keep-alive connection; the httptools protocol object for its responses."""

    __slots__ = ("driver", "sock", "state", "parser", "inflight", "out", "body", "backoff",
                 "timer", "closing", "since")

    def __init__(self, driver: "Driver") -> None:
        self.driver = driver
        self.sock: socket.socket | None = None
        self.state = CLOSED
        self.parser: Any = None
        self.inflight: collections.deque[tuple[float, float]] = collections.deque()  # (sched, sent)
        self.out: memoryview | None = None
        self.body: list[bytes] = []
        self.backoff = RECONNECT_MIN
        self.timer: list | None = None
        self.closing = False
        self.since = 0.0  # when the connect began: one that hangs is ended after --timeout

    def connect(self) -> None:
        self.timer = None
        driver = self.driver
        if driver.finished:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        err = sock.connect_ex(driver.address)
        if err not in (0, errno.EINPROGRESS):
            self._fail(loadgen.error_kind(err, "connect"))
            return
        self.state = CONNECTING
        self.since = driver.loop.now
        self.parser = httptools.HttpResponseParser(self)
        self.closing = False
        driver.loop.add(sock.fileno(), self, WRITE_EVENTS)

    def handle_events(self, events: int) -> None:
        sock = self.sock
        assert sock is not None  # registered with the loop only while it has a socket
        if self.state == CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(loadgen.error_kind(err, "connect"))
                return
            self.state = READY
            self.backoff = RECONNECT_MIN
            self.driver.last_up = self.driver.loop.now
            self.driver.ever_up = True
            self.driver.loop.modify(sock.fileno(), READ_EVENTS)
            self.driver.request_pump()
            return
        if events & EPOLLOUT and self.out is not None:
            self._flush(sock, self.out, first=False)
        if self.state == READY and events & ~EPOLLOUT:
            self._read(sock)

    def request(self, k: int, path_token: bytes | None, serial: bytes, stamp_at: float,
                scheduled: float, now: float) -> bytes:
        """The bytes of push ``k``, now in flight on this connection."""
        self.inflight.append((scheduled, now))
        return self.driver.builder.build(path_token, serial, stamp_at)

    def write(self, data: bytes) -> None:
        assert self.sock is not None and self.out is None  # free_slots promised both
        self._flush(self.sock, memoryview(data), first=True)

    def _flush(self, sock: socket.socket, out: memoryview, first: bool) -> None:
        """Send what is buffered; wait for EPOLLOUT only while bytes remain (rawsse.server.loop rules)."""
        try:
            sent = sock.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(loadgen.error_kind(exc.errno, "send"))
            return
        if sent < len(out):
            self.out = out[sent:]
            if first:
                self.driver.loop.modify(sock.fileno(), WRITE_EVENTS)
        else:
            self.out = None
            if not first:
                self.driver.loop.modify(sock.fileno(), READ_EVENTS)

    def _receive(self, sock: socket.socket) -> bytes | None:
        """What the server sent, or None: nothing yet (plain or TLS), or the connection failed
        (then ``sock`` is gone)."""
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError as exc:
            self._fail(loadgen.error_kind(exc.errno, "recv"))
            return None
        if not data:
            self._fail("closed")
            return None
        return data

    def _read(self, sock: socket.socket) -> None:
        data = self._receive(sock)
        if data is None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("bad_response")
            return
        if self.closing:  # the server said Connection: close
            self._fail("closed")
        else:
            self.driver.request_pump()

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.inflight:  # an answer to nothing we asked: the connection is out of step
            self.closing = True
            return
        scheduled, _ = self.inflight.popleft()
        body = b"".join(self.body) if self.body else b""
        self.body = []
        self.driver.record(self.parser.get_status_code(), body, scheduled)
        if not self.parser.should_keep_alive():
            self.closing = True

    def check_timeout(self, now: float, timeout: float) -> None:
        if self.state == CONNECTING and now - self.since > timeout:  # a black-holed address
            self._fail("timeout")
        elif self.inflight and now - self.inflight[0][1] > timeout:
            self._fail("timeout")

    def close(self, reason: str = "closed") -> None:
        """The loop's handler interface (a handler that raised is closed with "error")."""
        self._fail(reason)

    def _fail(self, kind: str) -> None:
        driver = self.driver
        if self.state != READY:
            driver.count_error(f"connect_{kind}")
        elif self.inflight:
            driver.count_error(f"lost_{kind}", len(self.inflight))
            self.inflight.clear()
        else:  # an idle connection ended (the server's idle timeout, a restart)
            driver.count_error(f"disconnect_{kind}")
        self.shutdown()
        if not driver.finished:
            self.timer = driver.loop.call_later(self.backoff, self.connect)
            self.backoff = min(self.backoff * 2, RECONNECT_MAX)
        driver.check_done()

    def shutdown(self) -> None:
        self.driver.loop.cancel(self.timer)
        self.timer = None
        sock, self.sock = self.sock, None
        if sock is not None:
            self.driver.loop.remove(sock.fileno())
            sock.close()
        self.state = CLOSED
        self.out = None
        self.body = []

    @property
    def free_slots(self) -> int:
        if self.state != READY or self.out is not None or self.closing:
            return 0
        return self.driver.pipeline - len(self.inflight)
