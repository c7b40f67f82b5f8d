"""Raw-socket clients for tests: an HTTP/1.1 requester and an SSE reader that parses exactly as
Fleet's device client does (fleetdm/fleet ``pkg/mdm/apnsmock/client.go``): blank line ends an event,
``:`` is a comment, ``data:``/``event:``/``id:``/``retry:`` are fields, ANY other line is a protocol
error, and a line longer than 8192 bytes is an error."""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import httptools

FLEET_MAX_LINE = 8192


class ProtocolError(Exception):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class _ResponseCollector:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self._headers: dict[str, str] = {}
        self._body = b""
        self._status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            self.parser = httptools.HttpResponseParser(self)  # interim: a new message follows
        else:
            self.responses.append(Response(self._status, self._headers, self._body))
        self._headers, self._body = {}, b""


class HTTPClient:
    """One keep-alive connection; send raw bytes, read parsed responses in order."""

    def __init__(self, host: str, port: int, timeout: float = 5.0,
                 source: tuple[str, int] | None = None, rcvbuf: int | None = None) -> None:
        """``rcvbuf``: SO_RCVBUF set before the connect, so the window the handshake offers
        (and its scale) is that small: the server's writes soon find the socket full."""
        if rcvbuf is None:
            self.sock = socket.create_connection((host, port), timeout=timeout,
                                                 source_address=source)
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        self.collector = _ResponseCollector()
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_responses(self, count: int, timeout: float = 5.0) -> list[Response]:
        deadline = time.monotonic() + timeout
        while len(self.collector.responses) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(self.collector.responses)} of {count} responses")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                break
            self.collector.parser.feed_data(data)
        out = self.collector.responses[:count]
        del self.collector.responses[:count]
        return out

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> Response:
        self.send(build_request(method, path, body, headers))
        responses = self.read_responses(1)
        if not responses:
            raise ConnectionError("connection closed before a response")
        return responses[0]

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.collector.parser.feed_data(data)
        return False

    def close(self) -> None:
        self.sock.close()


def build_request(method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: rawsse"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def fleet_push_request(token: str, magic: str, expiration: int | None = None) -> bytes:
    """Byte for byte what Fleet's push client sends through Go's net/http (nanopush/buford)."""
    body = ('{"mdm":"' + magic + '"}').encode()  # built by concatenation, as Fleet does
    lines = [f"POST /3/device/{token} HTTP/1.1", "Host: rawsse", "User-Agent: Go-http-client/1.1",
             f"Content-Length: {len(body)}", "Content-Type: application/json"]
    if expiration is not None:
        lines.append(f"Apns-Expiration: {expiration}")
    lines.append("Accept-Encoding: gzip")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Event:
    id: str | None
    event: str | None
    data: str


@dataclass
class SSEReader:
    """A device: ``GET /events?token=``, then events parsed the way Fleet's client parses."""

    host: str
    port: int
    token: str
    timeout: float = 5.0
    sock: socket.socket = field(init=False)
    status: int = field(init=False, default=0)
    head: dict[str, str] = field(init=False, default_factory=dict)
    comments: list[str] = field(init=False, default_factory=list)
    retry: int | None = field(init=False, default=None)
    buffer: bytes = field(init=False, default=b"")
    closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.sendall(f"GET /events?token={self.token} HTTP/1.1\r\nHost: rawsse\r\n"
                          f"Accept: text/event-stream\r\n\r\n".encode())
        self._read_head()
        self._id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def _read_head(self) -> None:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError(f"closed before the head: {self.buffer!r}")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.head[name.strip().lower()] = value.strip()

    def _line(self) -> str | None:
        """One line (LF, CRLF or CR ends it), or None at EOF/timeout."""
        while True:
            for i, byte in enumerate(self.buffer):
                if byte in (10, 13):
                    line = self.buffer[:i]
                    rest = self.buffer[i + 1:]
                    if byte == 13 and rest[:1] == b"\n":
                        rest = rest[1:]
                    self.buffer = rest
                    if len(line) > FLEET_MAX_LINE:
                        raise ProtocolError("line longer than 8192 bytes")
                    return line.decode()
            if len(self.buffer) > FLEET_MAX_LINE:
                raise ProtocolError("line longer than 8192 bytes")
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buffer += chunk

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next dispatched event, or None if the stream ends or goes quiet for ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            line = self._line()
            if line is None:
                return None
            if line == "":
                if self._data:
                    event = Event(self._id, self._event, "\n".join(self._data))
                    self._event, self._data = None, []
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value
            elif name == "retry":
                self.retry = int(value) if value.isdigit() else self.retry
            else:
                raise ProtocolError(f"unexpected line {line!r}")

    def events_for(self, seconds: float) -> list[Event]:
        out = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            event = self.next_event(timeout=remaining)
            if event is None:
                if self.closed:
                    break
                continue
            out.append(event)
        return out

    def wait_closed(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.next_event(timeout=max(0.01, deadline - time.monotonic()))
        return self.closed

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def get_json(host: str, port: int, path: str) -> dict:
    client = HTTPClient(host, port)
    try:
        return client.request("GET", path).json()
    finally:
        client.close()


def parse_responses(data: bytes) -> list[Response]:
    """Every complete response in ``data`` (interim 1xx responses skipped), in order."""
    collector = _ResponseCollector()
    collector.parser.feed_data(data)
    return collector.responses


# -- which worker SO_REUSEPORT gives a connection ---------------------------------------------

_PROBE = b"GET /3/device/probe HTTP/1.1\r\nHost: rawsse\r\n\r\n"


def serving_worker(sock: socket.socket) -> str:
    """Which worker process answers on ``sock``: the per-process part of the apns-id it makes up
    for a 405 (``IdGenerator``: random per process in its first four groups). A GET is no push,
    so the connection is never handed to another worker."""
    sock.sendall(_PROBE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the probe's answer: {data!r}")
        data += chunk
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"apns-id":
            return value.strip().decode().rsplit("-", 1)[0]
    raise AssertionError(f"no apns-id in {data!r}")


def reset_close(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): no TIME_WAIT, so the source port is free again at once."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def ports_on_one_worker(host: str, port: int, count: int, wrap=None, worker: str | None = None,
                        other_than: str | None = None) -> tuple[str, list[int]]:
    """``count`` loopback source ports whose connections to ``host:port`` SO_REUSEPORT's hash
    (of the 4-tuple) gives one worker, ``worker`` if named, not ``other_than``; returns that
    worker's id part and the ports. Each is probed once (``serving_worker``) and freed; ``wrap`` wraps the probe's
    socket (TLS). Ports from a random range below Linux's ephemeral ones (32768-60999)."""
    found: dict[str, list[int]] = {}
    start = random.randrange(10_000, 31_000)
    for source in range(start, start + 40 * count):
        try:
            sock = socket.create_connection((host, port), timeout=5,
                                            source_address=("127.0.0.1", source))
        except OSError:
            continue  # in use
        probe = wrap(sock) if wrap else sock
        try:
            who = serving_worker(probe)
        finally:
            reset_close(probe)
        ports = found.setdefault(who, [])
        ports.append(source)
        if len(ports) == count and worker in (None, who) and who != other_than:
            return who, ports
    raise AssertionError(f"no {count} ports on one worker among {found}")
