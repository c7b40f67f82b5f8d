"""Hostile HTTP/2 input over raw sockets: each gets the right GOAWAY or RST_STREAM, the worker
lives, other connections are served and the log holds no traceback."""

from __future__ import annotations

import json
import socket
import struct
import time

import hpack
import pytest

from rawsse.h2 import frames as f
from test_h2_server import H2Client
from test_push_api import new_token


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return f.header(len(payload), type_, flags, stream_id) + payload


def request_block(path: str = "/3/device/abcd", extra: list | None = None) -> bytes:
    return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", "x")] + (extra or []))


class RawH2:
    """A client that writes frames by hand and reads the server's frames back."""

    def __init__(self, server) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.sock.sendall(f.PREFACE + frame(f.SETTINGS, 0, 0))
        self.buffer = b""

    def send(self, *data: bytes) -> None:
        self.sock.sendall(b"".join(data))

    def frames(self, timeout: float = 5.0):
        """Every frame until the server closes (or ``timeout``): (type, flags, stream, payload)."""
        out = []
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            self.buffer += chunk
        data = self.buffer
        while len(data) >= 9:
            high, low, type_, flags, stream_id = f.HEADER.unpack_from(data)
            length = high << 16 | low
            out.append((type_, flags, stream_id, data[9:9 + length]))
            data = data[9 + length:]
        return out

    def close(self) -> None:
        self.sock.close()


def goaway_of(frames_) -> tuple[int, int, dict]:
    payload = [p for t, _, _, p in frames_ if t == f.GOAWAY][-1]
    last, code = struct.unpack(">LL", payload[:8])
    return last, code, json.loads(payload[8:])


@pytest.fixture
def raw(server):
    conns: list[RawH2] = []

    def open_() -> RawH2:
        conns.append(RawH2(server))
        return conns[-1]

    yield open_
    for c in conns:
        c.close()
    # another connection is still served, and the worker logged no traceback
    client = H2Client(server.host, server.port)
    assert client.request("POST", f"/3/device/{new_token()}", b"{}").status == 200
    client.close()
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("name,data,code", [
    ("headers-on-stream-0", frame(f.HEADERS, f.END_HEADERS, 0, request_block()), f.PROTOCOL_ERROR),
    ("frame-over-max-frame-size", frame(f.DATA, 0, 1, b"x" * 16385), f.FRAME_SIZE_ERROR),
    ("interleaved-continuation", frame(f.HEADERS, 0, 1, request_block()[:3])
     + frame(f.DATA, 0, 1, b"x"), f.PROTOCOL_ERROR),
    ("continuation-without-headers", frame(f.CONTINUATION, f.END_HEADERS, 1, b"\x82"),
     f.PROTOCOL_ERROR),
    ("hpack-index-out-of-range", frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, b"\xff\x80\x01"),
     f.COMPRESSION_ERROR),
    ("table-size-update-above-limit", frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1,
                                            b"\x3f\xe1\x3f" + request_block()), f.COMPRESSION_ERROR),
    ("bad-huffman", frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, b"\x40\x81\xff\x01x"),
     f.COMPRESSION_ERROR),
    ("ping-wrong-length", frame(f.PING, 0, 0, b"1234"), f.FRAME_SIZE_ERROR),
    ("settings-on-a-stream", frame(f.SETTINGS, 0, 1, b""), f.PROTOCOL_ERROR),
    ("window-overflow", frame(f.WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)),
     f.FLOW_CONTROL_ERROR),
    ("data-on-an-idle-stream", frame(f.DATA, 0, 1, b"x"), f.PROTOCOL_ERROR),
    ("push-promise-from-client", frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\0\0\0\2"),
     f.PROTOCOL_ERROR),
    ("even-stream-id", frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 2, request_block()),
     f.PROTOCOL_ERROR),
])
def test_connection_errors_get_goaway_with_a_json_reason(raw, name, data, code):
    conn = raw()
    conn.send(data)
    last, got, debug = goaway_of(conn.frames())
    assert got == code, debug
    assert debug["reason"]


def test_header_list_over_the_limit_is_431_and_memory_stays_bounded(raw):
    """A decompression bomb: one 4000-byte entry indexed 100 times is 400 KB decoded."""
    conn = raw()
    enc = hpack.Encoder()
    block = enc.encode([(":method", "POST"), (":scheme", "http"),
                        (":path", f"/3/device/{new_token()}"), ("x-big", "v" * 4000)])
    bomb = block + b"\xbe" * 100  # index 62: the x-big entry just inserted
    conn.send(frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, bomb))
    conn.send(frame(f.GOAWAY, 0, 0, struct.pack(">LL", 1, 0)))
    frames_ = conn.frames(timeout=2)
    headers = [p for t, _, s, p in frames_ if t == f.HEADERS and s == 1]
    assert headers and dict(hpack.Decoder().decode(headers[0]))[":status"] == "431"


def test_ping_flood_is_calmed(raw):
    conn = raw()
    conn.send(b"".join(frame(f.PING, 0, 0, b"%08d" % i) for i in range(3000)))
    _, code, debug = goaway_of(conn.frames())
    assert code == f.ENHANCE_YOUR_CALM and "flood" in debug["reason"]


def test_settings_flood_is_calmed(raw):
    conn = raw()
    conn.send(frame(f.SETTINGS, 0, 0) * 3000)
    _, code, _ = goaway_of(conn.frames())
    assert code == f.ENHANCE_YOUR_CALM


def test_rapid_reset_is_calmed(raw):
    """CVE-2023-44487: open and reset streams as fast as possible."""
    conn = raw()
    enc = hpack.Encoder()
    data = []
    for i in range(2500):
        stream_id = 2 * i + 1
        data.append(frame(f.HEADERS, f.END_HEADERS, stream_id, enc.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", "/3/device/abcd")])))
        data.append(frame(f.RST_STREAM, 0, stream_id, struct.pack(">L", f.CANCEL)))
    conn.send(b"".join(data))
    _, code, debug = goaway_of(conn.frames())
    assert code == f.ENHANCE_YOUR_CALM and "reset" in debug["reason"]


def test_unknown_frame_types_and_priority_are_ignored(server):
    conn = RawH2(server)
    try:
        conn.send(frame(0x42, 0xFF, 0, b"whatever"), frame(f.PRIORITY, 0, 1, b"\0\0\0\0\x10"),
                  frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 3,
                        request_block(f"/3/device/{new_token()}")),
                  frame(f.GOAWAY, 0, 0, struct.pack(">LL", 3, 0)))
        frames_ = conn.frames(timeout=2)
        headers = [p for t, _, s, p in frames_ if t == f.HEADERS and s == 3]
        # POST without a body: Apple's PayloadEmpty, on a connection still working
        assert dict(hpack.Decoder().decode(headers[0]))[":status"] == "400"
    finally:
        conn.close()


def test_goaway_covers_and_answers_every_stream_taken(server):
    """On a protocol error, streams complete before it are answered and the GOAWAY's
    last-stream-id covers them; a stream still uploading is refused (safe to retry)."""
    conn = RawH2(server)
    try:
        enc = hpack.Encoder()
        fields = [(":method", "POST"), (":scheme", "http")]
        done = enc.encode(fields + [(":path", f"/3/device/{new_token()}")])
        uploading = enc.encode(fields + [(":path", f"/3/device/{new_token()}")])
        conn.send(frame(f.HEADERS, f.END_HEADERS, 1, done), frame(f.DATA, f.END_STREAM, 1, b"{}"),
                  frame(f.HEADERS, f.END_HEADERS, 3, uploading),
                  frame(f.HEADERS, f.END_HEADERS, 0, b""))
        frames_ = conn.frames()
        last, code, _ = goaway_of(frames_)
        assert (last, code) == (3, f.PROTOCOL_ERROR)
        assert any(t == f.HEADERS and s == 1 for t, _, s, _ in frames_)
        resets = {s: struct.unpack(">L", p)[0] for t, _, s, p in frames_ if t == f.RST_STREAM}
        assert resets == {3: f.REFUSED_STREAM}
    finally:
        conn.close()


def test_preface_split_over_reads_is_still_http2(server):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        for i in range(len(f.PREFACE)):
            sock.sendall(f.PREFACE[i:i + 1])
            time.sleep(0.002)
        sock.sendall(frame(f.SETTINGS, 0, 0))
        head = sock.recv(9)
        assert head[3] == f.SETTINGS
    finally:
        sock.close()


def test_headers_on_a_closed_stream_reset_that_stream_only(server):
    conn = RawH2(server)
    try:
        enc = hpack.Encoder()
        block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", "/3/device/zz")])
        conn.send(frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, block))
        time.sleep(0.2)
        conn.send(frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, enc.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", "/3/device/zz")])),
            frame(f.PING, 0, 0, b"still-on"))
        frames_ = conn.frames(timeout=1)
        resets = {s: struct.unpack(">L", p)[0] for t, _, s, p in frames_ if t == f.RST_STREAM}
        assert resets == {1: f.STREAM_CLOSED}
        assert any(t == f.PING and p == b"still-on" for t, _, _, p in frames_)
        assert not any(t == f.GOAWAY for t, _, _, _ in frames_)
    finally:
        conn.close()


def test_a_repeated_block_suffix_follows_the_senders_table(raw):
    """nghttp2's shape, the suffix after ``:path`` naming the newest dynamic entry (an apns-id
    the sender inserted): served from the connection's memo while the table stands, decoded
    afresh after the sender empties its table with a size update and inserts another id. The
    answers echo the apns-id each request carried."""
    conn = raw()
    first, second = "5d6b5bc5-61e6-4ad4-9d2b-6f1fb3e0a001", "5d6b5bc5-61e6-4ad4-9d2b-6f1fb3e0a002"

    def path() -> bytes:
        value = f"/3/device/{new_token()}".encode()
        return bytes((0x14, len(value))) + value  # never indexed, static name 4

    def insert_id(apns_id: str) -> bytes:
        return b"\x40\x07apns-id" + bytes((len(apns_id),)) + apns_id.encode()

    empty_the_table = b"\x20\x3f\xe1\x1f"  # size updates to 0, then back to 4096
    blocks = [path() + b"\x83\x86" + insert_id(first), path() + b"\x83\x86\xbe",
              path() + b"\x83\x86\xbe", empty_the_table + path() + b"\x83\x86" + insert_id(second),
              path() + b"\x83\x86\xbe"]
    conn.send(*(frame(f.HEADERS, f.END_HEADERS, 2 * i + 1, block)
                + frame(f.DATA, f.END_STREAM, 2 * i + 1, b"{}") for i, block in enumerate(blocks)))
    conn.send(frame(f.GOAWAY, 0, 0, struct.pack(">LL", 9, 0)))
    decoder = hpack.Decoder()
    answers = {s: dict(decoder.decode(p)) for t, _, s, p in conn.frames(timeout=2)
               if t == f.HEADERS}
    assert {s: (a[":status"], a["apns-id"]) for s, a in answers.items()} == {
        1: ("200", first), 3: ("200", first), 5: ("200", first), 7: ("200", second),
        9: ("200", second)}
