"""``rawsse push`` / ``rawsse devices`` as a new user meets them when things go wrong: exit codes
and ``--fail-under``, a dead URL (bounded by ``--give-up-after``), error kinds in the progress
line, a bad ``--report`` path found at the start, and SIGINT/SIGTERM still writing the report."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import time
from typing import Any, Iterator

import pytest

from conftest import reserve_port
from loadtools import ENV, rawsse, wait_counter, wait_streams
from rawsse.cli import build_parser

DEAD_WAIT = 15.0  # no test waits longer than this for a run that should end by itself


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port bound but not listening: every connect is refused."""
    holder, port = reserve_port()
    yield f"http://127.0.0.1:{port}"
    holder.close()


def run_tool(*argv: str, timeout: float = DEAD_WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(rawsse(*argv), env=ENV, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def read_json(path: Any) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def closing_lines(stderr: str, tool: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"rawsse {tool}: ")]


# -- push: exit codes and --fail-under ----------------------------------------------------------

def test_push_fails_when_no_push_is_accepted(start_server, tmp_path) -> None:
    server = start_server("--strict-tokens")  # Fleet's short test tokens: 400 BadDeviceToken
    report = tmp_path / "push.json"
    done = run_tool("push", "--url", server.url, "--tokens", "fleet:0-9", "--quiet",
                    "--report", str(report))
    assert done.returncode == 1, done.stderr
    assert read_json(report)["statuses"] == {"400 BadDeviceToken": 10}
    [line] = closing_lines(done.stderr, "push")
    assert "0 of 10 pushes answered 200" in line and "400 BadDeviceToken 10" in line
    opted_out = run_tool("push", "--url", server.url, "--tokens", "fleet:0-9", "--quiet",
                         "--report", str(report), "--fail-under", "0")
    assert opted_out.returncode == 0, opted_out.stderr


def test_push_fail_under_a_share(start_server, tmp_path) -> None:
    server = start_server("--fault", "50%:500")
    report = tmp_path / "push.json"
    done = run_tool("push", "--url", server.url, "--tokens", "fleet:0-39", "--quiet",
                    "--report", str(report), "--fail-under", "0.99")
    assert done.returncode == 1, done.stderr  # all 40 answered 200 by chance: 1 in 2^40
    result = read_json(report)
    assert 0 < result["accepted"] < 40
    assert "--fail-under 0.99" in closing_lines(done.stderr, "push")[0]
    lenient = run_tool("push", "--url", server.url, "--tokens", "fleet:0-39", "--quiet",
                       "--report", str(report), "--fail-under", "0.01")
    assert lenient.returncode == 0, lenient.stderr


def test_push_gives_up_on_a_dead_url(dead_url, tmp_path) -> None:
    """It used to retry for 600 s, its progress line showing only ``errors N``."""
    report = tmp_path / "push.json"
    started = time.monotonic()
    done = run_tool("push", "--url", dead_url, "--tokens", "fleet:0-9", "--give-up-after", "1.5",
                    "--report", str(report))
    took = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert 1.5 <= took < 8
    [line] = closing_lines(done.stderr, "push")
    assert f"could not connect to {dead_url} for 1.5 s" in line
    progress = [x for x in done.stderr.splitlines() if x.startswith("push t=")]
    assert progress and "(connect_refused " in progress[-1]  # the kind, not only a count
    assert progress[0].endswith(" ETA ?")  # nothing answered: no rate to tell the end by
    assert "push summary (ended: gave_up)" in done.stderr
    assert re.search(r"^  error connect_refused +\d+$", done.stderr, re.M), done.stderr
    assert done.stderr.splitlines()[-1] == line  # the verdict stays the last line
    result = read_json(report)
    assert result["ended"] == "gave_up"
    assert result["sent"] == 0 and set(result["errors"]) == {"connect_refused"}


def test_push_connect_that_hangs_is_timed_out(tmp_path) -> None:
    """A listener whose accept queue is full drops SYNs: connect() hangs (the kernel retries
    for minutes), so --timeout bounds a connect as it bounds an answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        # The first filler's handshake completes and fills the queue of one; the rest hang.
        assert select.select([], fillers[:1], [], 5)[1], "the first filler never connected"
        report = tmp_path / "push.json"
        done = run_tool("push", "--url", f"http://127.0.0.1:{port}", "--tokens", "fleet:0",
                        "--senders", "2", "--timeout", "0.5", "--give-up-after", "2", "--quiet",
                        "--report", str(report))
    finally:
        for sock in (*fillers, listener):
            sock.close()
    assert done.returncode == 3, done.stderr
    errors = read_json(report)["errors"]
    assert errors.get("connect_timeout", 0) >= 2, errors


def test_push_gives_up_when_its_server_goes_away(start_server, tmp_path) -> None:
    """A server stopped mid-run: the sender used to retry until --max-time (here 70 s)."""
    server = start_server("--drain-seconds", "0")
    report = tmp_path / "push.json"
    proc = start_tool("push", "--url", server.url, "--tokens", "fleet:0-9", "--rate", "20",
                      "--duration", "60", "--give-up-after", "1", "--quiet",
                      "--report", str(report))
    try:
        # Pushes answered first (no --response-delay: each in the turn it came), however long
        # the tool took to start on a busy machine.
        assert wait_counter(server.admin_url, "pushes_ok", 10) >= 10
        server.stop()
        _, stderr = proc.communicate(timeout=DEAD_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()  # ours, by PID
            proc.communicate()
    assert proc.returncode == 3, stderr
    [line] = closing_lines(stderr, "push")
    assert f"lost the connection to {server.url} for 1 s" in line
    result = read_json(report)
    assert result["ended"] == "gave_up" and result["accepted"] >= 10


def test_give_up_after_is_on_by_default() -> None:
    """A run nobody bounded ends within 10 s of losing its server (one run of it is
    test_push_gives_up_on_a_dead_url with a shorter bound; the suite cannot wait 10 s)."""
    for tool in ("push", "devices"):
        args = build_parser(tool).parse_args([tool, "--tokens", "fleet:0"] if tool == "push"
                                             else [tool])
        assert args.give_up_after == 10.0


# -- --report checked at the start --------------------------------------------------------------

@pytest.mark.parametrize("tool", ["push", "devices"])
def test_bad_report_path_is_refused_at_start(tool, dead_url, tmp_path) -> None:
    missing = tmp_path / "no-such-dir" / "report.json"
    target = ["--tokens", "fleet:0"] if tool == "push" else ["--count", "1"]
    started = time.monotonic()
    done = run_tool(tool, "--url", dead_url, *target, "--report", str(missing))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"rawsse {tool}: --report: cannot write {missing}: No such file or directory"]
    assert time.monotonic() - started < 5  # before any connect, not after the run
    existing = tmp_path / "kept.json"
    existing.write_text("old")
    assert run_tool(tool, "--url", "http://x:notaport", *target, "--report",
                    str(existing)).returncode == 2
    assert existing.read_text() == "old"  # the check leaves a file it did not write alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


# -- interruption -------------------------------------------------------------------------------

def start_tool(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(rawsse(*argv), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=DEAD_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()  # ours, by PID
        proc.communicate()
        raise
    return proc.returncode, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_push_writes_its_report(signum, start_server, tmp_path) -> None:
    server = start_server("--response-delay", "200ms")
    report = tmp_path / "push.json"
    proc = start_tool("push", "--url", server.url, "--tokens", "fleet:0-99", "--rate", "20",
                      "--duration", "60", "--quiet", "--report", str(report))
    # 8 taken by the server: with 5 senders one push in flight each, at least 3 were answered
    # and their answers read before the sender sent the next.
    assert wait_counter(server.admin_url, "pushes_ok", 8, timeout=DEAD_WAIT) >= 8
    code, stderr = finish(proc, signum)
    name = signal.Signals(signum).name
    assert code == 128 + signum, stderr
    result = read_json(report)
    assert result["ended"] == name
    assert result["accepted"] >= 3  # answered before the signal
    assert result["sent"] == result["accepted"] + result["errors"].get(f"lost_{name.lower()}", 0)
    [line] = closing_lines(stderr, "push")
    assert line.startswith(f"rawsse push: stopped by {name} after ")
    assert f"report in {report}" in line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_devices_write_report_and_summary(signum, start_server, tmp_path) -> None:
    server = start_server()
    report = tmp_path / "devices.json"
    proc = start_tool("devices", "--url", server.url, "--count", "20", "--ramp", "0",
                      "--duration", "60", "--quiet", "--report", str(report))
    assert wait_streams(server.admin_url, 20) == 20  # all connected, however slow the start
    code, stderr = finish(proc, signum)
    assert code == 0, stderr  # how a harness ends a devices run: judged on what it held
    result = read_json(report)
    assert result["ended"] == signal.Signals(signum).name
    assert result["connected"] == 20
    [line] = closing_lines(stderr, "devices")
    assert f"stopped by {signal.Signals(signum).name}" in line and "connected 20 of 20" in line


# -- devices: exit codes ------------------------------------------------------------------------

def test_devices_give_up_on_a_dead_url(dead_url, tmp_path) -> None:
    report = tmp_path / "devices.json"
    started = time.monotonic()
    done = run_tool("devices", "--url", dead_url, "--count", "5", "--duration", "60",
                    "--give-up-after", "1.5", "--report", str(report))
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - started < 8
    [line] = closing_lines(done.stderr, "devices")
    assert f"not one device got a stream from {dead_url} within 1.5 s" in line
    assert "refused" in line
    assert read_json(report)["ended"] == "gave_up"


def test_devices_fail_under_a_share_connected(start_server, tmp_path) -> None:
    server = start_server()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("aa01\naa02\naa03\nzz\n")  # the last is not hex: 400, never connected
    report = tmp_path / "devices.json"
    common = ["devices", "--url", server.url, "--count", "4", "--ramp", "0", "--duration", "1.5",
              f"--token-scheme=file:{tokens}", "--quiet", "--report", str(report)]
    strict = run_tool(*common, "--fail-under", "1")
    assert strict.returncode == 1, strict.stderr
    assert read_json(report)["connected"] == 3
    [line] = closing_lines(strict.stderr, "devices")
    assert "3 of 4 devices connected at the end, wanted --fail-under 1" in line
    assert run_tool(*common, "--fail-under", "0.75").returncode == 0
    assert run_tool(*common).returncode == 0  # without the flag: some connected is enough
