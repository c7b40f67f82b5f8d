"""An HTTP/2 connection (RFC 9113) with prior knowledge: frames in, ``Request``s out, answers back.

Theory of operation
-------------------
An accepted connection starts as HTTP/1.1; when its first bytes are the client preface
(§3.4) the worker swaps its ``Http1Connection`` for an ``H2Connection`` over the same transport,
handing over the bytes already read (hypercorn does the same swap, ``pgjones/hypercorn
src/hypercorn/protocol/__init__.py``). The connection sends its SETTINGS first, then parses
frames out of each read. A complete request stream (HEADERS [+ CONTINUATION] [+ DATA] with
END_STREAM) becomes a protocol-neutral ``Request`` (``rawsse/server/exchange.py``) handed to
``Routes.handle`` exactly as an HTTP/1.1 request is; this object is its ``Channel``, and writes
the answer as HEADERS (+ DATA) on the request's stream. Answers may come back in any order.

What the connection announces is what api.push.apple.com announces (Apple, "Sending
notification requests to APNs": up to ``--h2-max-streams`` concurrent streams, default 1000),
with MAX_HEADER_LIST_SIZE 8000, HEADER_TABLE_SIZE 4096 and the default window and frame size.

Rules
-----
- Flow control (§5.2, §6.9): received DATA is credited back with WINDOW_UPDATE, per stream at
  once and per connection in batches of half the window; DATA we send waits, per stream, until
  both the peer's stream and connection windows let it through (``blocked``).
- A stream over MAX_CONCURRENT_STREAMS is refused with RST_STREAM REFUSED_STREAM (§5.1.2); a
  client RST_STREAM cancels a stream, whose answer is then dropped.
- Connection errors (§5.4.1) send GOAWAY with a JSON ``{"reason"}`` debug payload; its
  last-stream-id is the highest stream taken, every stream up to it that was complete is still
  answered, and streams still uploading are refused (REFUSED_STREAM: safe to retry, §8.7).
  ``shutdown`` sends the same GOAWAY with NO_ERROR for a drain and keeps reading the streams it
  covers. A connection that opens while its worker refuses it (``going_away``: over capacity,
  draining) sends that GOAWAY with last-stream-id 0 right after its SETTINGS and reads nothing
  more: no stream of it is processed, and the client sends them again elsewhere (§6.8).
- Floods are bounded per second and per connection: client resets (rapid reset,
  CVE-2023-44487) and control frames (SETTINGS, PING, PRIORITY, empty DATA) past their budget end
  the connection with ENHANCE_YOUR_CALM; more than ``MAX_OUT`` unsent bytes pause reading.
- State per open stream is one slotted ``H2Stream`` and its ``Request``.

The connection-level frames (SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY) and
the flood budgets are in ``control.py``; frames and HPACK in ``frames.py`` and ``hpack.py``; a
header block read into its ``Request`` (what the fields mean, and the memo of repeated blocks)
in ``requests.py``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from rawsse.apns import answers
from rawsse.h2 import control
from rawsse.h2 import frames as f
from rawsse.h2.hpack import HpackError, ok_block, response_block
from rawsse.h2.requests import MALFORMED, RequestDecoder
from rawsse.server.exchange import Answer, Request
from rawsse.server.connection import LINGER, READABLE, ClientConnection
from rawsse.server.loop import EPOLLOUT
from rawsse.server.statsevents import VIEWER_TOKEN
from rawsse.server.transport import SocketTransport

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

log = logging.getLogger(__name__)

MAX_HEADER_LIST_SIZE = 8000
HEADER_TABLE_SIZE = 4096
MAX_BLOCK = 64 * 1024  # a header block this big is far over MAX_HEADER_LIST_SIZE: not buffered
MAX_BODY = 64 * 1024  # as HTTP/1.1: the largest body any route reads
MAX_OUT = 1024 * 1024
GOING_AWAY_SECONDS = 30.0  # a GOAWAY'd connection waits this long for its last answers
_SSE_REFUSED = answers.json(505, {"reason": "HTTPVersionNotSupported",
                                  "detail": "device streams (GET /events) are served over "
                                            "HTTP/1.1 only"})
# The live view's figures are an SSE stream too (``rawsse/server/statsevents.py``).
_FIGURES_REFUSED = answers.json(505, {"reason": "HTTPVersionNotSupported",
                                      "detail": "the live figures (GET /stats/events) are "
                                                "served over HTTP/1.1 only"})
_TOO_LARGE = answers.error(431, "RequestHeaderFieldsTooLarge")
_TIMEOUT = answers.error(408, "RequestTimeout")

_pack_header = f.HEADER.pack
_PLAIN_HEADERS = f.PADDED | f.PRIORITY_FLAG | f.END_HEADERS  # END_HEADERS alone: no unpadding
_LAST_HEADERS = f.END_HEADERS | f.END_STREAM
_HALF_WINDOW = f.DEFAULT_WINDOW // 2
OPEN, GOING = 0, 1  # and LINGER (rawsse/server/connection.py)


class H2Stream:
    """One open request stream: its request, what the peer lets us send, what waits to go."""

    __slots__ = ("request", "window", "recv_window", "pending", "remote_closed", "length", "stale")

    def __init__(self, request: Request, window: int, length: int = -1) -> None:
        self.request = request
        self.window = window  # the peer's stream window for our DATA
        self.recv_window = 65535  # f.DEFAULT_WINDOW, a constant here: one stream per push
        self.pending: bytes | None = None  # the answer's body still to send; None = unanswered
        self.remote_closed = False  # END_STREAM received: the request is complete
        self.length = length  # content-length announced, -1 when none
        self.stale = False  # still uploading at the last deadline check


class H2Connection(ClientConnection):
    __slots__ = (
        "operator", "inbuf", "decoder", "streams", "blocked", "last_stream_id", "max_streams",
        "send_window", "peer_window", "peer_frame_size", "recv_window", "unacked",
        "block_stream", "block", "block_flags", "goaway_id", "resets", "control",
        "budget_start", "reset_limit",
    )

    def __init__(self, host: "Worker", transport: SocketTransport, operator: bool,
                 received: bytes, going_away: tuple[int, str] | None = None) -> None:
        self.host = host
        self.transport = transport
        self.fd = transport.fd
        self.operator = operator
        self.inbuf = bytearray()
        self.out = bytearray()
        self.events = READABLE
        self.decoder = RequestDecoder(HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE)
        self.streams: dict[int, H2Stream] = {}
        self.blocked: deque[int] = deque()  # streams whose DATA waits for a window
        self.last_stream_id = 0
        self.auth = None
        # A token connection may open one stream until its first token is accepted (auth.py).
        self.max_streams = (host.config.h2_max_streams if host.auth is None
                            else host.auth.initial_streams(transport))
        self.send_window = f.DEFAULT_WINDOW  # the peer's connection window
        self.peer_window = f.DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame_size = f.MIN_FRAME_SIZE
        self.recv_window = f.DEFAULT_WINDOW
        self.unacked = 0  # DATA bytes received and not yet credited back on the connection
        self.block_stream = 0  # the stream whose header block is incomplete (CONTINUATION)
        self.block = bytearray()
        self.block_flags = 0
        self.state = OPEN
        self.goaway_id = -1  # last-stream-id of the GOAWAY sent, -1 before one
        self.deadline = host.loop.now + host.config.h2_idle_timeout
        self.flush_scheduled = False
        self.resets = 0
        self.control = 0
        self.budget_start = host.loop.now
        self.reset_limit = 2 * host.config.h2_max_streams + 100
        self.out += f.settings({
            f.MAX_CONCURRENT_STREAMS: self.max_streams,
            f.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            f.HEADER_TABLE_SIZE: HEADER_TABLE_SIZE,
            f.INITIAL_WINDOW_SIZE: f.DEFAULT_WINDOW,
            f.MAX_FRAME_SIZE: f.MIN_FRAME_SIZE,
            f.ENABLE_PUSH: 0,
        })
        self.schedule_flush()
        if going_away is not None:
            # Refused, or draining: GOAWAY before any stream is taken, and nothing more read (a
            # SETTINGS ACK after it makes the h2 library fail: it treats GOAWAY as the end).
            self.go_away(*going_away)
            self.state = GOING
            return
        self._received(memoryview(received)[len(f.PREFACE):])

    # -- reading ------------------------------------------------------------------------------

    def _read(self) -> None:
        n = self._receive()
        if not n or self.state != OPEN:
            return  # after a connection error nothing more is read; lingering discards
        self._received(self.host.read_view[:n])

    def _received(self, data: Any) -> None:
        # One copy of the read into bytes: each frame's payload is then a bytes slice, which a
        # header block needs anyway (the decoder's caches key on it), with no memoryview made
        # and copied per frame.
        inbuf = self.inbuf
        if inbuf:
            inbuf += data
            data = bytes(inbuf)
            inbuf.clear()
        else:
            data = bytes(data)
        try:
            used = self._frames(data)
        except f.ConnectionError_ as error:
            self._fail(error.code, error.reason)
            return
        except HpackError as error:
            self._fail(f.COMPRESSION_ERROR, f"HPACK: {error}")
            return
        if used < len(data):
            inbuf += data[used:]
        if self.goaway_id < 0:
            self._rearm()
        self._update_events()

    def _frames(self, data: Any) -> int:
        """Handle every complete frame in ``data``; how many bytes they took."""
        # The frame constants are literals here (9: HEADER_SIZE, 16384: our
        # SETTINGS_MAX_FRAME_SIZE, 1: HEADERS, 0: DATA, 4: END_HEADERS): two frames per push.
        pos, end = 0, len(data)
        unpack = f.HEADER.unpack_from
        while end - pos >= 9 and self.state == OPEN and self.fd >= 0:
            high, low, type_, flags, stream_id = unpack(data, pos)
            length = high << 16 | low
            if length > 16384:
                raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "frame larger than MAX_FRAME_SIZE")
            start = pos + 9
            if end - start < length:
                break
            pos = start + length
            stream_id &= 0x7FFFFFFF
            if self.block_stream and type_ != f.CONTINUATION:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "frame interleaved in a header block")
            if type_ == 1:
                if flags & _PLAIN_HEADERS == 4 and stream_id:  # the common case
                    self._header_block(stream_id, flags, data[start:pos])
                else:
                    self._on_headers(stream_id, flags, data[start:pos])
                continue
            payload = data[start:pos]
            if type_ == 0:
                self._on_data(stream_id, flags, payload)
            elif type_ == f.CONTINUATION:
                self._on_continuation(stream_id, flags, payload)
            else:
                control.on_control(self, type_, stream_id, flags, payload)
        return pos

    def _on_headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = _unpad(payload, flags)
        if flags & f.PRIORITY_FLAG:
            if len(payload) < 5:
                raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "HEADERS priority fields truncated")
            payload = payload[5:]
        if flags & f.END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self.block_stream = stream_id
            self.block_flags = flags
            self.block = bytearray(payload)

    def _on_continuation(self, stream_id: int, flags: int, payload: Any) -> None:
        if stream_id == 0 or stream_id != self.block_stream:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = self.block
        block += payload
        if len(block) > MAX_BLOCK:
            raise f.ConnectionError_(f.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.END_HEADERS:
            self.block_stream = 0
            self.block = bytearray()
            self._header_block(stream_id, self.block_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        streams = self.streams
        if (stream_id > self.last_stream_id and stream_id & 1 and self.goaway_id < 0
                and len(streams) < self.max_streams):  # a new request: nearly every block
            request = Request(self, self.operator)
            length = self.decoder.read(block, request)  # before the id is taken: HpackError
            self.last_stream_id = stream_id
            if length < -1:
                self._refuse(stream_id, flags, request, length)
                return
            request.slot = stream_id
            new = streams[stream_id] = H2Stream(request, self.peer_window, length)
            if flags & f.END_STREAM:
                self._request_complete(stream_id, new)
            return
        self.decoder.skip(block)  # decoded always: the table must follow
        stream = streams.get(stream_id)
        if stream is not None:  # trailers: they end the request, their fields are not read
            if not flags & f.END_STREAM or stream.remote_closed:
                self.reset_stream(stream_id, f.PROTOCOL_ERROR)
                return
            self._request_complete(stream_id, stream)
            return
        if stream_id <= self.last_stream_id:
            # A closed stream (§5.1): trailers of a request answered and reset early may still
            # be in flight, so a stream error, not the connection's.
            self.reset_stream(stream_id, f.STREAM_CLOSED)
            return
        if not stream_id & 1:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "even stream id from a client")
        self.last_stream_id = stream_id
        if self.goaway_id < 0:  # §6.8: after our GOAWAY ignored (the client retries them)
            self.reset_stream(stream_id, f.REFUSED_STREAM)  # over MAX_CONCURRENT_STREAMS

    def _refuse(self, stream_id: int, flags: int, request: Request, verdict: int) -> None:
        """A new stream whose header block is malformed (RST_STREAM) or too large (431)."""
        if verdict == MALFORMED:
            self.reset_stream(stream_id, f.PROTOCOL_ERROR)  # §8.1.1 malformed
            return
        request.slot = stream_id
        stream = self.streams[stream_id] = H2Stream(request, self.peer_window)
        stream.remote_closed = bool(flags & f.END_STREAM)
        self.host.stats.bad_requests += 1
        self.answer(request, _TOO_LARGE)

    def _on_data(self, stream_id: int, flags: int, payload: Any) -> None:
        if stream_id == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        # Connection flow control: received bytes are credited back once half the window is
        # used (in this frame, not a call: every push has a DATA frame).
        self.recv_window -= length
        if self.recv_window < 0:
            raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.unacked += length
        if self.unacked >= _HALF_WINDOW:
            self._credit_connection()
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream_id:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "DATA on an idle stream")
            if stream is not None:
                self.reset_stream(stream_id, f.STREAM_CLOSED)
            return  # a stream we closed or reset: its DATA was already in flight
        stream.recv_window -= length
        if stream.recv_window < 0:
            self.reset_stream(stream_id, f.FLOW_CONTROL_ERROR)
            return
        end = flags & f.END_STREAM
        if not end:
            if length:
                stream.recv_window += length
                self.out += f.window_update(stream_id, length)
                self.schedule_flush()
            else:
                control.count_control(self)  # empty DATA without END_STREAM: a flood if repeated
        body = _unpad(payload, flags) if flags & f.PADDED else payload
        request = stream.request
        if body and not request.body_too_large:
            if not request.body and length <= MAX_BODY:  # a push's body: one DATA frame
                request.body = body
            elif len(request.body) + len(body) > MAX_BODY:
                request.body_too_large = True
                request.body = b""
            else:
                request.body += body
        if end:
            if stream.pending is None and stream.length in (-1, len(request.body)):
                # A push's end: served from this frame (``_request_complete`` without its call;
                # what that checks beyond this, a 431 given or the content-length, passed).
                stream.remote_closed = True
                host = self.host
                host.stats.http_requests += 1
                host.routes.handle(request)
            else:
                self._request_complete(stream_id, stream)

    def _credit_connection(self) -> None:
        self.out += f.window_update(0, self.unacked)
        self.recv_window += self.unacked
        self.unacked = 0
        self.schedule_flush()

    def _request_complete(self, stream_id: int, stream: H2Stream) -> None:
        stream.remote_closed = True
        if stream.pending is not None:
            return  # answered already (431): nothing to serve
        request = stream.request
        if stream.length >= 0 and stream.length != len(request.body) and not request.body_too_large:
            self.reset_stream(stream_id, f.PROTOCOL_ERROR)  # §8.1.1: content-length must match
            return
        self.host.stats.http_requests += 1
        self.host.routes.handle(request)

    # -- answers (the Channel of exchange.py) -----------------------------------------------

    def answer(self, request: Request, answer: Answer) -> None:
        stream_id = request.slot
        stream = self.streams.get(stream_id)
        if stream is None or stream.request is not request or stream.pending is not None:
            return  # reset by the client, or answered already
        body = answer.body
        block = response_block(answer.status, answer.headers, answer.content_type, len(body))
        out = self.out
        if body:
            out += f.header(len(block), f.HEADERS, f.END_HEADERS, stream_id)
            out += block
            stream.pending = body
            stream.stale = False  # from here it counts how long the peer's window holds it
            self.send_data(stream_id, stream)
        else:
            self._headers_only(stream_id, stream, block)
            return
        if not self.flush_scheduled:
            self.schedule_flush()

    def _headers_only(self, stream_id: int, stream: H2Stream, block: bytes) -> None:
        """An answer without a body (every push's 200): its HEADERS frame ends the stream (the
        frame header packed here, not in a call)."""
        self.out += _pack_header(len(block) >> 16, len(block) & 0xFFFF, f.HEADERS,
                                 _LAST_HEADERS, stream_id)
        self.out += block
        self._stream_done(stream_id, stream)
        if not self.flush_scheduled:
            self.schedule_flush()

    def answer_ok(self, request: Request, apns_id: bytes) -> None:
        """``answer`` of a push's plain 200 carrying ``apns_id``, with no ``Answer`` made: its
        HEADERS frame written here, and the stream, complete, forgotten here (every push's
        answer: ``_headers_only`` and ``_stream_done`` without their two calls)."""
        stream_id = request.slot
        streams = self.streams
        stream = streams.get(stream_id)
        if stream is None or stream.request is not request or stream.pending is not None:
            return  # reset by the client, or answered already
        block = ok_block(apns_id)
        out = self.out
        out += _pack_header(0, len(block), 1, _LAST_HEADERS, stream_id)  # HEADERS, < 8 KB
        out += block
        if stream.remote_closed and self.goaway_id < 0:
            del streams[stream_id]
        else:
            self._stream_done(stream_id, stream)
        if not self.flush_scheduled:
            self.schedule_flush()

    def become_stream(self, request: Request, token: bytes) -> None:
        """SSE streams (a device's, the live view's) are HTTP/1.1 only: an error answer says
        which."""
        self.answer(request, _FIGURES_REFUSED if token == VIEWER_TOKEN else _SSE_REFUSED)

    def authenticated(self) -> None:
        """The first valid provider token: the full stream limit, in a new SETTINGS."""
        limit = self.host.config.h2_max_streams
        if self.max_streams < limit:
            self.max_streams = limit
            self.out += f.settings({f.MAX_CONCURRENT_STREAMS: limit})
            self.schedule_flush()

    def send_data(self, stream_id: int, stream: H2Stream) -> None:
        body = stream.pending or b""
        while body:
            size = min(len(body), stream.window, self.send_window, self.peer_frame_size)
            if size <= 0:
                stream.pending = body
                if stream_id not in self.blocked:
                    self.blocked.append(stream_id)
                return
            chunk, body = body[:size], body[size:]
            stream.stale = False  # the peer's window let bytes through: not stuck
            stream.window -= size
            self.send_window -= size
            self.out += f.header(size, f.DATA, 0 if body else f.END_STREAM, stream_id)
            self.out += chunk
        self._stream_done(stream_id, stream)

    def _stream_done(self, stream_id: int, stream: H2Stream) -> None:
        del self.streams[stream_id]
        if not stream.remote_closed:
            # §8.1: answered before the request ended: ask the client to stop sending it.
            self.out += f.rst_stream(stream_id, f.NO_ERROR)
        if self.goaway_id >= 0 and not self.streams:
            self.schedule_flush()  # the last answer: the connection closes once it is out

    def unblock(self) -> None:
        blocked = self.blocked
        for _ in range(len(blocked)):
            if self.send_window <= 0:
                return
            stream_id = blocked.popleft()
            stream = self.streams.get(stream_id)
            if stream is not None and stream.pending is not None:
                self.send_data(stream_id, stream)
        self.schedule_flush()

    # -- control frames -----------------------------------------------------------------------

    def reset_stream(self, stream_id: int, code: int) -> None:
        """A stream error (§5.4.2): RST_STREAM; the stream's answer, if any, is dropped."""
        self.streams.pop(stream_id, None)
        self.out += f.rst_stream(stream_id, code)
        self.schedule_flush()

    # -- going away ---------------------------------------------------------------------------

    def shutdown(self, reason: str = "Shutdown") -> None:
        """Graceful GOAWAY (drain, restart): streams up to the highest seen are still answered,
        later ones are ignored (the client sends them again elsewhere), then the close."""
        self.go_away(f.NO_ERROR, reason)

    def go_away(self, code: int, reason: str) -> None:
        if self.goaway_id < 0:
            self.goaway_id = self.last_stream_id
            self.out += f.goaway(self.goaway_id, code, reason)
            self.deadline = self.host.loop.now + GOING_AWAY_SECONDS
        self.schedule_flush()

    def _fail(self, code: int, reason: str) -> None:
        """A connection error: GOAWAY, refuse the streams still uploading, answer the others,
        then close; nothing more is read."""
        log.debug("fd %d: HTTP/2 connection error %d (%s)", self.fd, code, reason)
        self.host.stats.bad_requests += 1
        if self.goaway_id < 0:
            self.goaway_id = self.last_stream_id
        self.out += f.goaway(self.goaway_id, code, reason)
        self.deadline = self.host.loop.now + GOING_AWAY_SECONDS
        self.state = GOING
        self.inbuf = bytearray()
        for stream_id, stream in list(self.streams.items()):
            if not stream.remote_closed:
                self.reset_stream(stream_id, f.REFUSED_STREAM)
        self.schedule_flush()

    def finish_then_close(self) -> None:
        """Drain (the worker's Drainer): a graceful GOAWAY."""
        self.shutdown("Shutdown")

    def _rearm(self) -> None:
        """Idle: ``--h2-idle-timeout`` after the last read. Streams open: checked every
        ``--header-timeout``, however often the client sends something else."""
        config, now = self.host.config, self.host.loop.now
        if not self.streams:
            self.deadline = now + config.h2_idle_timeout
        else:
            self.deadline = min(self.deadline, now + config.header_timeout)

    def timed_out(self) -> None:
        if self.state == LINGER or self.goaway_id >= 0:
            self.close("timeout")
        elif self.streams:
            self._expire_uploads()
            self.deadline = self.host.loop.now + self.host.config.header_timeout
        else:
            self.go_away(f.NO_ERROR, "IdleTimeout")

    def _expire_uploads(self) -> None:
        """Slowloris both ways, checked every ``--header-timeout``: a request still incomplete at
        two checks in a row is answered 408 (as HTTP/1.1's); an answer whose DATA the peer's
        window held back at two checks in a row, with no byte let through between them, is
        reset (CANCEL): a window never opened does not hold a stream forever."""
        for stream_id, stream in list(self.streams.items()):
            if stream.remote_closed and stream.pending is None:
                continue  # complete, waiting for its answer from the routes
            if not stream.stale:
                stream.stale = True
            elif stream.pending is None:
                self.host.stats.bad_requests += 1
                self.answer(stream.request, _TIMEOUT)
            else:
                self.reset_stream(stream_id, f.CANCEL)

    def _end_of_input(self) -> None:
        if self.state == LINGER or not self.streams:
            self.close("client")
            return
        # The client half-closed after sending: answer what it sent, then close.
        self.go_away(f.NO_ERROR, "ClientClosed")
        self.state = GOING

    # -- writing ------------------------------------------------------------------------------

    def _finished(self) -> bool:
        return self.goaway_id >= 0 and not self.streams

    def _forget(self) -> None:
        self.streams.clear()  # breaks the request -> channel -> streams cycles
        self.blocked.clear()

    def _update_events(self) -> None:
        if self.fd < 0:
            return
        reading = self.state == LINGER or (self.state == OPEN and len(self.out) < MAX_OUT)
        events = (READABLE if reading else 0) | (EPOLLOUT if self.out else 0)
        if events != self.events:
            self.events = events
            self.host.loop.modify(self.fd, events)


def _unpad(payload: Any, flags: int) -> Any:
    """§6.1: strip the Pad Length octet and the padding."""
    if not flags & f.PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise f.ConnectionError_(f.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]

