"""An HTTP/1.1 connection while it is reading requests: the httptools protocol object.

Theory of operation
-------------------
Every accepted socket starts as an ``Http1Connection`` over a transport (``transport.py``).
Reads go into the worker's one shared buffer. Between requests, the complete requests at its
start that ``http1_fast.py`` is sure of (a strict subset of RFC 9112 that llhttp reads the same
way: what Go's net/http, curl and Fleet send) are read from it with a few bytes operations;
from the first byte it declines, the read is fed to an ``httptools.HttpRequestParser`` whose
callbacks fill a protocol-neutral ``Request`` (``exchange.py``), so every rule below stays
httptools' and this module's whatever the fast path takes. A complete request is handed to the
application (``rawsse.apns.routes.Routes.handle``; a push the fast path read on the public
listener straight to ``Routes.push``, what ``handle`` would call), which answers through
``request.answer(Answer)`` now or later, or turns the connection into a device stream
(``request.become_stream``), after which this object and its parser are garbage. Everything
HTTP/1.1 means stays here: pipelining order, ``Connection``, ``100 Continue``, lingering close,
and the answers in request order (``http1_answers.py``, the half of this connection the routes
answer through; the bytes in ``http1_wire.py``).

Rules
-----
- Pipelining (RFC 9112 §9.3.2): answers leave in request order. Each request is queued in
  ``responses`` as it completes; its answer fills ``request.slot`` now or later (a push waiting
  for its owner worker, ``--response-delay``); only the answered prefix is written: what a read
  answers in one write at the end of that read, what is answered later once per loop turn.
- Bounded per connection: ``MAX_QUEUED`` unanswered requests or ``MAX_OUT`` unsent bytes pause
  parsing and reading (TCP pushes back on the sender) until they drain, within one read too:
  a 64 KB read can hold ~1,700 pipelined ``GET /metrics``, so a read is parsed in slices too
  short to complete more requests than there is room for (``MIN_REQUEST`` bytes each), and what
  is left of it waits in ``held`` (issue 12: 50 clients pipelining /metrics and never reading
  once stalled every worker past the master's heartbeat timeout).
- Limits: request head ≤ ``--header-limit`` bytes (431), head and body each within
  ``--header-timeout`` of their start (slowloris: 408), ``--idle-timeout`` between requests (quiet
  close). Deadlines are checked by the worker's once-a-second sweep, so no timer per request.
- Bad input gets a 4xx and a close, never a traceback: parser errors are 400, a body over every
  route's limit is 413, TE+CL and duplicate Content-Length are rejected by llhttp itself
  (``nodejs/llhttp``, ``src/llhttp/http.ts``).
- HTTP/2 with prior knowledge (RFC 9113 §3.3): a connection whose first bytes are the 24-byte
  preface, however split over reads, is handed with those bytes to the worker, which goes on
  with it as HTTP/2 (``rawsse/h2/connection.py``). The preface later in a connection gets 505.
- The last request is the last one parsed: after ``close`` or an HTTP/1.0 request without
  keep-alive (RFC 9112 §9.6), or a ``GET /events`` (the socket becomes a stream), the parser is
  dropped and whatever follows is read and discarded, never answered.
- A closing connection half-closes after its last response and reads until EOF for a while
  (the lingering close of ``connection.py``, shared with HTTP/2).
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from rawsse.apns import answers
from rawsse.apns.apple import REQUEST_HEADERS
from rawsse.h2.frames import PREFACE
from rawsse.server import http1_wire as wire
from rawsse.server.connection import LINGER, READABLE, ClientConnection
from rawsse.server.exchange import Request
from rawsse.server.http1_answers import (
    CLOSE, INTERIM, KEEP, KEEP_10, MAX_OUT, MAX_QUEUED, MAX_QUEUED_OPERATOR, STREAM, Http1Answers,
)
from rawsse.server.http1_fast import HEADER_NAMES, MAX_BODY, read_request
from rawsse.server.loop import EPOLLOUT
from rawsse.server.transport import SocketTransport

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

IDLE, HEAD, BODY = 0, 1, 2  # and LINGER (connection.py)
# The shortest request llhttp completes, "GET / HTTP/1.1\n\n" (bare LF ends lines): a slice of
# room * MIN_REQUEST bytes cannot complete more than ``room`` requests.
MIN_REQUEST = 16
DISCARD_BODY = 1024 * 1024  # beyond this an oversized body is not drained: 413 and close

_HTTP2_REFUSED = answers.json(505, {"reason": "HTTPVersionNotSupported",
                                    "detail": "rawsse speaks HTTP/1.1 only"})


_NOTHING_LEFT = memoryview(b"")  # a read whose requests were all served: nothing for httptools

class Http1Connection(Http1Answers):
    __slots__ = (
        # per connection (and those of Http1Answers)
        "head_bytes", "unparsed", "progress", "stopping", "sniffed",
        # per request
        "target", "body_size", "upgrade_left",
    )

    def __init__(self, host: "Worker", fd: int, operator: bool) -> None:
        self.host = host
        self.transport = SocketTransport(fd)
        self.fd = fd
        self.parser = httptools.HttpRequestParser(self)
        self.operator = operator  # accepted on the operator (admin) listener
        self.state = IDLE
        self.deadline = host.loop.now + host.config.header_timeout
        self.responses = deque()
        self.out = bytearray()
        self.events = READABLE
        self.reading = True
        self.closing = False
        self.head_bytes = 0
        self.unparsed = 0
        self.progress = False
        self.flush_scheduled = False
        self.stopping = False  # the worker drains: the request in progress is the last one
        self.held = None  # read but not parsed yet: the queue was full
        self.sniffed: bytes | None = b""  # first bytes held while they may be the HTTP/2 preface
        # The request being parsed; None between requests. Never left set on a connection that
        # ends: request.channel points back here, and a cycle outliving the connection would be
        # moved to the never-scanned generation by the worker's gc.freeze() (a leak per stream).
        self.request = None
        self.target = b""
        self.body_size = 0
        self.upgrade_left = 0  # body bytes of an Upgrade request still to read (_upgrade_body)
        self.auth = None

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = Request(self, self.operator)
        self.state = HEAD
        self.head_bytes = 0
        self.unparsed = 0
        self.deadline = self.host.loop.now + self.host.config.header_timeout

    def on_url(self, url: bytes) -> None:
        self.target += url  # fragments when the request line arrives in pieces
        self.head_bytes += len(url)
        self.progress = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        self.unparsed = 0  # those raw bytes are now counted exactly, in head_bytes
        self.progress = True
        kept = HEADER_NAMES.get(name)
        if kept is None:  # a spelling not listed
            kept = HEADER_NAMES.get(name.lower(), b"")
        request = self.request
        if kept and request is not None:  # the rest skipped, no call
            if kept in REQUEST_HEADERS:
                request.add_header(kept, value)
            else:  # read by this module only (_OWN_HEADERS)
                request.headers[kept] = value

    def on_headers_complete(self) -> None:
        if self.head_bytes > self.host.config.header_limit:
            # A head that arrived whole in one read: _check_head_size only sees heads still in
            # progress when feed_data returns, by then this request would have been served.
            self.refuse(431, "RequestHeaderFieldsTooLarge", "request head too large")
            self.abort()
        self.state = BODY
        self.progress = True
        self.deadline = self.host.loop.now + self.host.config.header_timeout
        request = self.request
        if request is None:
            return
        request.path, _, request.query = self.target.partition(b"?")
        request.method = self.parser.get_method()  # type: ignore[union-attr]
        headers = request.headers
        length = headers.get(b"content-length")
        # Only a body that may be refused unread (7+ digits: DISCARD_BODY) or an Expect matter.
        if b"expect" in headers or (length is not None and len(length) >= 7):
            self._expectations(request)
        if self.parser.should_upgrade():  # type: ignore[union-attr]
            self.upgrade_left = self._upgrade_length(request)

    def _upgrade_length(self, request: Request) -> int:
        """The body an Upgrade request (``curl --http2`` offers h2c) announces. httptools tells
        llhttp to skip the body of any Upgrade request (the bytes after the head belong to the
        new protocol), but the upgrade is ignored (RFC 9110 §7.8; RFC 9113 §3.1 deprecates
        h2c's), so this connection reads the body itself (``_upgrade_body``)."""
        headers = request.headers
        if b"transfer-encoding" in headers:
            self.refuse(400, "BadRequest", "Upgrade with a chunked body: send Content-Length")
            self.abort()
        length = headers.get(b"content-length", b"0")
        return int(length) if length.isdigit() else 0  # llhttp refuses a bad Content-Length

    def _expectations(self, request: Request) -> None:
        """Refuse an oversized body before reading it; send 100 Continue when asked."""
        headers = request.headers
        length_text = headers.get(b"content-length")
        expect = headers.get(b"expect")
        if length_text is not None and length_text.isdigit():
            length = int(length_text)
            if length > DISCARD_BODY or (expect and length > self.host.routes.body_limit(request)):
                self.host.stats.reject(413, "PayloadTooLarge")
                self._queue_answer(answers.error(413, "PayloadTooLarge"), CLOSE)
                self.abort()
        # RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored
        # (a 1.0 client does not know interim responses).
        if (expect is not None and expect.lower() == b"100-continue"
                and self.parser.get_http_version() != "1.0"):  # type: ignore[union-attr]
            interim = Request(self, self.operator)
            interim.slot, interim.after = wire.CONTINUE_100, INTERIM
            self.responses.append(interim)
            self._write_ready()

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        request = self.request
        if request is None:
            return
        if request.body_too_large:
            if self.body_size > DISCARD_BODY:
                raise _TooLarge()
            return
        if self.body_size > MAX_BODY:
            request.body_too_large = True
            request.body = b""
            return
        request.body = request.body + body if request.body else body

    def on_message_complete(self) -> None:
        parser = self.parser
        keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]
        request = self.request
        if request is None:
            return
        if not keep_alive or self.stopping:
            request.after = CLOSE
        # An HTTP/1.0 request is kept alive only with a Connection header asking for it; without
        # one the version (a str formatted per call) need not be asked.
        elif (b"connection" in request.headers
              and parser.get_http_version() == "1.0"):  # type: ignore[union-attr]
            request.after = KEEP_10
        else:
            request.after = KEEP
        if not self.upgrade_left:  # else its body comes first (_upgrade_body)
            self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        """A complete request: queue its place for the answer, hand it to the routes."""
        self.state = IDLE
        self.progress = True
        self.deadline = self.host.loop.now + self.host.config.idle_timeout
        self.host.stats.http_requests += 1
        self.responses.append(request)
        self.request = None
        self.target = b""
        self.body_size = 0
        self.host.routes.handle(request)
        if request.after in (CLOSE, STREAM):
            # RFC 9112 §9.6: after a request with "close" the server MUST NOT process further
            # requests on the connection. Stop here, so pipelined bytes after it are neither
            # answered nor counted as bad input (llhttp would raise "Data after Connection:
            # close"), and never parsed on a connection already handed to a stream.
            self.parser = None
            self.abort()

    # -- ending and events ----------------------------------------------------------------

    def _forget(self) -> None:
        self.parser = None
        self.request = None
        self.responses.clear()

    # -- events -------------------------------------------------------------------------------

    def handle_events(self, events: int) -> None:
        """A plain socket's read is made here, with nothing held: the calls of ``_read`` and
        ``_receive`` (``connection.py``) less per read; anything else goes their way."""
        if events & EPOLLOUT or self.held is not None or self.transport.__class__ is not SocketTransport:
            ClientConnection.handle_events(self, events)
            return
        try:
            n = os.readv(self.fd, self.host.read_buffers)
        except BlockingIOError:
            return
        except OSError:
            self.close("client")
            return
        if n:
            self._received(n)
        else:
            self._end_of_input()

    def _read(self) -> None:
        if self.held is not None:  # what was read before goes first
            self._parse_held()
            return
        n = self._receive()
        if n:
            self._received(n)

    def _received(self, n: int) -> None:
        """Parse what a read put in the worker's buffer, serve what it completes, write their
        answers. Between requests (nothing inside httptools, no Upgrade body pending, the
        preface sniffed) the complete requests ``http1_fast`` is sure of are served straight
        from the buffer, as many as the queue has room for; httptools gets the rest of the
        read from the first byte the fast path declined."""
        if self.state == LINGER or self.parser is None:
            return
        host = self.host
        data = host.read_view[:n]
        if self.sniffed is not None:
            data = self._sniff_preface(data)
            if data is None:
                return
        # What this read answers is written at once, in one write, at its end: with nothing
        # else pipelined a keep-alive push is answered without waiting for the end of the loop
        # turn. The flag keeps answer() from scheduling a write meanwhile; if one is due this
        # turn anyway, it takes these too.
        write_now = not self.flush_scheduled
        self.flush_scheduled = True
        try:
            if self.state == IDLE and not self.upgrade_left:  # between requests
                whole = bytes(data)  # requests keep slices of it; the buffer is the worker's
                end = len(whole)
                start = 0
                responses = self.responses
                limit = MAX_QUEUED_OPERATOR if self.operator else MAX_QUEUED
                head_limit = host.config.header_limit
                after = CLOSE if self.stopping else KEEP
                routes = host.routes
                push = routes.push
                while start < end and len(responses) < limit and len(self.out) < MAX_OUT:
                    taken = read_request(whole, start, head_limit, self, self.operator, after)
                    if taken is None:
                        break
                    request, start, token = taken
                    responses.append(request)
                    host.stats.http_requests += 1
                    if token is not None:  # a push: what handle would call, without its call
                        push(request, token)
                    else:
                        routes.handle(request)
                    if request.after != KEEP:  # close, or a device stream: the last (_dispatch)
                        self.parser = None
                        break
                    if self.fd < 0 or self.closing:
                        break
                if start:
                    self.deadline = host.loop.now + host.config.idle_timeout
                    # (all of it served, as a keep-alive push's read is: no slice made)
                    data = data[start:] if start < end else _NOTHING_LEFT
            if data and self._parsing():
                self.progress = False
                self._feed_read(data)
        finally:
            if write_now:
                self.flush_scheduled = False
        if write_now and self.out and self.fd >= 0:
            self._flush()

    def _feed_read(self, data: Any) -> None:
        """Feed a read to httptools: in one piece when the queue has room for every request it
        can hold, else in slices (``_parse``); then bound the head in progress."""
        n = len(data)
        limit = self._queue_limit()
        if n <= (limit - len(self.responses)) * MIN_REQUEST and len(self.out) < MAX_OUT:
            self._feed(data)  # room for every request the read can hold: no slicing
            fed = n
        else:
            fed = self._parse(data)
        if self.state == HEAD and self._parsing():
            self._check_head_size(fed)

    def _has_room(self) -> bool:
        return len(self.responses) < self._queue_limit() and len(self.out) < MAX_OUT

    def _queue_limit(self) -> int:
        return MAX_QUEUED_OPERATOR if self.operator else MAX_QUEUED

    def _parsing(self) -> bool:
        return self.fd >= 0 and self.state != LINGER and not self.closing and self.parser is not None

    def _parse(self, data: Any) -> int:
        """Feed ``data`` in slices that cannot complete more requests than the queue has room
        for; once it is full, keep the rest in ``held`` and stop reading until it drains.
        Returns how many bytes were fed."""
        start, end = 0, len(data)
        while start < end:
            if not self._has_room():
                self.held = bytes(data[start:])  # copied: data is the worker's shared buffer
                self._update_events()
                return start
            stop = min(end, start + (self._queue_limit() - len(self.responses)) * MIN_REQUEST)
            self._feed(data[start:stop])
            if not self._parsing():
                return stop
            start = stop
        return end

    def _parse_held(self) -> None:
        held = self.held
        if held is None or not self._parsing():
            self.held = None
            return
        if not self._has_room():
            return  # still full: the next drain schedules it again
        self.held = None
        self.progress = False
        fed = self._parse(memoryview(held))
        if self._parsing():
            self._check_head_size(fed)

    def _feed(self, data: Any) -> None:
        """Parse ``data``: malformed input is answered (4xx, 505) and closes; nothing raises."""
        if self.upgrade_left:
            data = self._upgrade_body(data)
            if not data or not self._parsing():
                return
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
            return
        except httptools.HttpParserUpgrade as upgrade:
            # Upgrade (e.g. h2c) is ignored, as RFC 9110 §7.8 allows: the request was answered
            # over HTTP/1.1; what follows is parsed with a fresh parser, below, outside this
            # handler: an error parsing it inside would carry this exception as its context
            # instead of the callback's own (_Abort, _TooLarge), and escape as a traceback.
            rest = memoryview(bytes(data[upgrade.args[0]:]) if upgrade.args else b"")
        except httptools.HttpParserCallbackError as exc:
            self._callback_failed(exc)
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        self._after_upgrade(rest)

    def _upgrade_body(self, data: Any) -> Any:
        """Take the body of an Upgrade request out of ``data`` (it may span many reads); once
        it is whole, serve the request. Returns what follows the body."""
        take = min(self.upgrade_left, len(data))
        self.upgrade_left -= take
        try:
            if take:
                self.on_body(bytes(data[:take]))
        except _TooLarge:
            self.upgrade_left = 0
            self.refuse(413, "PayloadTooLarge", "body too large")
            return b""
        request = self.request
        if not self.upgrade_left and request is not None:
            try:
                self._dispatch(request)
            except _Abort:  # the last request on this connection (close, a device stream)
                return b""
        return data[take:]

    def _sniff_preface(self, data: Any) -> Any:
        """The first bytes: what to parse as HTTP/1.1, or None once held (a preface so far) or
        handed over (HTTP/2 from here; or a sender's, to another worker: ``balance_sender``)."""
        held = self.sniffed or b""
        head = held + bytes(data[:len(PREFACE) - len(held)])
        preface = PREFACE.startswith(head)
        if preface and len(head) < len(PREFACE):
            self.sniffed = head
            return None
        self.sniffed = None
        first = held + bytes(data) if held else data
        if self.host.balance_sender(self, first):
            return None
        if preface:
            self.resume(bytes(first))
            return None
        return first

    def resume(self, received: bytes) -> None:
        """Go on with ``received``, the first bytes read from this socket, here or by the worker
        that handed it over (``rawsse/node/balance.py``): HTTP/2 from here if they are the
        preface, else parsed as HTTP/1.1. Never sniffed, nor handed on, again."""
        self.sniffed = None
        if not received.startswith(PREFACE):
            self.held = received
            self._parse_held()
            return
        self.fd = -1
        self.parser = None
        self.request = None
        self.host.switch_to_h2(self, self.transport, received)

    def _check_head_size(self, n: int) -> None:
        """431 once the head in progress is over the limit. Callback byte counts are exact for
        what httptools has delivered; a header still being accumulated inside httptools is
        bounded by counting raw bytes read since the last callback (``unparsed``, dropped once
        the header arrives and is counted exactly, so a head sent in pieces is not counted
        twice). httptools 0.6 accepts a 200 KB header value, so the server must cap it."""
        if self.state != HEAD:
            return
        if not self.progress:
            self.unparsed += n
        if self.head_bytes + self.unparsed > self.host.config.header_limit:
            self.refuse(431, "RequestHeaderFieldsTooLarge", "request head too large")

    def _parse_failed(self, exc: Exception) -> None:
        # llhttp stops on the HTTP/2 prior-knowledge preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        # (HPE_PAUSED_H2_UPGRADE in nodejs/llhttp) once all 24 bytes are in, however they were
        # split over reads; PRI is accepted as a method only with that request line.
        if self.parser is not None and self.parser.get_method() == b"PRI":
            self.host.stats.bad_requests += 1
            self.parser = None
            self._queue_answer(_HTTP2_REFUSED, CLOSE)
        else:
            self.refuse(400, "BadRequest", str(exc))

    def _callback_failed(self, exc: Exception) -> None:
        cause = exc.__context__
        if isinstance(cause, _TooLarge):
            self.refuse(413, "PayloadTooLarge", "body too large")
        elif isinstance(cause, _Abort):
            return  # the callback already answered and closed
        else:
            raise exc

    def _after_upgrade(self, rest: Any) -> None:
        self.parser = httptools.HttpRequestParser(self)
        if not self.upgrade_left:
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

    def finish_then_close(self) -> None:
        """Drain: answer what was asked, then close; close at once if nothing is in flight.
        A connection that has shown nothing but (part of) the preface first reads what its
        socket already holds, without waiting: an HTTP/2 sender whose preface is in gets a
        GOAWAY "Shutdown" (``Worker.switch_to_h2``) instead of a reset."""
        if self.sniffed is not None and self.state == IDLE and not self.responses:
            self._read()
            if self.fd < 0:
                return  # HTTP/2 now, or gone
        if not self.responses and not self.out and self.state == IDLE:
            self.close("shutdown")
            return
        self.stopping = True
        if self.responses:
            last = self.responses[-1]
            if last.after != STREAM:  # a stream hand-off stays one
                last.after = CLOSE
        else:
            self.closing = True
            self._update_events()

    def timed_out(self) -> None:
        """The sweep found this connection past its deadline."""
        if self.state in (HEAD, BODY) and not self.closing:
            self.refuse(408, "RequestTimeout", "request not received in time")
        elif not self.responses:
            self.close("timeout")


class _TooLarge(Exception):
    """Raised inside on_body to stop httptools reading an oversized body."""


class _Abort(Exception):
    """Raised inside a callback to stop feed_data (see ``Http1Connection.abort``)."""
