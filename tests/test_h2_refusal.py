"""An HTTP/2 client the server refuses gets an HTTP/2 answer, not HTTP/1.1's 503
(rawsse/server/refusal.py): SETTINGS then GOAWAY last-stream-id 0 (RFC 9113 §6.8), over real
sockets and real clients (the ``h2`` library, nghttp); and a connection accepted but not read yet
when its worker drains gets GOAWAY "Shutdown" (Http1Connection.finish_then_close)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import pytest

from rawsse.h2 import frames as f
from test_forwarding import workers
from test_h2_hostile import RawH2, frame, goaway_of, request_block
from wire import HTTPClient
from test_push_api import new_token


@pytest.fixture(scope="module")
def full_server():
    """One worker with room for one connection, held by an HTTP/1.1 keep-alive client."""
    from conftest import launch
    server, holders = launch("--workers", "1", "--max-connections", "1", "--keepalive", "0")
    time.sleep(0.1)  # the readiness probe's connection closes first
    held = HTTPClient(server.host, server.port)
    assert held.request("GET", "/healthz").status == 200
    yield server
    held.close()
    server.stop()
    for holder in holders:
        holder.close()


def test_refused_h2_client_gets_goaway_refused_stream(full_server):
    """The h2 library sees a clean GOAWAY (REFUSED_STREAM, last-stream-id 0, the JSON reason),
    no answer to its request, then the close."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                               (":path", f"/3/device/{new_token()}")])
    conn.send_data(stream, b"{}", end_stream=True)
    sock = socket.create_connection((full_server.host, full_server.port), timeout=5)
    try:
        sock.sendall(conn.data_to_send())
        events: list = []
        while chunk := sock.recv(65536):
            events += conn.receive_data(chunk)
    finally:
        sock.close()
    ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(ended) == 1, events
    assert (ended[0].error_code, ended[0].last_stream_id) == (f.REFUSED_STREAM, 0)
    assert json.loads(ended[0].additional_data) == {"reason": "ServiceUnavailable"}
    assert not [e for e in events if isinstance(e, h2.events.ResponseReceived)]


def test_refused_nghttp_reports_the_goaway(full_server):
    out = subprocess.run(["nghttp", "-nv", "-t", "5", f"{full_server.url}/3/device/{new_token()}"],
                         capture_output=True, text=True, timeout=10).stdout
    assert "recv GOAWAY frame" in out, out
    assert "last_stream_id=0, error_code=REFUSED_STREAM(0x07)" in out, out
    assert '{"reason":"ServiceUnavailable"}' in out, out


class SilentH2(RawH2):
    """RawH2 that sends nothing on connect: the test writes the preface itself."""

    def __init__(self, server) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.buffer = b""


def test_refused_h2_preface_in_pieces_still_gets_goaway(full_server):
    """The preface over two reads is still recognised; nothing after the GOAWAY (no SETTINGS
    ACK: the h2 library fails on a frame after GOAWAY), then the close."""
    conn = SilentH2(full_server)
    try:
        conn.send(f.PREFACE[:5])
        time.sleep(0.05)  # a second read
        conn.send(f.PREFACE[5:] + frame(f.SETTINGS, 0, 0))
        frames_ = conn.frames(timeout=5)
    finally:
        conn.close()
    assert [(t, flags) for t, flags, _, _ in frames_] == [(f.SETTINGS, 0), (f.GOAWAY, 0)]
    assert goaway_of(frames_) == (0, f.REFUSED_STREAM, {"reason": "ServiceUnavailable"})


def test_drain_answers_a_preface_not_read_yet_with_goaway_shutdown(start_server):
    """The worker is stopped while the client connects and writes its preface and a push, and
    gets SIGTERM: on waking it accepts the connection, then drains before reading it. The client
    gets GOAWAY NO_ERROR "Shutdown" with last-stream-id 0 (its push was not processed: it sends
    it again elsewhere), not a reset."""
    srv = start_server("--workers", "1", "--drain-seconds", "0.2")
    (pid,) = [w["pid"] for w in workers(srv)]
    os.kill(pid, signal.SIGSTOP)
    try:
        conn = RawH2(srv)  # connects and writes the preface and SETTINGS
        conn.send(frame(f.HEADERS, f.END_HEADERS, 1, request_block(f"/3/device/{new_token()}"))
                  + frame(f.DATA, f.END_STREAM, 1, b"{}"))
        os.kill(pid, signal.SIGTERM)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        frames_ = conn.frames(timeout=5)
    finally:
        conn.close()
    assert [t for t, _, _, _ in frames_][:1] == [f.SETTINGS]
    assert goaway_of(frames_) == (0, f.NO_ERROR, {"reason": "Shutdown"})
    assert f.HEADERS not in [t for t, _, _, _ in frames_]
    assert "Traceback" not in srv.output()
