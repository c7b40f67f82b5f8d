"""One simulated device: connect, read the SSE head, parse events, reconnect with backoff.

The protocol rules (Fleet's client, fleetdm/fleet ``pkg/mdm/apnsmock/client.go``) are in
``devices.py``'s docstring; ``DeviceGroup`` there runs one process's devices on one loop.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import time
from typing import TYPE_CHECKING

import orjson

from rawsse.load.loadgen import error_kind
from rawsse.load.stamp import stamp_time
from rawsse.server.loop import READ_EVENTS, WRITE_EVENTS

if TYPE_CHECKING:
    from rawsse.load.devices import DeviceGroup

MAX_LINE = 8192  # Fleet's scanner.Buffer(..., 8192): a line needs len + 1 bytes of buffer
MAX_HEAD = 16 * 1024
RECV_SIZE = 16 * 1024
# Duplicate check window: the last few ids per device, newest first, as a tuple (a test is up to
# 4 equality checks; a substring search in one "id|id|..." bytes cost more than the parse).
# A redelivered push arrives right after the one it repeats, so 4 is plenty.
RECENT_IDS = 4
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h

IDLE, CONNECTING, HEAD, STREAM, STOPPED = range(5)

# rawsse's events (and the bench baseline's): ``id: `` and a 36-character apns-id (a canonical
# UUID, Apple's rule), then the starts of these two lines. A read holding whole events of that
# shape is counted without the line parser (``feed``). Compared as slices at fixed offsets: in
# Python 3.11 ``bytes.startswith``/``find`` parse their arguments from a format string built per
# call, and ``in`` with an 18-byte needle prepares a two-way search per call (~800 ns each here).
_ID_START, _ID_END = 4, 40
_PING_DATA = b"\nevent: ping\ndata:"
_PING_END = _ID_END + len(_PING_DATA)
_ID_FIELD = b"id: "
_EVENT_END = b"\n\n"
_LF, _CR = ord("\n"), ord("\r")  # an int operand: ``in`` and ``count`` are a memchr


class Device:
    """One simulated device: connect, read the head, parse events, reconnect with backoff."""

    __slots__ = ("group", "token", "source", "sock", "fd", "state", "partial", "event_id",
                 "has_data", "stream_events", "backoff", "timer", "connected_at", "recent_ids",
                 "attempts")

    def __init__(self, group: "DeviceGroup", token: bytes, source: str | None) -> None:
        self.group = group
        self.token = token
        self.source = source
        self.sock: socket.socket | None = None
        self.fd = -1  # the socket's, read with os.read (fewer steps than socket.recv)
        self.state = IDLE
        self.partial = b""  # unparsed bytes: the head so far, then an incomplete line
        self.event_id: bytes | None = None
        self.has_data = False
        self.stream_events = 0
        self.backoff = group.backoff_min
        self.timer: list | None = None
        self.connected_at = 0.0
        self.recent_ids: tuple[bytes, ...] = ()
        self.attempts = 0

    # connect ------------------------------------------------------------------------------------

    def connect(self) -> None:
        group = self.group
        self.timer = None
        if group.stopping:
            return
        group.on_attempt(self)
        self.attempts += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._retry(error_kind(exc.errno, "socket"), healthy=False)
            return
        self.sock = sock
        self.fd = sock.fileno()
        try:
            if self.source is not None:
                # Defer the port choice to connect(), so the kernel can reuse a port across
                # destinations and the 4-tuple, not the source address, is what must be unique.
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source, 0))
            err = sock.connect_ex(group.address)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            self._fail(error_kind(err, "connect"))
            return
        self.state = CONNECTING
        group.loop.add(sock.fileno(), self, WRITE_EVENTS)
        self.timer = group.loop.call_later(group.connect_timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        self._fail("timeout")

    def handle_events(self, events: int) -> None:
        if self.state == STREAM:  # nearly every wakeup: one read, its events counted
            try:
                data = os.read(self.fd, RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(error_kind(exc.errno, "recv"))
                return
            error = self.feed(data) if data else "eof"
            if error is not None:
                self._fail(error)
            return
        sock = self.sock
        assert sock is not None  # registered with the loop only while it has a socket
        if self.state == CONNECTING:
            self._on_connected(sock)
        else:
            self._on_readable(sock)

    def _on_connected(self, sock: socket.socket) -> None:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(error_kind(err, "connect"))
            return
        request = self.group.request_prefix + self.token + self.group.request_suffix
        try:
            sent = sock.send(request)
        except OSError as exc:
            self._fail(error_kind(exc.errno, "send"))
            return
        if sent != len(request):  # a fresh socket's send buffer holds far more than ~150 B
            self._fail("short_send")
            return
        self.state = HEAD
        self.group.loop.modify(sock.fileno(), READ_EVENTS)

    def _on_readable(self, sock: socket.socket) -> None:
        """The response head (``handle_events`` reads a stream's bytes itself)."""
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(error_kind(exc.errno, "recv"))
            return
        if not data:
            self._fail("eof_before_head")
            return
        error = self._on_head(data)
        if error is not None:
            self._fail(error)

    def _on_head(self, data: bytes) -> str | None:
        head = self.partial + data if self.partial else data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.partial = head
            return "head_too_large" if len(head) > MAX_HEAD else None
        self.partial = b""
        status_line, _, headers = head[:end].partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            return "bad_response"
        if parts[1] != b"200":
            return _http_error(parts[1], head[end + 4:])
        if b"chunked" in headers.lower():  # Fleet's non-hijacked fallback; rawsse never sends it
            return "chunked_unsupported"
        group = self.group
        group.loop.cancel(self.timer)
        self.timer = None
        self.state = STREAM
        self.connected_at = group.loop.now
        self.stream_events = 0
        group.on_stream_start(self)
        rest = head[end + 4:]
        return self.feed(rest) if rest else None

    # parse --------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> str | None:
        """Parse stream bytes as Fleet's client does; returns an error kind to drop the stream.

        A read that starts at a line boundary, with nothing of an event before it, and holds
        whole events of the shape rawsse writes (``id: <id>``, ``event: ping``, one ``data:``
        line, a blank line; no ``\\r``; under ``MAX_LINE`` in all) is counted event by event
        without the line parser: a few C calls per read instead of ~15 bytecodes per line. Each
        such event still has its id, so every count, duplicate and latency is the line
        parser's; anything else (a keepalive, an event split over reads, several data lines,
        CRLF) takes the line parser."""
        if (data[_ID_END:_PING_END] == _PING_DATA and data[-2:] == _EVENT_END
                and data[:_ID_START] == _ID_FIELD and len(data) < MAX_LINE and _CR not in data
                and not self.partial and not self.has_data and self.event_id is None):
            # 4 line ends: the two in _PING_DATA and the event's end, so its lines are id, event
            # and data (nearly every read: one event)
            if data.count(_LF) == 4:
                self._received(data[_ID_START:_ID_END])
                return None
            if self._whole_events(data):
                return None
        return self._parse_lines(data)

    def _whole_events(self, data: bytes) -> bool:
        """Several events of rawsse's shape in one read (a device that fell behind): count each,
        or count none and return False (the line parser then reads them all)."""
        events = data.split(_EVENT_END)
        events.pop()  # what follows the last blank line: b"" (or one more blank line)
        for body in events:
            if not (body[_ID_END:_PING_END] == _PING_DATA and body[:_ID_START] == _ID_FIELD
                    and body.count(_LF) == 2):
                return False
        for body in events:
            self._received(body[_ID_START:_ID_END])
        return True

    def _parse_lines(self, data: bytes) -> str | None:
        """The line parser (Fleet's rules, ``devices.py``), for any bytes."""
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        tail = lines.pop()
        if len(tail) >= MAX_LINE:
            return "line_too_long"
        self.partial = tail
        for line in lines:
            if not line or line == b"\r":
                if self.has_data:
                    self.has_data = False
                    event_id, self.event_id = self.event_id, None
                    self._received(event_id)
                else:  # an event without data is dropped, its id with it
                    self.event_id = None
                continue
            if len(line) >= MAX_LINE:
                return "line_too_long"
            if line[0] == 0x3A:  # ":" comment (keepalive)
                continue
            if line.startswith(b"data:"):
                self.has_data = True
            elif line.startswith(b"id:"):
                value = line[3:].rstrip(b"\r")
                self.event_id = value[1:] if value.startswith(b" ") else value
            elif not line.startswith((b"event:", b"retry:")):
                return "unexpected_line"
        return None

    def _received(self, event_id: bytes | None) -> None:
        """Count one delivered event: duplicates, and its latency from the id's stamp (the
        stamp of the group's last id is kept: every device of a broadcast has the same one)."""
        group = self.group
        group.events += 1
        self.stream_events += 1
        if event_id is None:
            group.unstamped += 1
            return
        recent = self.recent_ids
        if event_id in recent:
            group.duplicates += 1
        self.recent_ids = (event_id,) + recent[:RECENT_IDS - 1]
        if event_id == group.last_id:
            stamped = group.last_stamp
        else:
            stamped = group.last_stamp = stamp_time(event_id)
            group.last_id = event_id
        if stamped is None:
            group.unstamped += 1
        else:
            group.latency.record((time.time() - stamped) * 1000.0)

    # end ----------------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """The loop's handler interface: a handler that raised is closed with ``"error"``."""
        self._fail("exception" if reason == "error" else reason)

    def _fail(self, kind: str) -> None:
        healthy = self.state == STREAM and (
            self.stream_events > 0
            or self.group.loop.now - self.connected_at >= self.group.backoff_max)
        self._drop_socket()
        self._retry(kind, healthy)

    def _drop_socket(self) -> None:
        group = self.group
        group.loop.cancel(self.timer)
        self.timer = None
        if self.state == STREAM:
            group.on_stream_end()
        sock, self.sock = self.sock, None
        self.fd = -1
        if sock is not None:
            group.loop.remove(sock.fileno())
            sock.close()
        self.state = IDLE
        self.partial = b""
        self.event_id = None
        self.has_data = False

    def _retry(self, kind: str, healthy: bool) -> None:
        group = self.group
        group.errors[kind] = group.errors.get(kind, 0) + 1
        if group.stopping:
            return
        if healthy:
            self.backoff = group.backoff_min
        delay = self.backoff + random.uniform(0.0, self.backoff / 2)
        self.backoff = min(self.backoff * 2, group.backoff_max)
        self.timer = group.loop.call_later(delay, self.connect)

    def stop(self) -> None:
        self._drop_socket()
        self.state = STOPPED


def _http_error(status: bytes, body: bytes) -> str:
    """``http_400_BadDeviceToken`` when the JSON reason arrived with the head, else ``http_400``."""
    kind = "http_" + status.decode("ascii", "replace")
    try:
        reason = orjson.loads(body).get("reason")
    except (orjson.JSONDecodeError, AttributeError):
        return kind
    return f"{kind}_{reason}" if isinstance(reason, str) and reason.isalnum() else kind
