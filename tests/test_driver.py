"""``rawsse push``: target schemes, the exact request bytes (Fleet's), and runs against a real
``rawsse serve``: statuses by reason, rate pacing, pipelining, broadcast, stamps, timeouts."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Iterator

import pytest

from loadtools import Devices, run_push, wait_streams
from rawsse.load import loadgen
from rawsse.load import pushrequest
from rawsse.config import ConfigError
from rawsse.load.stamp import stamp_time


# -- targets and request bytes ------------------------------------------------------------------

def test_target_schemes(tmp_path) -> None:
    fleet = pushrequest.parse_targets("fleet:10-12", seed=0)
    assert fleet.paths == [loadgen.fleet_token(i).encode() for i in (10, 11, 12)]
    assert fleet.serial(0) == b"000000000010"
    assert len(pushrequest.parse_targets("fleet:7", seed=0)) == 1
    assert pushrequest.parse_targets("random:3", seed=4).paths[2] == \
        loadgen.random_token(2, seed=4).encode()
    path = tmp_path / "t:x.txt"  # a colon in the path is not a range
    path.write_text("aa\nbb\ncc\ndd\n")
    assert pushrequest.parse_targets(f"file:{path}", 0).paths == [b"aa", b"bb", b"cc", b"dd"]
    ranged = pushrequest.parse_targets(f"file:{path}:1-2", 0)
    assert ranged.paths == [b"bb", b"cc"]
    assert ranged.serial(0) == b"000000000001"
    for bad in ("fleet:5-2", "fleet:x", "random:0", "nope:1", f"file:{path}:2-9"):
        with pytest.raises(ConfigError):
            pushrequest.parse_targets(bad, 0)


class Capture:
    """A plain socket peer that records the requests it gets and answers each with 200."""

    def __init__(self, expected: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.expected = expected
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        data = b""
        with conn:
            while len(self.requests) < self.expected:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                while b"\r\n\r\n" in data:
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(rest) < length:
                        break
                    self.requests.append(head + b"\r\n\r\n" + rest[:length])
                    data = rest[length:]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def capture() -> Iterator:
    made: list[Capture] = []

    def make(expected: int) -> Capture:
        made.append(Capture(expected))
        return made[-1]

    yield make
    for cap in made:
        cap.close()


def test_fleet_bytes_without_stamp(capture, tmp_path) -> None:
    """Exactly what Go's net/http writes for Fleet's push client (buford/nanopush, no apns-*)."""
    cap = capture(2)
    report = run_push(f"http://127.0.0.1:{cap.port}", tmp_path, "--tokens", "fleet:41-42",
                      "--senders", "1", "--no-stamp")
    cap.close()
    assert report["statuses"] == {"200": 2}
    token = loadgen.fleet_token(41)
    assert cap.requests[0] == (
        f"POST /3/device/{token} HTTP/1.1\r\nHost: 127.0.0.1:{cap.port}\r\n"
        "User-Agent: Go-http-client/1.1\r\nContent-Length: 31\r\n"
        "Content-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
        '{"mdm":"pushmagic000000000041"}').encode()
    assert cap.requests[1].endswith(b'{"mdm":"pushmagic000000000042"}')


def test_stamp_and_expiration_headers(capture, tmp_path) -> None:
    cap = capture(1)
    before = time.time()
    run_push(f"http://127.0.0.1:{cap.port}", tmp_path, "--tokens", "fleet:0", "--senders", "1",
             "--expiration", "3600")
    cap.close()
    head = cap.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    names = [line.split(b":")[0] for line in head[1:]]
    # Go writes the map's headers sorted by canonical name, between Content-Length and
    # the transport's Accept-Encoding
    assert names == [b"Host", b"User-Agent", b"Content-Length", b"Apns-Expiration", b"Apns-Id",
                     b"Content-Type", b"Accept-Encoding"]
    fields = dict(line.split(b": ", 1) for line in head[1:])
    assert before + 3599 <= int(fields[b"Apns-Expiration"]) <= time.time() + 3601
    stamped = stamp_time(fields[b"Apns-Id"])
    assert stamped is not None and before - 0.01 <= stamped <= time.time()


def test_bare_headers(capture, tmp_path) -> None:
    cap = capture(1)
    run_push(f"http://127.0.0.1:{cap.port}", tmp_path, "--tokens", "fleet:0", "--senders", "1",
             "--headers", "none", "--no-stamp", "--payload", "{}")
    cap.close()
    assert cap.requests[0] == (f"POST /3/device/{loadgen.fleet_token(0)} HTTP/1.1\r\n"
                               f"Host: 127.0.0.1:{cap.port}\r\nContent-Length: 2\r\n\r\n{{}}"
                               ).encode()


def test_request_builder_broadcast_path() -> None:
    args = argparse.Namespace(headers="none", no_stamp=True, expiration=0, payload="x",
                              broadcast=True, prefix="746f6b")
    request = pushrequest.RequestBuilder(args, "h:1", "/base").build(None, b"", 0.0)
    assert request == (b"POST /base/broadcast?prefix=746f6b HTTP/1.1\r\nHost: h:1\r\n"
                       b"Content-Length: 1\r\napns-expiration: 0\r\n\r\nx")


# -- against a real server ----------------------------------------------------------------------

def test_statuses_by_reason(start_server, tmp_path) -> None:
    """--strict-tokens wants Apple's 32-byte tokens: Fleet's shorter test tokens are refused."""
    server = start_server("--strict-tokens")
    bad = run_push(server.url, tmp_path, "--tokens", "fleet:0-49", expect=1)  # not one 200
    assert bad["sent"] == 50
    assert bad["accepted"] == 0
    assert bad["statuses"] == {"400 BadDeviceToken": 50}
    assert bad["latency_ms"]["count"] == 50
    good = run_push(server.url, tmp_path, "--tokens", "random:50", "--pipeline", "4")
    assert good["statuses"] == {"200": 50}
    assert good["errors"] == {}
    assert good["per_second"] > 0


def test_fault_rules_show_as_statuses(start_server, tmp_path) -> None:
    server = start_server("--fault", "100%:429:TooManyRequests")
    report = run_push(server.url, tmp_path, "--tokens", "fleet:0-19", "--senders", "2",
                      "--fail-under", "0")  # refusals are what this run is for: exit 0
    assert report["statuses"] == {"429 TooManyRequests": 20}


def test_rate_paced_run(start_server, tmp_path) -> None:
    server = start_server()
    report = run_push(server.url, tmp_path, "--tokens", "fleet:0-99", "--rate", "200",
                      "--duration", "1")
    # Push k is due at k/200 s, none after 1 s: each one due is sent or, when the sender fell
    # behind (a busy 2-core machine), counted unsent at the end, never sent later.
    assert 195 <= report["sent"] + report["unsent"] <= 205
    assert report["unsent"] <= 10, "the sender kept up with the rate"
    assert report["statuses"] == {"200": report["sent"]}
    assert 0.95 <= report["duration_s"] <= 2.0  # never ahead of the schedule, done soon after
    assert 100 <= report["per_second"] <= 210  # never faster than --rate, nor far slower
    assert report["latency_ms"]["count"] == report["sent"]


def test_pipelined_run(start_server, tmp_path) -> None:
    server = start_server()
    report = run_push(server.url, tmp_path, "--tokens", "fleet:0-499", "--pipeline", "8",
                      "--count", "3000")
    assert report["sent"] == report["accepted"] == 3000
    assert report["statuses"] == {"200": 3000}
    assert report["pipeline"] == 8
    assert report["errors"] == {}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["max"]


def test_broadcast_reaches_every_device(start_server, tmp_path) -> None:
    server = start_server(admin=True)
    run = Devices(server.url, tmp_path, "--ramp", "0", "--expect-events", "100", count=50,
                  duration=20)
    try:
        assert wait_streams(server.admin_url, 50) == 50
        push = run_push(server.url, tmp_path, "--broadcast", "--count", "2", "--rate", "5")
        assert push["statuses"] == {"200": 2}
        assert push["streams"] == 100
        report = run.wait()
    finally:
        run.kill()
    assert report["events"] == 100
    assert report["duplicates"] == 0
    assert report["latency_ms"]["count"] == 100


def test_no_stamp_means_no_latency(start_server, tmp_path) -> None:
    server = start_server(admin=True)
    run = Devices(server.url, tmp_path, "--ramp", "0", "--expect-events", "20", count=20,
                  duration=20)
    try:
        assert wait_streams(server.admin_url, 20) == 20
        run_push(server.url, tmp_path, "--tokens", "fleet:0-19", "--no-stamp")
        report = run.wait()
    finally:
        run.kill()
    assert report["events"] == 20
    assert report["unstamped"] == 20  # the server's own apns-ids carry no stamp
    assert report["latency_ms"]["count"] == 0


def test_unanswered_pushes_time_out(start_server, tmp_path) -> None:
    server = start_server("--response-delay", "3s")
    started = time.monotonic()
    report = run_push(server.url, tmp_path, "--tokens", "fleet:0-2", "--senders", "1",
                      "--timeout", "0.5", expect=1)
    assert report["sent"] == 3
    assert report["accepted"] == 0
    assert report["errors"] == {"lost_timeout": 3}
    assert time.monotonic() - started < 10


def test_latency_counts_time_queued_behind_a_slow_server(start_server, tmp_path) -> None:
    """Rate-paced latency runs from each push's scheduled time (no coordinated omission): with one
    connection and 200 ms answers, pushes due every 20 ms wait their turn, and that wait shows."""
    server = start_server("--response-delay", "200ms")
    report = run_push(server.url, tmp_path, "--tokens", "fleet:0-99", "--senders", "1",
                      "--rate", "50", "--duration", "1")
    assert 4 <= report["sent"] <= 7  # one at a time, 200 ms each
    assert report["statuses"] == {"200": report["sent"]}
    assert report["unsent"] == 50 - report["sent"]  # due within the second, never sent
    assert report["latency_ms"]["p50"] >= 200
    # the last one sent was due at ~(n-1)×20 ms and answered at ~n×200 ms
    assert report["latency_ms"]["max"] >= report["sent"] * 200 - (report["sent"] - 1) * 20 - 50
