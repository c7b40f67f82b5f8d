"""GOAWAY on every planned close, seen by a hand-written HTTP/2 sender that behaves as Go's
transport does: streams above the last-stream-id are sent again on a new connection, streams up
to it must be answered before the close. A last-stream-id too low would make such a sender
deliver a push twice; a stream it covers left unanswered would lose one. (The ``h2`` library
drops answers that follow a GOAWAY, so it cannot be the sender here.)"""

from __future__ import annotations

import collections
import selectors
import signal
import socket
import struct
import time
import uuid

import hpack

from rawsse.h2 import frames as f
from test_h2_hostile import RawH2, frame, goaway_of
from test_push_api import new_token


class Sender:
    """Pushes over HTTP/2 connections, ``window`` streams in flight, re-sending what a GOAWAY
    excludes, a REFUSED_STREAM or a 503 refuses (never what a 200 accepted)."""

    def __init__(self, server, pushes: list[tuple[str, str]], window: int) -> None:
        self.server = server
        self.todo = collections.deque(pushes)
        self.window = window
        self.accepted: dict[str, str] = {}  # apns-id -> token, answered 200
        self.lost: list[str] = []  # covered by a GOAWAY, never answered
        self.goaways: list[tuple[int, int, dict]] = []
        self.beyond_goaway: list[int] = []  # answered though the GOAWAY excluded them
        self.conn: _Conn | None = None
        self.old: list[_Conn] = []  # GOAWAY'd connections still owing answers

    def step(self) -> None:
        if self.conn is None or self.conn.goaway is not None or self.conn.closed:
            if self.conn is not None:
                self.old.append(self.conn)
            self.conn = _Conn(self.server)
        conn = self.conn
        while self.todo and len(conn.inflight) < self.window:
            token, apns_id = self.todo.popleft()
            conn.push(token, apns_id)
        conn.flush()
        for c in [conn, *self.old]:
            c.read(self)
        self.old = [c for c in self.old if not c.closed]

    def close(self) -> None:
        for conn in [self.conn, *self.old]:
            if conn is not None and not conn.closed:
                conn.closed = True
                conn.sock.close()

    def done(self) -> bool:
        return not self.todo and (self.conn is None or not self.conn.inflight) and not self.old


class _Conn:
    def __init__(self, server) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.sock.setblocking(False)
        self.out = bytearray(f.PREFACE + frame(f.SETTINGS, 0, 0))
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.next_id = 1
        self.inflight: dict[int, tuple[str, str]] = {}
        self.buffer = b""
        self.goaway: int | None = None
        self.closed = False

    def push(self, token: str, apns_id: str) -> None:
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"),
                                     (":path", f"/3/device/{token}"), (":authority", "x"),
                                     ("apns-id", apns_id)])
        body = b'{"aps":{"n":"%s"}}' % apns_id.encode()
        self.out += frame(f.HEADERS, f.END_HEADERS, self.next_id, block)
        self.out += frame(f.DATA, f.END_STREAM, self.next_id, body)
        self.inflight[self.next_id] = (token, apns_id)
        self.next_id += 2

    def flush(self) -> None:
        if self.closed:
            return
        try:
            while self.out:
                del self.out[:self.sock.send(self.out)]
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass

    def read(self, sender: Sender) -> None:
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self._closed(sender)
                break
            self.buffer += chunk
            self._frames(sender)
        self.flush()

    def _frames(self, sender: Sender) -> None:
        data = self.buffer
        while len(data) >= 9:
            high, low, type_, flags, stream_id = f.HEADER.unpack_from(data)
            length = high << 16 | low
            if len(data) < 9 + length:
                break
            payload, data = data[9:9 + length], data[9 + length:]
            self._frame(sender, type_, flags, stream_id, payload)
        self.buffer = data

    def _frame(self, sender: Sender, type_: int, flags: int, stream_id: int, payload: bytes) -> None:
        if type_ == f.HEADERS:
            status = dict(self.decoder.decode(payload))[":status"]
            if stream_id not in self.inflight:  # above the GOAWAY's last-stream-id, yet served
                sender.beyond_goaway.append(stream_id)
                return
            token, apns_id = self.inflight.pop(stream_id)
            if status == "200":
                assert apns_id not in sender.accepted, f"{apns_id} answered 200 twice"
                sender.accepted[apns_id] = token
            else:
                assert status == "503", status
                sender.todo.append((token, apns_id))  # refused: safe to send again
        elif type_ == f.DATA and payload:
            self.out += frame(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", len(payload)))
        elif type_ == f.RST_STREAM and stream_id in self.inflight:
            assert struct.unpack(">L", payload)[0] == f.REFUSED_STREAM
            sender.todo.append(self.inflight.pop(stream_id))
        elif type_ == f.SETTINGS and not flags & f.ACK:
            self.out += frame(f.SETTINGS, f.ACK, 0)
        elif type_ == f.GOAWAY:
            last, code, debug = goaway_of([(type_, flags, stream_id, payload)])
            sender.goaways.append((last, code, debug))
            self.goaway = last
            for sid in [s for s in self.inflight if s > last]:  # never processed: send again
                sender.todo.append(self.inflight.pop(sid))

    def _closed(self, sender: Sender) -> None:
        self.closed = True
        sender.lost += [apns_id for _, apns_id in self.inflight.values()]
        self.inflight.clear()
        self.sock.close()


class Devices:
    """One SSE stream per token, reconnected whenever it ends; counts events by id."""

    def __init__(self, server, tokens: list[str]) -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.seen: collections.Counter[str] = collections.Counter()
        self.retry: dict[str, float] = {t: 0.0 for t in tokens}
        self.buffers: dict[socket.socket, bytes] = {}

    def poll(self, timeout: float) -> None:
        now = time.monotonic()
        for token, at in list(self.retry.items()):
            if at <= now:
                del self.retry[token]
                self._connect(token)
        for key, _ in self.selector.select(timeout):
            self._read(key.fileobj, key.data)

    def _connect(self, token: str) -> None:
        try:
            sock = socket.create_connection((self.server.host, self.server.port), timeout=2)
        except OSError:
            self.retry[token] = time.monotonic() + 0.05
            return
        sock.sendall(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.setblocking(False)
        self.buffers[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ, token)

    def _read(self, sock, token: str) -> None:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data = self.buffers[sock] + chunk
        if not chunk or (data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 200")
                         and b"\r\n\r\n" in data):
            self.selector.unregister(sock)
            del self.buffers[sock]
            sock.close()
            self.retry[token] = time.monotonic() + 0.05  # ended or refused (503): reconnect
            return
        *lines, rest = data.split(b"\n")
        self.buffers[sock] = rest
        for line in lines:
            if line.startswith(b"id: "):
                self.seen[line[4:].decode()] += 1

    def close(self) -> None:
        for sock in list(self.buffers):
            sock.close()
        self.selector.close()


def test_hup_under_continuous_pushes_loses_and_duplicates_nothing(start_server):
    """SIGHUP restarts both workers one at a time while a sender keeps 20 streams in flight:
    every push is answered 200 exactly once and reaches its device exactly once."""
    # Answers held 30-60 ms: whenever a GOAWAY leaves, streams are in flight on both sides of it.
    srv = start_server("--workers", "2", "--drain-seconds", "0.3", "--keepalive", "0",
                       "--response-delay", "uniform:30ms-60ms")
    tokens = [new_token() for _ in range(400)]
    pushes = [(t, str(uuid.uuid4())) for t in tokens]  # one push per token: none supersedes another
    devices = Devices(srv, tokens)
    sender = Sender(srv, pushes, window=20)
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            devices.poll(0.01)  # every device connected before the first push
        hup_at = len(pushes) // 8
        sent = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (sender.done() and
                                                   len(devices.seen) >= len(sender.accepted)):
            if sent < len(pushes) and len(sender.accepted) >= hup_at and hup_at >= 0:
                srv.signal(signal.SIGHUP)
                hup_at = -1
            if not sender.done():
                sender.step()
                sent += 1
            devices.poll(0.005)
            time.sleep(0.003)  # ~3,000 pushes/s at most: the HUP lands mid-run
    finally:
        devices.close()
        sender.close()
    assert "rolling restart finished" in srv.output()
    assert any(d == {"reason": "Shutdown"} for _, _, d in sender.goaways), sender.goaways
    assert sender.lost == [], "streams covered by a GOAWAY were never answered"
    assert sender.beyond_goaway == [], "served streams the GOAWAY told the sender to send again"
    assert set(sender.accepted) == {apns_id for _, apns_id in pushes}
    duplicates = {i: n for i, n in devices.seen.items() if n > 1}
    assert duplicates == {}
    missing = set(sender.accepted) - set(devices.seen)
    assert not missing, f"{len(missing)} pushes answered 200 never delivered"
    assert "Traceback" not in srv.output()


def test_streams_opened_before_the_goaway_are_all_answered_after_it(start_server):
    """Streams still uploading when SIGTERM's GOAWAY leaves are covered by it and answered once
    their bodies come; a stream opened after it is ignored (the sender sends it again)."""
    srv = start_server("--workers", "1", "--drain-seconds", "0.5")
    conn = RawH2(srv)
    try:
        encoder = hpack.Encoder()
        ids = list(range(1, 20, 2))
        for i in ids:  # headers only: the bodies come after the GOAWAY
            conn.send(frame(f.HEADERS, f.END_HEADERS, i, encoder.encode(
                [(":method", "POST"), (":scheme", "http"), (":path", f"/3/device/{new_token()}")])))
        time.sleep(0.2)
        srv.signal(signal.SIGTERM)
        time.sleep(0.2)
        late = ids[-1] + 2
        conn.send(*(frame(f.DATA, f.END_STREAM, i, b"{}") for i in ids),
                  frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, late, encoder.encode(
                      [(":method", "POST"), (":scheme", "http"), (":path", "/3/device/abcd")])))
        frames_ = conn.frames(timeout=4)
    finally:
        conn.close()
    last, code, debug = goaway_of(frames_)
    assert (last, code, debug) == (ids[-1], f.NO_ERROR, {"reason": "Shutdown"})
    statuses = {s: dict(hpack.Decoder().decode(p))[":status"]
                for t, _, s, p in frames_ if t == f.HEADERS}
    assert statuses == {i: "200" for i in ids}, "every covered stream answered, the late one not"


def test_h2_idle_timeout_sends_goaway_idle_timeout(start_server):
    """--h2-idle-timeout, apart from HTTP/1.1's --idle-timeout."""
    srv = start_server("--h2-idle-timeout", "0.5", "--idle-timeout", "60")
    conn = RawH2(srv)
    try:
        start = time.monotonic()
        frames_ = conn.frames(timeout=2.5)
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    assert goaway_of(frames_) == (0, f.NO_ERROR, {"reason": "IdleTimeout"})
    assert elapsed < 2.4, "closed after the GOAWAY"
