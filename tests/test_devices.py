"""``rawsse devices``: the SSE parser on raw bytes (Fleet's client rules), token schemes, and runs
against a real ``rawsse serve``: counts, latency stamps, processes and source addresses, HTTP
errors, and reconnects after a server restart (backoff, no storm)."""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import psutil
import pytest

from conftest import Server, reserve_port
from loadtools import Devices, run_push, wait_streams
from rawsse.load import device as device_module
from rawsse.load import devices
from rawsse.load import loadgen
from rawsse.config import ConfigError
from rawsse.server.loop import Loop
from rawsse.load.stamp import new_stamped_id


# -- the parser, fed raw bytes ------------------------------------------------------------------

_loops: list[Loop] = []


@pytest.fixture(autouse=True)
def close_loops() -> Iterator[None]:
    yield
    while _loops:
        _loops.pop().close()


def make_device() -> device_module.Device:
    plan = devices.Plan(host="127.0.0.1", port=9, base_path="", scheme="fleet", token_start=0,
                        token_seed=0, count=1, processes=1, sources=(), ramp=0.0, jitter=0.0,
                        duration=10.0, connect_timeout=1.0, backoff_min=1.0, backoff_max=30.0,
                        timeline_bin=1.0, start=time.monotonic())
    loop = Loop()
    _loops.append(loop)
    group = devices.DeviceGroup(loop, plan, 0, 1)
    device = group.devices[0]
    device.state = device_module.STREAM
    return device


def event(apns_id: str, *data: str) -> bytes:
    lines = [f"id: {apns_id}", "event: ping", *(f"data: {d}" for d in data), "", ""]
    return "\n".join(lines).encode()


def test_events_are_counted_with_their_latency() -> None:
    device = make_device()
    stream = b"retry: 5000\n\n: keepalive\n\n" + event(new_stamped_id(), '{"mdm":"pushmagicA"}') \
        + event(new_stamped_id(time.time() - 0.25), "line one", "line two")
    assert device.feed(stream) is None
    group = device.group
    assert group.events == 2
    assert group.unstamped == 0
    assert group.latency.count == 2
    assert 240 < group.latency.max_ms < 1000
    assert device.stream_events == 2


def test_every_split_of_the_stream_parses_the_same() -> None:
    """Fed in chunks of every size (h11's tiny-chunk method), the result never changes."""
    ids = [new_stamped_id() for _ in range(3)]
    stream = (b"retry: 2500\r\n\r\n" + event(ids[0], "a") + b": keepalive\n\n"
              + event(ids[1], "b", "c").replace(b"\n", b"\r\n") + event(ids[2], "d"))
    for size in range(1, 40):
        device = make_device()
        for start in range(0, len(stream), size):
            assert device.feed(stream[start:start + size]) is None
        assert device.group.events == 3, size
        assert device.group.latency.count == 3
        assert device.partial == b""


def rawsse_event(apns_id: str | None = None, payload: str = '{"mdm":"pushmagicA"}') -> bytes:
    """An event as rawsse writes it (``sse.encode_event``): the shape ``feed`` counts whole."""
    from rawsse.server.sse import encode_event
    return encode_event((apns_id or new_stamped_id()).encode(), payload.encode())


def test_whole_events_counted_without_the_line_parser_count_as_the_line_parser_does() -> None:
    """``feed`` counts reads of whole rawsse-shaped events without the line parser; on any
    stream, split anywhere, it gives what the line parser alone gives: events, unstamped ids,
    duplicates, latencies, what is left over and the error."""
    import random
    rng = random.Random(14)
    apns_id = new_stamped_id()
    pieces = [rawsse_event(), rawsse_event(), rawsse_event(apns_id), rawsse_event(apns_id),
              rawsse_event(payload="two\nlines"), rawsse_event("4d42a7b2-5178-4cf3-b7ba-a062fcff3aca"),
              event("short-id", "x"), event(new_stamped_id(), "a", "b"), b": keepalive\n\n",
              b"id: " + apns_id.encode() + b"\nevent: ping\n\n",  # no data: not delivered
              b"id: " + apns_id.encode() + b"\n\n", b"\n", b"retry: 100\n\n",
              rawsse_event().replace(b"\n", b"\r\n"), b"data: no id\n\n",
              rawsse_event()[:-1] + b"\nevent: ping\ndata: more\n\n",
              rawsse_event(payload="x" * (device_module.MAX_LINE - 50)),
              rawsse_event(payload="x" * device_module.MAX_LINE),  # a line too long
              rawsse_event()[:-2] + b"\nbogus\n\n",
              b"id: " + apns_id[:35].encode() + b"\r\nevent: ping\ndata: x\n\n",
              b"data: begun\n", b"id: " + apns_id.encode() + b"\n",  # an event's first lines
              b"data: no line end", b": no line end"]
    for case in range(600):
        chosen = [rng.choice(pieces) for _ in range(rng.randint(1, 6))]
        stream = b"".join(chosen)
        if case % 3 == 0:  # anywhere
            cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 3))))
        elif case % 3 == 1:  # at event ends only: whole events in every read
            ends = [i + 2 for i in range(len(stream)) if stream.startswith(b"\n\n", i)]
            cuts = sorted(rng.sample(ends, min(len(ends), rng.randint(0, 3))))
        else:  # between the pieces
            cuts = [sum(map(len, chosen[:k])) for k in range(1, len(chosen))]
        reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if a < b]
        fast, lines = make_device(), make_device()
        for read in reads:
            assert fast.feed(read) == lines._parse_lines(read), (stream, reads)
            assert parsed(fast) == parsed(lines), (stream, reads)


def parsed(device: device_module.Device) -> tuple[object, ...]:
    """What a device made of the bytes it was fed so far."""
    group = device.group
    return (group.events, group.unstamped, group.duplicates, group.latency.count, device.partial,
            device.event_id, device.has_data, device.recent_ids)


def test_a_read_of_whole_rawsse_events_skips_the_line_parser(monkeypatch) -> None:
    """The point of the fast path: one read of whole events never reaches the line parser."""
    device = make_device()

    def no_parser(self: device_module.Device, data: bytes) -> str | None:
        raise AssertionError(f"line parser called for {data!r}")
    monkeypatch.setattr(device_module.Device, "_parse_lines", no_parser)
    assert device.feed(rawsse_event()) is None
    assert device.feed(rawsse_event() + rawsse_event() + rawsse_event()) is None
    assert device.group.events == 4 and device.group.latency.count == 4


def test_an_event_without_data_is_not_delivered() -> None:
    device = make_device()
    assert device.feed(b"id: x\nevent: ping\n\n\n\n") is None
    assert device.group.events == 0
    assert device.feed(b"data: later, without an id\n\n") is None  # x is not carried over
    assert device.group.events == 1
    assert device.group.unstamped == 1
    assert device.recent_ids == ()


def test_unstamped_and_duplicate_ids_are_counted() -> None:
    device = make_device()
    apns_id = new_stamped_id()
    assert device.feed(b"data: no id\n\n" + event("4d42a7b2-5178-4cf3-b7ba-a062fcff3aca", "v4")
                       + event(apns_id, "x") + event(new_stamped_id(), "y")
                       + event(apns_id, "x again")) is None
    group = device.group
    assert group.events == 5
    assert group.unstamped == 2
    assert group.duplicates == 1


@pytest.mark.parametrize("line", [b"hello", b"data", b"Data: x", b" data: x", b"id", b"{}"])
def test_an_unexpected_line_drops_the_stream(line: bytes) -> None:
    """Fleet's client: any line that is not blank, comment, data:, event:, id:, retry: is fatal."""
    assert make_device().feed(b": ok\n" + line + b"\n") == "unexpected_line"


def test_line_limit_is_fleets_scanner_buffer() -> None:
    """bufio.Scanner with an 8192-byte max buffer: a line needs its length + 1 (the newline)."""
    fits = b"data: " + b"x" * (device_module.MAX_LINE - 7) + b"\n\n"
    device = make_device()
    assert device.feed(fits) is None
    assert device.group.events == 1
    too_long = b"data: " + b"x" * (device_module.MAX_LINE - 6) + b"\n\n"
    assert make_device().feed(too_long) == "line_too_long"
    unterminated = make_device()
    assert unterminated.feed(b"data: " + b"x" * 5000) is None
    assert unterminated.feed(b"x" * 5000) == "line_too_long"


# -- tokens and addresses -----------------------------------------------------------------------

def test_fleet_tokens_follow_mdmtest() -> None:
    assert loadgen.fleet_serial(42) == "000000000042"
    assert bytes.fromhex(loadgen.fleet_token(42)) == b"token000000000042"
    assert len(loadgen.fleet_token(0)) == 34  # like mdmtest's 12-character serials
    assert len(bytes.fromhex(loadgen.random_token(5))) == 32
    assert loadgen.random_token(5, seed=1) != loadgen.random_token(5, seed=2)


def test_token_file_scheme(tmp_path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text("# comment\nAABB\n\nccdd\neeff\n")
    assert loadgen.tokens_for(f"file:{path}", 1, 2) == ["ccdd", "eeff"]
    with pytest.raises(ConfigError):
        loadgen.tokens_for(f"file:{path}", 2, 2)
    with pytest.raises(ConfigError):
        loadgen.tokens_for("nope", 0, 1)


def test_source_address_specs() -> None:
    assert loadgen.parse_sources("none", 10**6, "127.0.0.1") == []
    assert loadgen.parse_sources("auto", 100, "127.0.0.1") == []
    spread = loadgen.parse_sources("auto", 300_000, "127.0.0.1")
    assert len(spread) * loadgen.ports_per_source() >= 300_000
    assert spread[0] == "127.0.0.2"
    assert loadgen.parse_sources("3", 1, "127.0.0.1") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert loadgen.parse_sources("127.0.0.254-127.0.1.1", 1, "127.0.0.1") == [
        "127.0.0.254", "127.0.0.255", "127.0.1.0", "127.0.1.1"]
    assert loadgen.parse_sources("10.0.0.1,10.0.0.2", 1, "10.0.0.9") == ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(ConfigError):
        loadgen.parse_sources("127.0.0.5-127.0.0.2", 1, "127.0.0.1")
    with pytest.raises(ConfigError):
        loadgen.parse_sources("auto", 300_000, "10.0.0.9")


# -- against a real server ----------------------------------------------------------------------

@pytest.fixture
def runs() -> Iterator[list[Devices]]:
    started: list[Devices] = []
    yield started
    for run in started:
        run.kill()


def test_devices_receive_stamped_pushes(start_server, tmp_path, runs) -> None:
    server = start_server("--keepalive", "1", admin=True)
    run = Devices(server.url, tmp_path, "--ramp", "0", "--expect-events", "300", count=300,
                  duration=20)
    runs.append(run)
    assert wait_streams(server.admin_url, 300) == 300
    sent_at = time.time()
    push = run_push(server.url, tmp_path, "--tokens", "fleet:0-299")
    assert push["statuses"] == {"200": 300}
    report = run.wait()
    took_ms = (time.time() - sent_at) * 1000
    assert report["count"] == 300
    assert report["processes"] == 1
    assert report["connected"] == 300
    assert report["peak_connected"] == 300
    assert report["events"] == 300
    assert report["duplicates"] == 0
    assert report["unstamped"] == 0
    assert report["reconnects"] == 0
    assert report["errors"] == {}
    latency = report["latency_ms"]
    assert latency["count"] == 300
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"] < took_ms
    assert report["duration_s"] < 20  # --expect-events ended it early
    assert report["connect_rate_per_s"] > 0
    assert sum(report["timeline"]["connects"]) == 300
    assert report["latency_histogram"]["count"] == 300


def test_processes_and_source_addresses(start_server, tmp_path, runs) -> None:
    server = start_server(admin=True)
    run = Devices(server.url, tmp_path, "--ramp", "0", "--processes", "2",
                  "--source-addresses", "127.0.0.2-127.0.0.3", count=120, duration=20)
    runs.append(run)
    assert wait_streams(server.admin_url, 120) == 120
    children = psutil.Process(run.proc.pid).children()
    assert len(children) == 2
    sources: dict[str, int] = {}
    for child in children:
        for conn in child.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == server.port:
                sources[conn.laddr.ip] = sources.get(conn.laddr.ip, 0) + 1
    assert sources == {"127.0.0.2": 60, "127.0.0.3": 60}
    run.interrupt()  # SIGINT ends the run early, with its report
    report = run.wait()
    assert report["processes"] == 2
    assert report["sources"] == 2
    assert report["connected"] == 120
    assert report["errors"] == {}


def test_http_errors_are_counted_and_retried_with_backoff(start_server, tmp_path, runs) -> None:
    server = start_server()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("zz\nabc\n")  # not hex; odd length
    run = Devices(server.url, tmp_path, "--ramp", "0", f"--token-scheme=file:{tokens}",
                  "--give-up-after", "0", count=2, duration=6)
    runs.append(run)
    report = run.wait(expect=1)  # not one device connected
    assert report["connected"] == 0
    # attempts at 0 s, 1-1.5 s, 3-4.5 s, then not before 7 s: 3 each, never a tight retry loop
    assert report["errors"] == {"http_400_BadDeviceToken": 6}
    assert report["attempts"] == 6
    assert report["reconnects"] == 4


# Timers fire late on a busy machine (2 shared cores): how late an attempt may land and still count.
LATE = 0.25


def test_reconnect_after_server_restart_is_spread_by_backoff(tmp_path, runs) -> None:
    """A crashed server drops every stream at once; the devices come back after backoff + jitter
    (1-1.5 s, refused while the server is down), then each wave twice the backoff later (2-3 s,
    then 4-6 s more), spread, not as one burst, until the replacement takes them. Which wave
    finds it up depends on how fast it starts (1.3 s and more on a busy 2-core VM): each wave
    is told from the tool's own timeline, not the test's clock."""
    holder, port = reserve_port()
    admin_holder, admin_port = reserve_port()
    flags = ["--keepalive", "1", "--drain-seconds", "0", "--workers", "2"]
    server = Server(flags, port, admin_port=admin_port).wait_ready()
    second: Server | None = None
    count, bin_s = 200, 0.05
    try:
        run = Devices(server.url, tmp_path, "--ramp", "0", "--timeline-bin", str(bin_s),
                      count=count, duration=20)
        runs.append(run)
        assert wait_streams(server.admin_url, count) == count
        os.killpg(server.proc.pid, signal.SIGKILL)  # a crash: ours to end, by its session
        server.proc.wait()
        time.sleep(1.7)  # down for the first wave (1-1.5 s): every attempt refused
        second = Server(flags, port, admin_port=admin_port).wait_ready()
        assert wait_streams(second.admin_url, count) == count, "every device came back"
        run.interrupt()  # all back: the run's report now, not at --duration
        report = run.wait()
    finally:
        server.stop()
        if second is not None:
            second.stop()
        holder.close()
        admin_holder.close()

    timeline = report["timeline"]
    drops, attempts, connects = timeline["drops"], timeline["attempts"], timeline["connects"]
    assert sum(drops) == count
    drop_bins = [i for i, n in enumerate(drops) if n]
    assert drop_bins[-1] - drop_bins[0] <= 2  # every stream dropped at the crash
    crash = drop_bins[0] * bin_s

    def between(series: list[int], low: float, high: float) -> int:
        return sum(n for i, n in enumerate(series) if low <= (i * bin_s) - crash < high)

    after = [(i * bin_s - crash, n) for i, n in enumerate(attempts) if n and i * bin_s > crash]
    assert sum(n for _, n in after) == report["reconnects"]
    waiting, wave, in_waves = count, 0, 0  # devices not back yet; wave k: their k+1-th retry
    while waiting:
        assert wave < 3, f"{waiting} devices not back after 3 waves: {after}"
        # Wave k is due 1+2+...+2^k s after the drop plus up to half that more (the jitter),
        # each of its k+1 timers up to LATE late; the next one starts twice as late + 1 s.
        low = 2 ** (wave + 1) - 1 - 2 * bin_s
        high, next_low = 1.5 * (low + 2 * bin_s) + (wave + 1) * LATE, 2 * low + 1
        bins = [(t, n) for t, n in after if low <= t < high]
        assert sum(n for _, n in bins) == waiting, (wave, after)  # every device still away
        if waiting == count:  # the whole fleet in one wave: spread over its jitter, no burst
            assert max(t for t, _ in bins) - min(t for t, _ in bins) >= 0.3 * 2 ** wave, bins
            assert max(n for _, n in bins) <= count * 0.3, bins
        back = between(connects, low, next_low)
        assert wave or not back, "the first wave comes while the server is down"
        in_waves += waiting
        waiting -= back
        wave += 1
    assert in_waves == report["reconnects"], "no attempt outside the waves"
    assert report["connected"] == count
    assert report["errors"].get("refused") == report["reconnects"] - count
    assert report["errors"].get("eof", 0) + report["errors"].get("reset", 0) == count
