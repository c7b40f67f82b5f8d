"""One simulated device: connect, read the SSE head, parse events, reconnect with backoff.

The protocol rules (Fleet's client, fleetdm/fleet ``pkg/mdm/apnsmock/client.go``) are in
``devices.py``'s docstring; ``DeviceGroup`` there runs one process's devices on one loop.
"""

from __future__ import annotations

import errno
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
# Duplicate check window: the last few ids per device, kept as one bytes object ("id|id|…").
# A redelivered push arrives right after the one it repeats, so 4 is plenty and costs ≤ 150 B.
RECENT_IDS = 4
RECENT_BYTES = RECENT_IDS * 37
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h

IDLE, CONNECTING, HEAD, STREAM, STOPPED = range(5)


class Device:
    """One simulated device: connect, read the head, parse events, reconnect with backoff."""

    __slots__ = ("group", "token", "source", "sock", "state", "partial", "event_id", "has_data",
                 "stream_events", "backoff", "timer", "connected_at", "recent_ids", "attempts")

    def __init__(self, group: "DeviceGroup", token: bytes, source: str | None) -> None:
        self.group = group
        self.token = token
        self.source = source
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.partial = b""  # unparsed bytes: the head so far, then an incomplete line
        self.event_id: bytes | None = None
        self.has_data = False
        self.stream_events = 0
        self.backoff = group.backoff_min
        self.timer: list | None = None
        self.connected_at = 0.0
        self.recent_ids = b""
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
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(error_kind(exc.errno, "recv"))
            return
        if not data:
            self._fail("eof" if self.state == STREAM else "eof_before_head")
            return
        error = self._on_head(data) if self.state == HEAD else self.feed(data)
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
        """Parse stream bytes as Fleet's client does; returns an error kind to drop the stream."""
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
                    self._dispatch()
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

    def _dispatch(self) -> None:
        group = self.group
        group.events += 1
        self.stream_events += 1
        self.has_data = False
        event_id, self.event_id = self.event_id, None
        if event_id is None:
            group.unstamped += 1
            return
        if event_id in self.recent_ids:
            group.duplicates += 1
        self.recent_ids = (event_id + b"|" + self.recent_ids)[:RECENT_BYTES]
        stamped = stamp_time(event_id)
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
