"""One HTTP/2 connection of ``rawsse push --http2``: up to ``--streams`` pushes in flight as
streams (RFC 9113), over h2c with prior knowledge (``http://``) or TLS with ALPN ``h2``
(``https://``, ``--cacert``).

Theory of operation
-------------------
The connection is up (READY) once the server's first SETTINGS came: only then is the stream limit
known, ``min(--streams, SETTINGS_MAX_CONCURRENT_STREAMS)``, so a stream is never refused for
being over it. Demand is refilled in batches, as Forza's GenStage sender does: new streams are
asked for only once ``refill`` of them are free (half the limit, at most 50), and the driver writes
each batch of HEADERS + DATA frames with one ``send()``; a freed stream costs no syscall of its own.

Frames are ``rawsse.h2.frames``; answers are decoded with ``rawsse.h2.hpack.Decoder`` (anything
HPACK allows, the dynamic table included); requests are ``rawsse.load.h2request`` (the constant
fields in the server's dynamic table from the connection's first request on).

Flow control (§5.2, §6.9): a body goes out in one DATA frame when the connection window, the
stream's initial window and the server's MAX_FRAME_SIZE allow (always, for APNs-sized payloads);
otherwise what does not fit waits in ``blocked`` for WINDOW_UPDATEs and no new stream is opened
meanwhile. Our own receive windows are opened wide at the start and topped up as answers arrive.

Ends (what the driver counts): GOAWAY → the streams above its last-stream-id were never
processed (§6.8) and are handed back to the driver to resend on the next connection (counted
once); those at or below it are awaited, then the connection closes and reconnects. RST_STREAM
REFUSED_STREAM → resent. Any other reset → ``reset_<code>``. A lost connection → its streams are
``lost_<kind>``, as for HTTP/1.1.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import TYPE_CHECKING

from rawsse.h2 import frames as f
from rawsse.h2.hpack import Decoder, HpackError, integer
from rawsse.load import loadgen
from rawsse.load.h1sender import RECONNECT_MIN, Sender
from rawsse.load.h2request import INDEXED, LITERAL, PRIME
from rawsse.load.loadgen import CONNECTING, READY
from rawsse.server.loop import EPOLLOUT, READ_EVENTS, WRITE_EVENTS

if TYPE_CHECKING:
    from rawsse.load.driver import Driver

REFILL_MAX = 50  # GenStage's min_demand in Forza's write-up: ask again once ~50 streams freed
RECEIVE_WINDOW = 1 << 30  # ours, connection and stream: answers are small, never hold them back
RECEIVE_TOP_UP = 1 << 29
MAX_STREAM_ID = 2**31 - 1
TCP, HANDSHAKE, SPEAKING = range(3)  # the phases of CONNECTING, then READY once SETTINGS came
HEADER_TABLE_SIZE = 4096  # our SETTINGS_HEADER_TABLE_SIZE: the default (§6.5.2)
MAX_HEADER_LIST = 64 * 1024
CLIENT_SETTINGS = (f.settings({f.ENABLE_PUSH: 0, f.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
                               f.HEADER_TABLE_SIZE: HEADER_TABLE_SIZE})
                   + f.window_update(0, RECEIVE_WINDOW - f.DEFAULT_WINDOW))
ERROR_NAMES = {code: name for name, code in (  # RFC 9113 §7, for ``reset_<name>`` counts
    ("NO_ERROR", f.NO_ERROR), ("PROTOCOL_ERROR", f.PROTOCOL_ERROR),
    ("INTERNAL_ERROR", f.INTERNAL_ERROR), ("FLOW_CONTROL_ERROR", f.FLOW_CONTROL_ERROR),
    ("STREAM_CLOSED", f.STREAM_CLOSED), ("FRAME_SIZE_ERROR", f.FRAME_SIZE_ERROR),
    ("CANCEL", f.CANCEL), ("COMPRESSION_ERROR", f.COMPRESSION_ERROR),
    ("ENHANCE_YOUR_CALM", f.ENHANCE_YOUR_CALM), ("HTTP_1_1_REQUIRED", f.HTTP_1_1_REQUIRED))}
_CODE = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")


class H2Sender(Sender):
    """An HTTP/2 connection: ``inflight`` maps stream id → (scheduled, sent, push index)."""

    __slots__ = ("inflight", "tls", "streams_limit", "refill", "next_stream", "inbuf", "pending", "decoder",
                 "partial", "answers", "send_window", "stream_window", "max_frame", "blocked",
                 "received", "going_away", "table", "size_update", "phase", "writing")

    def __init__(self, driver: "Driver", tls: ssl.SSLContext | None) -> None:
        super().__init__(driver)
        self.tls = tls
        self.inflight: dict[int, tuple[float, float, int]] = {}
        self._reset_protocol()

    def _reset_protocol(self) -> None:
        self.streams_limit = 0  # 0 until the server's SETTINGS: nothing is sent before them
        self.refill = 1
        self.next_stream = 1
        self.inbuf = bytearray()
        self.pending = bytearray()  # frames not yet written (the socket was full)
        self.decoder = Decoder(HEADER_TABLE_SIZE, MAX_HEADER_LIST)
        self.partial: tuple[int, int, bytearray] | None = None  # HEADERS awaiting CONTINUATION
        self.answers: dict[int, list] = {}  # stream → [status, body parts], once HEADERS came
        self.send_window = f.DEFAULT_WINDOW  # the connection's (§6.9.2)
        self.stream_window = f.DEFAULT_WINDOW  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = f.MIN_FRAME_SIZE
        self.blocked: dict[int, list] = {}  # stream → [body left, stream window left]
        self.received = 0  # bytes of DATA since our last connection WINDOW_UPDATE
        self.going_away = False
        self.size_update = b""  # a dynamic table size update the next block must start with
        self.table = PRIME  # the first request puts the constant fields in the server's table
        self.phase = TCP
        self.writing = False  # registered for EPOLLOUT (bytes wait in ``pending``)

    # -- connection life ------------------------------------------------------------------------

    def connect(self) -> None:
        self._reset_protocol()
        super().connect()

    def handle_events(self, events: int) -> None:
        sock = self.sock
        assert sock is not None  # registered with the loop only while it has a socket
        if self.phase != SPEAKING:
            self._connecting(sock)
            return
        if events & EPOLLOUT and self.pending:
            self._write_pending()
        if self.sock is not None and events & ~EPOLLOUT:
            self._read(sock)

    def _connecting(self, sock: socket.socket) -> None:
        """The TCP connect, then the TLS handshake, then our preface and SETTINGS."""
        if self.phase == TCP:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(loadgen.error_kind(err, "connect"))
                return
            if self.tls is not None:  # wrapped only now: ssl needs a connected socket
                sock = self.sock = self.tls.wrap_socket(
                    sock, server_hostname=self.driver.server_name, do_handshake_on_connect=False)
            self.phase = HANDSHAKE
        if isinstance(sock, ssl.SSLSocket) and not self._handshake(sock):
            return
        self.phase = SPEAKING
        self.driver.loop.modify(sock.fileno(), READ_EVENTS)
        self._queue(f.PREFACE + CLIENT_SETTINGS)
        self._write_pending()

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """One step of the TLS handshake; True once done with ALPN h2."""
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.driver.loop.modify(sock.fileno(), READ_EVENTS)
            return False
        except ssl.SSLWantWriteError:
            self.driver.loop.modify(sock.fileno(), WRITE_EVENTS)
            return False
        except ssl.SSLCertVerificationError:
            self._fail("tls_verify")
            return False
        except (ssl.SSLError, OSError):
            self._fail("tls")
            return False
        if sock.selected_alpn_protocol() != "h2":  # the server would answer HTTP/1.1
            self._fail("no_h2")
            return False
        return True

    def _went_up(self) -> None:
        """The server's first SETTINGS: the connection is up."""
        self.state = READY
        self.backoff = RECONNECT_MIN
        self.driver.last_up = self.driver.loop.now
        self.driver.ever_up = True

    def shutdown(self) -> None:
        super().shutdown()
        self.answers = {}
        self.blocked = {}
        self.pending = bytearray()

    def _fail(self, kind: str) -> None:
        self.answers = {}
        self.blocked = {}
        super()._fail(kind)

    def pushes_in_flight(self) -> int:
        return len(self.inflight)

    def forget_in_flight(self) -> None:
        self.inflight.clear()

    def check_timeout(self, now: float, timeout: float) -> None:
        if self.state == CONNECTING and now - self.since > timeout:
            self._fail("timeout")
        elif self.inflight and now - next(iter(self.inflight.values()))[1] > timeout:  # oldest
            self._fail("timeout")

    @property
    def free_slots(self) -> int:
        if self.state != READY or self.pending or self.blocked or self.going_away:
            return 0
        free = min(self.streams_limit, (MAX_STREAM_ID - self.next_stream) // 2) - len(self.inflight)
        return free if free >= self.refill or not self.inflight else 0

    # -- requests -------------------------------------------------------------------------------

    def request(self, k: int, path_token: bytes | None, serial: bytes, stamp_at: float,
                scheduled: float, now: float) -> bytes:
        """HEADERS (+ DATA) of push ``k`` on a new stream."""
        stream_id = self.next_stream
        self.next_stream += 2
        self.inflight[stream_id] = (scheduled, now, k)
        table = self.table
        block, body = self.driver.h2_encoder.encode(path_token, serial, stamp_at, table)
        if table == PRIME:
            self.table = INDEXED
        elif self.size_update:  # must open the block (RFC 7541 §4.2)
            block, self.size_update = self.size_update + block, b""
        if not body:
            return f.header(len(block), f.HEADERS, f.END_HEADERS | f.END_STREAM, stream_id) + block
        headers = f.header(len(block), f.HEADERS, f.END_HEADERS, stream_id) + block
        size = len(body)
        if (size <= self.send_window and size <= self.stream_window and size <= self.max_frame
                and not self.blocked):
            self.send_window -= size
            return headers + f.header(size, f.DATA, f.END_STREAM, stream_id) + body
        self.blocked[stream_id] = [memoryview(body), self.stream_window]
        return headers

    def write(self, data: bytes) -> None:
        self.driver.h2_batches += 1
        self._queue(data)
        if self.blocked:  # bodies that did not fit the windows: what fits goes after the HEADERS
            self._send_blocked()
        self._write_pending()

    def _send_blocked(self) -> None:
        """Bodies that waited for window: as much of each as the windows allow, in stream order."""
        for stream_id in sorted(self.blocked):
            body, window = self.blocked[stream_id]
            while body and self.send_window > 0 and window > 0:
                size = min(len(body), self.send_window, window, self.max_frame)
                last = f.END_STREAM if size == len(body) else 0
                self._queue(f.header(size, f.DATA, last, stream_id) + bytes(body[:size]))
                body = body[size:]
                self.send_window -= size
                window -= size
            if body:
                self.blocked[stream_id] = [body, window]
                break  # the connection window is spent
            del self.blocked[stream_id]

    def _queue(self, data: bytes) -> None:
        self.pending += data

    def _write_pending(self) -> None:
        """Write what is queued; wait for EPOLLOUT only while bytes remain."""
        sock = self.sock
        if sock is None or not self.pending:
            return
        try:
            sent = sock.send(self.pending)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            self._fail(loadgen.error_kind(exc.errno, "send"))
            return
        del self.pending[:sent]
        waiting = bool(self.pending)
        if waiting != self.writing:
            self.writing = waiting
            self.driver.loop.modify(sock.fileno(), WRITE_EVENTS if waiting else READ_EVENTS)

    # -- answers --------------------------------------------------------------------------------

    def _read(self, sock: socket.socket) -> None:
        while True:
            data = self._receive(sock)
            if data is None:
                if self.sock is None:
                    return
                break
            self.inbuf += data
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                break  # plain TCP: one recv per turn; TLS: until its buffer is empty
        try:
            self._frames()
        except (HpackError, ProtocolError):
            self._queue(f.goaway(0, f.PROTOCOL_ERROR, "bad answer"))
            self._write_pending()
            self._fail("bad_response")
            return
        if self.sock is None:
            return
        self._write_pending()
        if self.going_away and not self.inflight:
            self._reconnect_now()
        else:
            self.driver.request_pump()

    def _frames(self) -> None:
        buf = self.inbuf
        view = memoryview(buf)
        pos, end = 0, len(buf)
        try:
            while end - pos >= f.HEADER_SIZE and self.sock is not None:
                high, low, type_, flags, stream_id = f.HEADER.unpack_from(buf, pos)
                length = high << 16 | low
                if length > f.MIN_FRAME_SIZE:  # we announced no larger SETTINGS_MAX_FRAME_SIZE
                    raise ProtocolError("frame too large")
                if end - pos - f.HEADER_SIZE < length:
                    break
                start = pos + f.HEADER_SIZE
                pos = start + length
                self._frame(type_, flags, stream_id & MAX_STREAM_ID, bytes(view[start:pos]))
        finally:
            view.release()
        if self.sock is not None:
            del buf[:pos]

    def _frame(self, type_: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.partial is not None and type_ != f.CONTINUATION:
            raise ProtocolError("a header block interrupted")  # §6.10
        if type_ == f.HEADERS:
            self._on_headers(stream_id, flags, payload)
        elif type_ == f.DATA:
            self._on_data(stream_id, flags, payload)
        elif type_ == f.CONTINUATION:
            self._on_continuation(stream_id, flags, payload)
        elif type_ == f.SETTINGS:
            if not flags & f.ACK:
                self._on_settings(payload)
        elif type_ == f.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif type_ == f.PING:
            if not flags & f.ACK and len(payload) == 8:
                self._queue(f.ping_ack(payload))
        elif type_ == f.RST_STREAM:
            self._on_reset(stream_id, payload)
        elif type_ == f.GOAWAY:
            self._on_goaway(payload)
        elif type_ == f.PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE after ENABLE_PUSH 0")  # §8.4
        # PRIORITY and unknown types are ignored (§5.5)

    def _on_headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        start, end = 0, len(payload)
        if flags & f.PADDED:
            start, end = 1, end - payload[0]
        if flags & f.PRIORITY_FLAG:
            start += 5
        if start > end:
            raise ProtocolError("padding")
        block = payload[start:end]
        if flags & f.END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self.partial = (stream_id, flags, bytearray(block))

    def _on_continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        partial = self.partial
        if partial is None or partial[0] != stream_id:
            raise ProtocolError("CONTINUATION out of place")
        partial[2].extend(payload)
        if flags & f.END_HEADERS:
            self.partial = None
            self._header_block(stream_id, partial[1], bytes(partial[2]))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        fields, _ = self.decoder.decode(block)  # decoded even for a reset stream: table in step
        answer = self.answers.get(stream_id)
        if answer is None and stream_id in self.inflight:
            status = next((value for name, value in fields if name == b":status"), b"0")
            if status[:1] != b"1":  # an informational answer is not the answer (RFC 9110 §15.2)
                self.answers[stream_id] = [int(status) if status.isdigit() else 0]
                if status == b"200" and self.driver.verify_ids is not None:  # --verify
                    self.driver.verify_ids.append(
                        next((value for name, value in fields if name == b"apns-id"), b""))
        if flags & f.END_STREAM:
            self._complete(stream_id)

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        self.received += len(payload)
        if self.received >= RECEIVE_TOP_UP:
            self._queue(f.window_update(0, self.received))
            self.received = 0
        answer = self.answers.get(stream_id)
        if answer is not None:
            if flags & f.PADDED and payload:
                payload = payload[1:len(payload) - payload[0]]
            answer.append(payload)
        if flags & f.END_STREAM:
            self._complete(stream_id)

    def _complete(self, stream_id: int) -> None:
        entry = self.inflight.pop(stream_id, None)
        answer = self.answers.pop(stream_id, None)
        if entry is None:
            return
        if answer is None:
            raise ProtocolError("a stream ended without a status")
        body = b"".join(answer[1:]) if len(answer) > 1 else b""
        self.driver.record(answer[0], body, entry[0])

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS length")
        for key, value in f.parse_settings(payload):
            if key == f.MAX_CONCURRENT_STREAMS:
                self.streams_limit = min(self.driver.streams_wanted, value)
                self.driver.note_server_streams(value)
            elif key == f.INITIAL_WINDOW_SIZE:
                for waiting in self.blocked.values():  # §6.9.2: the change applies to open streams
                    waiting[1] += value - self.stream_window
                self.stream_window = value
            elif key == f.HEADER_TABLE_SIZE:
                self._table_size(value)
            elif key == f.MAX_FRAME_SIZE:
                self.max_frame = value
        self._queue(f.SETTINGS_ACK)
        if self.state == CONNECTING:
            if self.streams_limit == 0:  # no MAX_CONCURRENT_STREAMS: unlimited (§6.5.2)
                self.streams_limit = self.driver.streams_wanted
            self.refill = max(1, min(REFILL_MAX, self.streams_limit // 2))
            self._went_up()
        self._send_blocked()

    def _table_size(self, size: int) -> None:
        """Too small a table for the constant fields: literals, after a size update (§6.3) if
        they were already in it."""
        if size >= self.driver.h2_encoder.table_size:
            return
        if self.table == INDEXED:
            self.size_update = integer(size, 5, 0x20)
        self.table = LITERAL

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        (increment,) = _CODE.unpack_from(payload)
        if stream_id == 0:
            self.send_window += increment & MAX_STREAM_ID
        elif stream_id in self.blocked:
            self.blocked[stream_id][1] += increment & MAX_STREAM_ID
        if self.blocked:
            self._send_blocked()

    def _on_reset(self, stream_id: int, payload: bytes) -> None:
        (code,) = _CODE.unpack_from(payload)
        entry = self.inflight.pop(stream_id, None)
        self.answers.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if entry is None:
            return
        if code == f.REFUSED_STREAM:  # never processed (§8.7): safe to send again
            self.driver.resend(entry[2], entry[0], "refused")
        else:
            self.driver.count_error(f"reset_{ERROR_NAMES.get(code, code)}")

    def _on_goaway(self, payload: bytes) -> None:
        last_stream, _ = _GOAWAY.unpack_from(payload)
        last_stream &= MAX_STREAM_ID
        self.going_away = True
        self.driver.h2_goaways += 1
        for stream_id in [s for s in self.inflight if s > last_stream]:
            scheduled, _, k = self.inflight.pop(stream_id)
            self.answers.pop(stream_id, None)
            self.blocked.pop(stream_id, None)
            self.driver.resend(k, scheduled, "goaway")

    def _reconnect_now(self) -> None:
        """A GOAWAY'd connection whose streams are all answered: a new one, with no error."""
        self.shutdown()
        self.connect()


class ProtocolError(Exception):
    """The server broke RFC 9113: the connection is closed (``bad_response``)."""

