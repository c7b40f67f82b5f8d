"""Smoke test of the bench's asyncio + uvloop baseline: it must speak rawsse's wire contract, or
the bench compares two different things."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest

from conftest import ROOT, reserve_port

BASELINE = os.path.join(ROOT, "bench", "baseline_server.py")
APNS_ID = "0191a2b3-c4d5-7e6f-8a9b-0c1d2e3f4a5b"
TOKEN = "746f6b656e303030303030303030303031"


@pytest.fixture
def baseline_url() -> Iterator[str]:
    holder, port = reserve_port()
    proc = subprocess.Popen([sys.executable, BASELINE, "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                    assert resp.read() == b"ok\n"
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(proc.stdout.read().decode() if proc.stdout else "")
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        holder.close()


def open_stream(url: str, token: str) -> tuple[socket.socket, bytes]:
    """Connect a device; returns the socket and everything up to the end of the ``retry:`` block."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    return sock, read_until(sock, lambda d: b"\n\n" in d.partition(b"\r\n\r\n")[2])


def read_until(sock: socket.socket, done: Callable[[bytes], bool], data: bytes = b"") -> bytes:
    """Read until ``done(data)`` or the peer closes; bounded by the socket timeout."""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def event_read(sock: socket.socket) -> str:
    return read_until(sock, lambda d: d.endswith(b"\n\n")).decode()


def post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url + path, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_stream_receives_one_push(baseline_url: str) -> None:
    sock, head = open_stream(baseline_url, TOKEN.upper())
    with sock:
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        for line in (b"Content-Type: text/event-stream", b"Cache-Control: no-cache",
                     b"X-Accel-Buffering: no", b"Connection: close"):
            assert line in head
        assert head.split(b"\r\n\r\n", 1)[1].startswith(b"retry: ")

        status, headers, body = post(baseline_url, f"/3/device/{TOKEN}", b'{"mdm":"magic"}',
                                     {"Content-Type": "application/json", "apns-id": APNS_ID})
        assert (status, body, headers.get("apns-id")) == (200, b"", APNS_ID)
        assert event_read(sock) == f"id: {APNS_ID}\nevent: ping\ndata: {{\"mdm\":\"magic\"}}\n\n"


def test_broadcast_stats_and_errors(baseline_url: str) -> None:
    sock, _ = open_stream(baseline_url, TOKEN)
    with sock:
        status, _, body = post(baseline_url, "/broadcast", b"a\nb", {"apns-id": APNS_ID})
        assert status == 200 and json.loads(body) == {"apns_id": APNS_ID, "streams": 1}
        assert event_read(sock) == f"id: {APNS_ID}\nevent: ping\ndata: a\ndata: b\n\n"
        with urllib.request.urlopen(baseline_url + "/stats", timeout=5) as resp:
            assert json.loads(resp.read())["connections"] == 1
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(baseline_url + "/events?token=xyz", timeout=5)
    assert bad.value.code == 400 and json.loads(bad.value.read()) == {"reason": "BadDeviceToken"}


def test_stored_push_delivered_on_connect(baseline_url: str) -> None:
    status, headers, _ = post(baseline_url, f"/3/device/{TOKEN}", b"{}", {})
    assert status == 200 and len(headers["apns-id"]) == 36
    sock, data = open_stream(baseline_url, TOKEN)
    with sock:
        data = read_until(sock, lambda d: d.endswith(b"}\n\n"), data)
        assert f"id: {headers['apns-id']}\nevent: ping\ndata: {{}}\n\n" in data.decode()
