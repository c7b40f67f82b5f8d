"""One HTTP/1.1 keep-alive connection of ``rawsse push`` (``Sender``), and the connection life
every sender shares: a non-blocking connect, a failure counted by kind (``connect_*`` before it was
up, ``lost_*`` for pushes in flight, ``disconnect_*`` when idle), then a reconnect after a doubling
backoff. ``rawsse.load.h2sender`` builds its HTTP/2 connection on the same life.

The push path costs one ``recv`` per readiness and one ``send`` per write, and no Python object
per push: a read's answers (``rawsse.load.h1answers``) are counted, their latencies taken from
the batches in flight, and the freed slots refilled at the end of the loop turn
(``Driver.freed``), every connection the turn freed in one pass. A batch in flight is the pushes
of one write (consecutive push numbers, sent at one time): the oldest one's fields sit in the
sender's slots, those behind it (``--pipeline``) in ``later``; push ``k`` was scheduled at its
batch's send time, or ``k / --rate`` after the start.
"""

from __future__ import annotations

import collections
import errno
import socket
import ssl
import time
from typing import TYPE_CHECKING

from rawsse.load import loadgen
from rawsse.load.h1answers import AnswerReader
from rawsse.load.loadgen import CLOSED, CONNECTING, READY
from rawsse.server.loop import EPOLLOUT, READ_EVENTS, WRITE_EVENTS

if TYPE_CHECKING:
    from rawsse.load.driver import Driver

RECV_SIZE = 64 * 1024
RECONNECT_MIN, RECONNECT_MAX = 0.05, 2.0


class Sender:
    """One keep-alive connection and the pushes in flight on it, oldest first."""

    __slots__ = ("driver", "sock", "state", "reader", "in_flight", "first_k", "first_sent",
                 "batch_left", "later", "out", "backoff", "timer", "since")

    def __init__(self, driver: "Driver") -> None:
        self.driver = driver
        self.sock: socket.socket | None = None
        self.state = CLOSED
        self.reader = AnswerReader(driver)
        self.in_flight = 0  # pushes sent and not answered yet
        # the oldest batch: its first unanswered push (kept when rate-paced only: latency is
        # from its send time otherwise), the answers it still waits for, when it was sent
        self.first_k = 0
        self.batch_left = 0
        self.first_sent = 0.0
        self.later: collections.deque[tuple[int, int, float]] = collections.deque()  # (k, n, sent)
        self.out: memoryview | None = None
        self.backoff = RECONNECT_MIN
        self.timer: list | None = None
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
        self.reader.reset()
        driver.loop.add(sock.fileno(), self, WRITE_EVENTS)

    def handle_events(self, events: int) -> None:
        sock = self.sock
        assert sock is not None  # registered with the loop only while it has a socket
        if self.state != READY:
            self._connected(sock)
            return
        if events & EPOLLOUT and self.out is not None:
            self._flush(sock, self.out, first=False)
            if self.state != READY:
                return
        if events & ~EPOLLOUT:
            self._read(sock)

    def _connected(self, sock: socket.socket) -> None:
        """The connect finished: up, or failed."""
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

    def send_batch(self, data: bytes, k: int, n: int, now: float) -> None:
        """Pushes ``k`` … ``k + n - 1`` (``data``, their requests) go out now, in one send."""
        if self.in_flight:
            self.later.append((k, n, now))
        else:
            self.first_k, self.batch_left, self.first_sent = k, n, now
        self.in_flight += n
        assert self.sock is not None and self.out is None  # free_slots promised both
        self._flush(self.sock, data, first=True)

    def _flush(self, sock: socket.socket, out: bytes | memoryview, first: bool) -> None:
        """Send what is buffered; wait for EPOLLOUT only while bytes remain (rawsse.server.loop
        rules): from a write (``first``), or on EPOLLOUT."""
        try:
            sent = sock.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(loadgen.error_kind(exc.errno, "send"))
            return
        if sent < len(out):
            self.out = memoryview(out)[sent:]
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
        try:  # ``_receive``, inlined: plain TCP only (HTTP/1.1 over TLS is not offered)
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(loadgen.error_kind(exc.errno, "recv"))
            return
        if not data:
            self._fail("closed")
            return
        reader = self.reader
        answered = reader.feed(data, self.in_flight)
        if answered:
            driver = self.driver
            now = driver.last_answer = time.monotonic()
            if answered <= self.batch_left and driver.rate <= 0:  # all from the oldest batch
                driver.latency.record((now - self.first_sent) * 1000.0, answered)
                self.in_flight -= answered
                self.batch_left -= answered
                if not self.batch_left and self.later:
                    self.first_k, self.batch_left, self.first_sent = self.later.popleft()
            else:
                self._answered(answered, now)
        if reader.ended is not None:  # Connection: close, or an answer we cannot read
            self._fail(reader.ended)
        else:
            self.driver.freed(self)

    def _answered(self, n: int, now: float) -> None:
        """The ``n`` oldest pushes in flight were answered ``now``: their latencies, from when
        each was scheduled (module doc), batch after batch."""
        driver = self.driver
        latency, rate = driver.latency, driver.rate
        self.in_flight -= n
        while n:
            m = n if n < self.batch_left else self.batch_left
            if rate > 0:
                start, first = driver.start, self.first_k
                for k in range(first, first + m):
                    latency.record((now - (start + k / rate)) * 1000.0)
            else:
                latency.record((now - self.first_sent) * 1000.0, m)
            self.first_k += m
            self.batch_left -= m
            n -= m
            if not self.batch_left and self.later:
                self.first_k, self.batch_left, self.first_sent = self.later.popleft()

    def pushes_in_flight(self) -> int:
        return self.in_flight

    def forget_in_flight(self) -> None:
        """The pushes in flight are counted lost by the caller."""
        self.in_flight = self.batch_left = 0
        self.later.clear()

    def check_timeout(self, now: float, timeout: float) -> None:
        if self.state == CONNECTING and now - self.since > timeout:  # a black-holed address
            self._fail("timeout")
        elif self.in_flight and now - self.first_sent > timeout:
            self._fail("timeout")

    def close(self, reason: str = "closed") -> None:
        """The loop's handler interface (a handler that raised is closed with "error")."""
        self._fail(reason)

    def _fail(self, kind: str) -> None:
        driver = self.driver
        lost = self.pushes_in_flight()
        if self.state != READY:
            driver.count_error(f"connect_{kind}")
        elif lost:
            driver.count_error(f"lost_{kind}", lost)
            self.forget_in_flight()
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

    @property
    def free_slots(self) -> int:
        if self.state != READY or self.out is not None:
            return 0
        return self.driver.pipeline - self.in_flight
