"""10,000 concurrent device streams held by ONE test process.

The devices are raw non-blocking sockets read through one ``select.epoll`` (a thread or a blocking
socket per device would not fit in a test); their source addresses are spread over
127.0.0.2–127.0.0.9 so ephemeral ports and earlier runs' TIME_WAIT entries never run short. Every
device receives one broadcast and one push targeted at it, sent by 5 keep-alive senders that
pipeline their requests; each device's events are parsed (Fleet's line rules) and counted by id:
every event exactly once, none lost, none duplicated. Every phase has a deadline, so a hang is a
failure with counts, not a stuck run.
"""

from __future__ import annotations

import errno
import json
import resource
import select
import socket
import threading
import time
import uuid
from typing import Iterator

import pytest

from wire import get_json, parse_responses, wait_for

STREAMS = 10_000
SENDERS = 5
PIPELINE = 200  # requests per write on a sender connection
SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 10)]
CONNECTS_IN_FLIGHT = 1000  # under somaxconn (4096) so no SYN waits a 1 s retransmit
PHASE_SECONDS = 20.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
FLEET_MAX_LINE = 8192


@pytest.fixture
def open_file_room() -> Iterator[None]:
    """Raise this process's soft open-file limit to the hard one for the client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < STREAMS + 500:
        pytest.skip(f"open-file hard limit {hard} < {STREAMS + 500}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def token_of(index: int) -> str:
    return ("scale" + f"{index:06d}").encode().hex()


def push_id(index: int) -> str:
    return f"00000000-0000-4000-8000-{index:012x}"


class Device:
    __slots__ = ("index", "sock", "buffer", "head", "ids", "error")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.buffer = b""
        self.head = False
        self.ids: list[str] = []
        self.error = ""

    def take(self, data: bytes) -> None:
        """Parse what arrived: the head once, then whole events (blank-line terminated)."""
        self.buffer += data
        if not self.head:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200 ") or b"text/event-stream" not in head:
                self.error = f"bad head {head[:80]!r}"
            self.head = True
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, block: bytes) -> None:
        event_id, data = None, []
        for line in block.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if len(line) > FLEET_MAX_LINE:
                self.error = "line over 8192 bytes"
            elif name == b"id":
                event_id = value.decode()
            elif name == b"data":
                data.append(value)
            elif name not in (b"", b"event", b"retry"):  # b"" is a ":" comment
                self.error = f"unexpected line {line[:80]!r}"
        if data:
            self.ids.append(event_id or "")


class Fleet:
    """``STREAMS`` device sockets on one epoll."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.epoll = select.epoll()
        self.devices: dict[int, Device] = {}

    def connect_all(self) -> None:
        """Open every stream, at most ``CONNECTS_IN_FLIGHT`` not yet answered at a time."""
        waiting = 0
        next_index = 0
        deadline = time.monotonic() + PHASE_SECONDS
        while next_index < STREAMS or waiting:
            while next_index < STREAMS and waiting < CONNECTS_IN_FLIGHT:
                self._open(next_index)
                next_index += 1
                waiting += 1
            for fd, events in self.epoll.poll(1.0):
                device = self.devices[fd]
                if events & select.EPOLLOUT:
                    self._send_request(device)
                    continue
                had_head = device.head
                self._read(device)
                if device.error:
                    pytest.fail(f"stream {device.index}: {device.error}")
                if device.head and not had_head:
                    waiting -= 1
            if time.monotonic() > deadline:
                pytest.fail(f"{next_index - waiting} of {STREAMS} streams open "
                            f"after {PHASE_SECONDS}s")

    def _open(self, index: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((SOURCE_ADDRESSES[index % len(SOURCE_ADDRESSES)], 0))
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
        self.devices[sock.fileno()] = Device(index, sock)
        # ONESHOT-like: writable once (connected), then readable until the head is in.
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def _send_request(self, device: Device) -> None:
        code = device.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert code == 0, f"connect failed: {errno.errorcode.get(code, code)}"
        device.sock.send(f"GET /events?token={token_of(device.index)} HTTP/1.1\r\n"
                         "Host: rawsse\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.epoll.modify(device.sock.fileno(), select.EPOLLIN)

    def _read(self, device: Device) -> None:
        try:
            data = device.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            device.error = device.error or "stream closed by the server"
            self.epoll.unregister(device.sock.fileno())
            return
        device.take(data)

    def read_until(self, done, seconds: float) -> None:
        """Read every stream until ``done()`` or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            for fd, _events in self.epoll.poll(0.2):
                self._read(self.devices[fd])

    def close(self) -> None:
        for device in self.devices.values():
            device.sock.close()
        self.epoll.close()


# -- senders --------------------------------------------------------------------------------------

def push_bytes(index: int) -> bytes:
    body = b'{"mdm":"scale%d"}' % index
    return (b"POST /3/device/%s HTTP/1.1\r\nHost: rawsse\r\nContent-Type: application/json\r\n"
            b"apns-id: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (token_of(index).encode(), push_id(index).encode(), len(body), body))


def send_pipelined(host: str, port: int, indexes: range, statuses: dict[int, int]) -> None:
    """One keep-alive sender: ``PIPELINE`` pushes per write, then their answers, in order."""
    sock = socket.create_connection((host, port), timeout=PHASE_SECONDS)
    try:
        for start in range(0, len(indexes), PIPELINE):
            batch = indexes[start:start + PIPELINE]
            sock.sendall(b"".join(push_bytes(i) for i in batch))
            raw = b""
            while len(responses := parse_responses(raw)) < len(batch):
                chunk = sock.recv(65536)
                assert chunk, "sender connection closed"
                raw += chunk
            for index, response in zip(batch, responses):
                assert response.headers.get("apns-id") == push_id(index), "answers out of order"
                statuses[index] = response.status
    finally:
        sock.close()


def send_targeted(host: str, port: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(indexes: range) -> None:
        try:
            send_pipelined(host, port, indexes, statuses)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    share = STREAMS // SENDERS
    threads = [threading.Thread(target=run, args=(range(k * share, (k + 1) * share),))
               for k in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PHASE_SECONDS)
    assert not any(t.is_alive() for t in threads), "senders still running"
    if errors:
        raise errors[0]
    return statuses


def broadcast(host: str, port: int, apns_id: str) -> dict:
    body = b'{"mdm":"everyone"}'
    with socket.create_connection((host, port), timeout=PHASE_SECONDS) as sock:
        sock.sendall(b"POST /broadcast HTTP/1.1\r\nHost: rawsse\r\napns-id: %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (apns_id.encode(), len(body), body))
        raw = b""
        while not (responses := parse_responses(raw)):
            chunk = sock.recv(65536)
            assert chunk, "closed before the broadcast answer"
            raw += chunk
    assert responses[0].status == 200, responses[0]
    return json.loads(responses[0].body)


# -- the test -------------------------------------------------------------------------------------

def test_ten_thousand_streams_get_a_broadcast_and_their_own_push_exactly_once(start_server,
                                                                           open_file_room):
    started = time.monotonic()
    server = start_server("--keepalive", "0")
    fleet = Fleet(server.host, server.port)
    try:
        fleet.connect_all()
        assert wait_for(lambda: get_json(server.host, server.admin_port, "/stats")["node"]["streams"]
                        == STREAMS, timeout=10)

        broadcast_id = str(uuid.uuid4())
        assert broadcast(server.host, server.port, broadcast_id)["streams"] == STREAMS
        statuses = send_targeted(server.host, server.port)
        assert len(statuses) == STREAMS and set(statuses.values()) == {200}

        devices = list(fleet.devices.values())
        fleet.read_until(lambda: all(len(d.ids) >= 2 or d.error for d in devices), PHASE_SECONDS)
        fleet.read_until(lambda: False, 0.3)  # anything more would be a duplicate
    finally:
        fleet.close()

    errors = [(d.index, d.error) for d in devices if d.error]
    assert not errors, f"{len(errors)} devices failed, e.g. {errors[:3]}"
    wrong = [(d.index, d.ids) for d in devices
             if sorted(d.ids) != sorted([broadcast_id, push_id(d.index)])]
    assert not wrong, f"{len(wrong)} devices got the wrong events, e.g. {wrong[:3]}"

    stats = get_json(server.host, server.admin_port, "/stats")["node"]
    assert stats["delivered_live"] == STREAMS
    assert stats["broadcast_events"] == STREAMS
    assert stats["pushes_received"] == STREAMS
    assert time.monotonic() - started < 60
