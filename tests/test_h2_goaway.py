"""GOAWAY on drain over a real socket (the ``h2`` library treats a received GOAWAY as the end of
the connection and drops the answers that follow it, so a hand-written client reads them)."""

from __future__ import annotations

import signal
import struct
import time

import hpack

from rawsse.h2 import frames as f
from test_h2_hostile import RawH2, frame, goaway_of
from test_push_api import new_token


def test_drain_sends_goaway_and_answers_every_stream_it_covers(start_server):
    """SIGTERM: GOAWAY NO_ERROR {"reason":"Shutdown"} whose last-stream-id is the highest stream
    taken, then every one of those streams answered, then the close."""
    srv = start_server("--workers", "1", "--response-delay", "uniform:500ms-500ms",
                       "--drain-seconds", "0.5")
    conn = RawH2(srv)
    try:
        encoder = hpack.Encoder()
        ids = list(range(1, 40, 2))
        conn.send(*(frame(f.HEADERS, f.END_HEADERS, i, encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", f"/3/device/{new_token()}")]))
            + frame(f.DATA, f.END_STREAM, i, b"{}") for i in ids))
        time.sleep(0.2)  # all read by the server, answers held by --response-delay
        srv.signal(signal.SIGTERM)
        frames_ = conn.frames(timeout=5)
        last, code, debug = goaway_of(frames_)
        assert (last, code, debug) == (ids[-1], f.NO_ERROR, {"reason": "Shutdown"})
        goaway_at = [t for t, _, _, _ in frames_].index(f.GOAWAY)
        answered = {s: dict(hpack.Decoder().decode(p))[":status"]
                    for t, _, s, p in frames_[goaway_at:] if t == f.HEADERS}
        assert answered == {i: "200" for i in ids}, "answered after the GOAWAY, all of them"
    finally:
        conn.close()
    assert "Traceback" not in srv.output()


def test_idle_connection_gets_goaway_idle_timeout(start_server):
    srv = start_server("--idle-timeout", "1")
    conn = RawH2(srv)
    try:
        last, code, debug = goaway_of(conn.frames(timeout=4))
        assert (last, code, debug) == (0, f.NO_ERROR, {"reason": "IdleTimeout"})
    finally:
        conn.close()


def test_request_whose_body_never_comes_gets_408(start_server):
    """Slowloris over HTTP/2: the stream, not the connection, is answered 408 and reset, even
    while the client keeps the connection busy with PINGs."""
    srv = start_server("--header-timeout", "1")
    conn = RawH2(srv)
    try:
        block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"),
                                        (":path", f"/3/device/{new_token()}")])
        conn.send(frame(f.HEADERS, f.END_HEADERS, 1, block))
        for i in range(8):
            conn.send(frame(f.PING, 0, 0, b"%08d" % i))
            time.sleep(0.4)
        frames_ = conn.frames(timeout=0.5)
        headers = [p for t, _, s, p in frames_ if t == f.HEADERS and s == 1]
        assert headers and dict(hpack.Decoder().decode(headers[0]))[":status"] == "408"
        assert not any(t == f.GOAWAY for t, _, _, _ in frames_)
    finally:
        conn.close()


def test_answer_held_by_a_window_never_opened_is_reset(start_server):
    """A client announcing a 0-byte window and never opening it: the answer's DATA cannot go,
    and after one to two --header-timeouts the stream is reset (CANCEL) instead of held."""
    srv = start_server("--header-timeout", "1")
    conn = RawH2(srv)
    try:
        conn.send(frame(f.SETTINGS, 0, 0, struct.pack(">HL", f.INITIAL_WINDOW_SIZE, 0)))
        block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"),
                                        (":path", "/3/device/zz")])
        conn.send(frame(f.HEADERS, f.END_HEADERS, 1, block), frame(f.DATA, f.END_STREAM, 1, b"{}"))
        frames_ = conn.frames(timeout=3.5)
        assert [t for t, _, s, _ in frames_ if s == 1] == [f.HEADERS, f.RST_STREAM]
        reset = [p for t, _, s, p in frames_ if t == f.RST_STREAM and s == 1][0]
        assert struct.unpack(">L", reset)[0] == f.CANCEL
    finally:
        conn.close()
