"""A connection the worker will not serve (over ``--max-connections``, draining), refused in the
protocol its client speaks.

An HTTP/2 client cannot read HTTP/1.1's ``503``: Go's, nghttp2's and the ``h2`` library's
clients see a broken preface and report a protocol error, not a refusal they can retry
elsewhere. So the refusal waits for the client's first bytes, which every HTTP client sends
right after its connect completes (they arrive with or just after the handshake's last ACK):

- the 24-byte preface (RFC 9113 §3.4), however split over reads: the socket goes on as an
  ``H2Connection`` that sends its SETTINGS then ``GOAWAY`` with last-stream-id 0 and
  REFUSED_STREAM, debug data ``{"reason": "ServiceUnavailable"}`` (§6.8: no stream was
  processed, so every request may be sent again on another connection), and closes once that
  is out; nothing it sends is served;
- anything else, or nothing within ``REFUSAL_WAIT_SECONDS``: HTTP/1.1's ``503`` and a close.

The wait is one loop timer per refused connection (they are few and short-lived, unlike the
300,000 streams the tick exists for), so a silent client is answered in well under the tick's
second; what the client sends meanwhile is read and discarded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rawsse.h2 import frames as f
from rawsse.server import http1_wire as wire
from rawsse.server.connection import LINGER, READABLE, ClientConnection
from rawsse.server.exchange import Answer
from rawsse.server.loop import EPOLLOUT
from rawsse.server.transport import SocketTransport

if TYPE_CHECKING:
    from rawsse.server.loop import Timer
    from rawsse.server.worker import Worker

REFUSAL_WAIT_SECONDS = 0.5
H2_REFUSAL = (f.REFUSED_STREAM, "ServiceUnavailable")
WAITING, ANSWERED = 0, 1  # and LINGER (connection.py)


class RefusedConnection(ClientConnection):
    __slots__ = ("answer", "sniffed", "timer")

    operator = False  # what the HTTP/2 hand-over asks; no request of it is ever served

    def __init__(self, host: "Worker", fd: int, answer: Answer) -> None:
        self.host = host
        self.transport = SocketTransport(fd)
        self.fd = fd
        self.out = bytearray()
        self.events = READABLE
        self.flush_scheduled = False
        self.state = WAITING
        self.deadline = host.loop.now + REFUSAL_WAIT_SECONDS + 1.0  # the timer ends it first
        self.auth = None
        self.answer = answer
        self.sniffed = b""  # the first bytes, while they are the start of the preface
        self.timer: "Timer | None" = host.loop.call_later(REFUSAL_WAIT_SECONDS, self.answer_http1)

    def _read(self) -> None:
        n = self._receive()
        if not n or self.state != WAITING:
            return  # answered: what follows is discarded
        received = self.sniffed + bytes(self.host.read_view[:n])
        if not received.startswith(f.PREFACE[:len(received)]):
            self.answer_http1()
        elif len(received) < len(f.PREFACE):
            self.sniffed = received
        else:
            self._cancel_timer()
            self.fd = -1  # the socket is the H2Connection's from here
            self.host.switch_to_h2(self, self.transport, received, H2_REFUSAL)

    def answer_http1(self) -> None:
        """Not the preface, or nothing in time: HTTP/1.1's 503 and a close."""
        self.timer = None
        if self.fd < 0 or self.state != WAITING:
            return
        self.state = ANSWERED
        self.out += wire.serialize(self.answer, wire.CLOSE)
        self._flush()

    def _end_of_input(self) -> None:
        self.close("client")

    def _finished(self) -> bool:
        return self.state == ANSWERED

    def _forget(self) -> None:
        self._cancel_timer()  # the timer holds this object: dropped with the connection

    def _cancel_timer(self) -> None:
        self.host.loop.cancel(self.timer)
        self.timer = None

    def _update_events(self) -> None:
        if self.fd < 0:
            return
        events = READABLE | (EPOLLOUT if self.out else 0)
        if events != self.events:
            self.events = events
            self.host.loop.modify(self.fd, events)

    def finish_then_close(self) -> None:
        """Drain: nothing to finish; the refusal ends within ``REFUSAL_WAIT_SECONDS``."""

    def timed_out(self) -> None:
        self.close("timeout")  # counted "rejected" once already, at accept
