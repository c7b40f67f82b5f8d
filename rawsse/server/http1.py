"""An HTTP/1.1 connection while it is reading requests: the httptools protocol object.

Theory of operation
-------------------
Every accepted socket starts as a ``Conn``. Reads go into the worker's one shared buffer and are
fed to an ``httptools.HttpRequestParser`` whose callbacks fill the request slots; a complete
request is handed to ``routes.dispatch``, which answers through ``respond``/``reserve``+``fill`` or
turns the connection into a ``Stream`` (``become_stream``), after which this object, its parser and
its request fields are garbage.

Rules
-----
- Pipelining (RFC 9112 §9.3.2): responses leave in request order. Each request takes a slot in
  ``responses``; a slot is filled now or by a timer (``--response-delay``); only the filled prefix
  is written. More than ``MAX_QUEUED`` unanswered requests or ``MAX_OUT`` unsent bytes pause
  reading (TCP pushes back on the sender) until they drain.
- Limits: request head ≤ ``--header-limit`` bytes (431), head and body each within
  ``--header-timeout`` of their start (slowloris: 408), ``--idle-timeout`` between requests (quiet
  close). Deadlines are checked by the worker's once-a-second sweep, so no timer per request.
- Bad input gets a 4xx and a close, never a traceback: parser errors are 400, a body over every
  route's limit is 413, TE+CL and duplicate Content-Length are rejected by llhttp itself (D.3),
  the HTTP/2 preface gets 505 however its bytes are split over reads.
- The last request is the last one parsed: after ``close`` or an HTTP/1.0 request without
  keep-alive (RFC 9112 §9.6), or a ``GET /events`` (the socket becomes a stream), the parser is
  dropped and whatever follows is read and discarded, never answered.
- A closing connection half-closes (``shutdown(SHUT_WR)``) after its last response and reads
  until EOF for up to ``LINGER_SECONDS``: closing with unread input would send an RST that can
  destroy the response before the client reads it (Apache's lingering close).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Any

import httptools

from rawsse.server import frames
from rawsse.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP

IDLE, HEAD, BODY, LINGER = 0, 1, 2, 3
KEEP_ALIVE_10 = "keep-alive"  # slot marker: an HTTP/1.0 keep-alive answer
READABLE = EPOLLIN | EPOLLRDHUP

MAX_QUEUED = 256  # unanswered pipelined requests before reading pauses
MAX_OUT = 256 * 1024  # unsent response bytes before reading pauses
MAX_BODY = 64 * 1024  # largest body any route reads (admin JSON); pushes stop at 5120
DISCARD_BODY = 1024 * 1024  # beyond this an oversized body is not drained: 413 and close
LINGER_SECONDS = 2.0

# Request headers a route reads; everything else is skipped without a copy.
_KEPT = frozenset({
    b"apns-id", b"apns-push-type", b"apns-expiration", b"apns-priority", b"apns-topic",
    b"apns-collapse-id", b"authorization", b"content-length", b"expect", b"rawsse-delivery-delay",
})
_CHECK_DUPLICATES = frozenset({
    b"apns-id", b"apns-push-type", b"apns-expiration", b"apns-priority", b"apns-topic",
    b"apns-collapse-id", b"authorization",
})

_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class Conn:
    __slots__ = (
        # per connection
        "fd", "parser", "operator", "state", "deadline", "responses", "out", "events", "reading",
        "closing", "head_bytes", "unparsed", "progress", "flush_scheduled",
        # per request
        "url", "headers", "duplicate", "body", "body_size", "too_large", "keep_alive", "http10",
    )

    worker: Any = None  # set by the worker: loop, stats, config, routes

    def __init__(self, fd: int, operator: bool) -> None:
        self.fd = fd
        self.parser = httptools.HttpRequestParser(self)
        self.operator = operator  # accepted on the operator (admin) listener
        self.state = IDLE
        self.deadline = self.worker.loop.now + self.worker.config.header_timeout
        self.responses: deque[list[Any]] = deque()
        self.out = bytearray()
        self.events = READABLE
        self.reading = True
        self.closing = False
        self.head_bytes = 0
        self.unparsed = 0
        self.progress = False
        self.flush_scheduled = False
        self._reset_request()

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.duplicate = False
        self.body = b""
        self.body_size = 0
        self.too_large = False
        self.keep_alive = True
        self.http10 = False

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.state = HEAD
        self.head_bytes = 0
        self.unparsed = 0
        self.deadline = self.worker.loop.now + self.worker.config.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url  # fragments when the request line arrives in pieces (D.4)
        self.head_bytes += len(url)
        self.progress = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        self.unparsed = 0  # those raw bytes are now counted exactly, in head_bytes
        self.progress = True
        name = name.lower()
        if name in _KEPT:
            headers = self.headers
            if name in headers and name in _CHECK_DUPLICATES:
                self.duplicate = True
            headers[name] = value

    def on_headers_complete(self) -> None:
        if self.head_bytes > self.worker.config.header_limit:
            # A head that arrived whole in one read: _check_head_size only sees heads still in
            # progress when feed_data returns, by then this request would have been served.
            self.worker.routes.bad_request(self, 431, "RequestHeaderFieldsTooLarge",
                                           "request head too large")
            self.abort()
        self.state = BODY
        self.progress = True
        self.deadline = self.worker.loop.now + self.worker.config.header_timeout
        self.worker.routes.headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.too_large:
            if self.body_size > DISCARD_BODY:
                raise _TooLarge()
            return
        if self.body_size > MAX_BODY:
            self.too_large = True
            self.body = b""
            return
        self.body = self.body + body if self.body else body

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self.http10 = self.parser.get_http_version() == "1.0"
        self.state = IDLE
        self.progress = True
        self.deadline = self.worker.loop.now + self.worker.config.idle_timeout
        self.worker.stats.http_requests += 1
        self.worker.routes.dispatch(self)
        last = not self.keep_alive  # "close", HTTP/1.0, or a request that became a stream
        self._reset_request()
        if last:
            # RFC 9112 §9.6: after a request with "close" the server MUST NOT process further
            # requests on the connection. Stop here, so pipelined bytes after it are neither
            # answered nor counted as bad input (llhttp would raise "Data after Connection:
            # close", D.4), and never parsed on a connection already handed to a stream.
            self.parser = None
            self.abort()

    # -- responses ----------------------------------------------------------------------------

    def respond(self, data: bytes, close: bool = False) -> None:
        """Answer the current request now (after any earlier unanswered one)."""
        self.responses.append([data, self._after_response(close)])
        self._write_ready()

    def reserve(self) -> list[Any]:
        """A response slot for the current request, filled later by ``fill`` (a push waiting
        for its owner worker, a broadcast counting streams, ``--response-delay``)."""
        slot = [None, self._after_response(False)]
        self.responses.append(slot)
        return slot

    def _after_response(self, close: bool) -> bool | str:
        """A slot's second field: True closes after it; ``KEEP_ALIVE_10`` keeps an HTTP/1.0
        connection open and says so (RFC 9112 §9.3: a 1.0 client otherwise expects a close)."""
        if close or not self.keep_alive:
            return True
        return KEEP_ALIVE_10 if self.http10 else False

    def fill(self, slot: list[Any], data: bytes, delay: float = 0.0) -> None:
        """Put ``data`` in ``slot`` now or after ``delay`` seconds; written once it is first."""
        if delay > 0:
            self.worker.loop.call_later(delay, self.fill, slot, data)
            return
        slot[0] = data
        if self.fd >= 0:
            self._write_ready()

    def interim(self, data: bytes) -> None:
        """A 1xx response (100 Continue), in order with the final ones."""
        self.responses.append([data, False])
        self._write_ready()

    def become_stream(self, token: bytes) -> None:
        """After earlier responses are out, hand the socket to a ``Stream`` for ``token``."""
        self.keep_alive = False  # the last request: what follows is not HTTP any more
        self.responses.append([b"", "stream", token])
        self._write_ready()

    def _write_ready(self) -> None:
        responses = self.responses
        out = self.out
        while responses and responses[0][0] is not None:
            slot = responses.popleft()
            action = slot[1]
            if action == "stream":
                self._hand_to_stream(slot[2])
                return
            if action == KEEP_ALIVE_10:
                out += frames.with_keep_alive(slot[0])
                continue
            if action:
                out += frames.with_connection_close(slot[0])
                self.closing = True
                responses.clear()
                break
            out += slot[0]
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Write once per loop turn: a read of 32 pipelined requests, or a batch of acks from
        the owner workers, fills many slots, and one write carries all their answers (one
        write per answer was 22% of a pipelined push's CPU, py-spy)."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.worker.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self.flush_scheduled = False
        if self.fd >= 0:
            self._flush()

    def _flush(self) -> None:
        out = self.out
        if out:
            try:
                written = os.write(self.fd, out)
            except BlockingIOError:
                written = 0
            except _GONE:
                self.close("client")
                return
            del out[:written]
        if not out and self.closing and not self.responses and self.state != LINGER:
            # Half-close only once every answer is out: a client that shut down its side after
            # sending may still be owed a push answer another worker has not acknowledged yet.
            self._start_linger()
            return
        self._update_events()

    def _update_events(self) -> None:
        if self.fd < 0:
            return
        self.reading = not self.closing and len(self.responses) < MAX_QUEUED and len(self.out) < MAX_OUT
        events = (READABLE if self.reading or self.state == LINGER else 0) | (EPOLLOUT if self.out else 0)
        if events != self.events:
            self.events = events
            self.worker.loop.modify(self.fd, events)

    def _hand_to_stream(self, token: bytes) -> None:
        fd, self.fd = self.fd, -1
        self.parser = None  # breaks the parser <-> protocol cycle at once (no GC needed)
        self.worker.http_conns.discard(self)
        self.worker.open_stream(fd, token, bytes(self.out), self.events)

    # -- events -------------------------------------------------------------------------------

    def handle_events(self, events: int) -> None:
        if events & EPOLLOUT:
            self._flush()
            if self.fd < 0:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self._read()

    def _read(self) -> None:
        worker = self.worker
        try:
            n = os.readv(self.fd, worker.read_buffers)
        except BlockingIOError:
            return
        except (_GONE + (OSError,)):
            self.close("client")
            return
        if n == 0:
            self._end_of_input()
            return
        if self.state == LINGER:
            return
        data = worker.read_view[:n]
        if self.parser is None:
            return
        self.progress = False
        self._feed(data)
        if self.fd < 0 or self.state == LINGER or self.closing:
            return
        self._check_head_size(n)

    def _feed(self, data: Any) -> None:
        """Parse ``data``: malformed input is answered (4xx, 505) and closes; nothing raises."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Upgrade (e.g. h2c) is ignored, as RFC 9110 §7.8 allows: the request was answered
            # over HTTP/1.1; parse what follows with a fresh parser.
            self._after_upgrade(bytes(data[upgrade.args[0]:]) if upgrade.args else b"")
        except httptools.HttpParserCallbackError as exc:
            self._callback_failed(exc)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)

    def _check_head_size(self, n: int) -> None:
        """431 once the head in progress is over the limit. Callback byte counts are exact for
        what httptools has delivered; a header still being accumulated inside httptools is
        bounded by counting raw bytes read since the last callback (``unparsed``, dropped once
        the header arrives and is counted exactly, so a head sent in pieces is not counted
        twice). D.4: a 200 KB header value is accepted by httptools, so the server must cap it."""
        if self.state != HEAD:
            return
        if not self.progress:
            self.unparsed += n
        if self.head_bytes + self.unparsed > self.worker.config.header_limit:
            self.worker.routes.bad_request(self, 431, "RequestHeaderFieldsTooLarge", "request head too large")

    def _parse_failed(self, exc: Exception) -> None:
        # llhttp stops on the HTTP/2 prior-knowledge preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        # (HPE_PAUSED_H2_UPGRADE, D.3) once all 24 bytes are in, however they were split over
        # reads; PRI is accepted as a method only with that request line.
        if self.parser is not None and self.parser.get_method() == b"PRI":
            self.worker.routes.reject_h2(self)
        else:
            self.worker.routes.bad_request(self, 400, "BadRequest", str(exc))

    def _callback_failed(self, exc: Exception) -> None:
        cause = exc.__context__
        if isinstance(cause, _TooLarge):
            self.worker.routes.bad_request(self, 413, "PayloadTooLarge", "body too large")
        elif isinstance(cause, _Abort):
            return  # the callback already answered and closed
        else:
            raise exc

    def _after_upgrade(self, rest: bytes) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.state = IDLE
        if rest and self.fd >= 0 and not self.closing:
            self._feed(rest)  # the bytes after an Upgrade request get the same error handling

    def _end_of_input(self) -> None:
        if self.state == LINGER or (not self.responses and not self.out):
            self.close("client")
            return
        # The client half-closed after sending: finish answering what it sent, then close.
        self.closing = True
        self.reading = False
        self._flush()

    def abort(self) -> None:
        """Called from a parser callback to stop parsing: the request was answered with a close,
        or was the last one on this connection. Unwinds feed_data."""
        raise _Abort()

    # -- ending -------------------------------------------------------------------------------

    def _start_linger(self) -> None:
        self.state = LINGER
        self.deadline = self.worker.loop.now + LINGER_SECONDS
        try:
            sock = socket.socket(fileno=self.fd)
            try:
                sock.shutdown(socket.SHUT_WR)
            finally:
                sock.detach()
        except OSError:
            self.close("client")
            return
        self._update_events()

    def finish_then_close(self) -> None:
        """Drain: answer what was asked, then close; close at once if nothing is in flight."""
        self.keep_alive = False
        if not self.responses and not self.out and self.state == IDLE:
            self.close("shutdown")
            return
        if self.responses:
            if self.responses[-1][1] != "stream":  # a stream hand-off stays one
                self.responses[-1][1] = True
        else:
            self.closing = True
            self._update_events()

    def timed_out(self) -> None:
        """The sweep found this connection past its deadline."""
        if self.state in (HEAD, BODY) and not self.closing:
            self.worker.routes.bad_request(self, 408, "RequestTimeout", "request not received in time")
        elif not self.responses:
            self.close("timeout")

    def close(self, reason: str = "client") -> None:
        fd = self.fd
        if fd < 0:
            return
        self.fd = -1
        self.parser = None
        worker = self.worker
        worker.loop.remove(fd)
        try:
            os.close(fd)
        except OSError:
            pass
        worker.http_conns.discard(self)
        worker.stats.disconnect(reason)
        self.responses.clear()


class _TooLarge(Exception):
    """Raised inside on_body to stop httptools reading an oversized body."""


class _Abort(Exception):
    """Raised inside a callback to stop feed_data (see ``Conn.abort``)."""
