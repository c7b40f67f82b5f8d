"""Helpers for the load-tool tests: ``rawsse devices`` / ``rawsse push`` as real subprocesses
against a real ``rawsse serve`` (conftest ``start_server``), and the server's own counters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")


def rawsse(*args: str) -> list[str]:
    return [sys.executable, "-m", "rawsse", *args]


def server_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/stats", timeout=5) as resp:
        return json.loads(resp.read())


def wait_counter(url: str, name: str, least: int, timeout: float = 15.0) -> int:
    """Poll the server's /stats until its node counter ``name`` reaches ``least`` (a run under
    way has got that far, however slowly the machine started it); returns the last value."""
    deadline = time.monotonic() + timeout
    value = -1
    while time.monotonic() < deadline:
        value = server_stats(url)["node"][name]
        if value >= least:
            break
        time.sleep(0.05)
    return value


def wait_streams(url: str, count: int, timeout: float = 15.0) -> int:
    """Poll the server's /stats until it holds ``count`` SSE streams; returns the last count."""
    deadline = time.monotonic() + timeout
    streams = -1
    while time.monotonic() < deadline:
        try:
            streams = server_stats(url)["node"]["streams"]
        except OSError:
            streams = -1
        if streams == count:
            return streams
        time.sleep(0.05)
    return streams


class Devices:
    """A ``rawsse devices`` subprocess in its own session, writing its report to ``report``."""

    def __init__(self, url: str, tmp_path: Any, *flags: str, count: int = 100,
                 duration: float = 10.0) -> None:
        self.report_path = str(tmp_path / f"devices-{time.monotonic_ns()}.json")
        self.log_path = self.report_path + ".log"
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            rawsse("devices", "--url", url, "--count", str(count), "--duration", str(duration),
                   "--report", self.report_path, *flags),
            stdout=self._log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)

    def wait(self, timeout: float = 30.0, expect: int = 0) -> dict[str, Any]:
        """The report, once the run ended by itself (or SIGINT after ``timeout``) with the exit
        code ``expect``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            code = self.proc.wait(20)
        self._log.close()
        assert code == expect, f"rawsse devices exited {code}:\n{self.output()}"
        with open(self.report_path) as f:
            return json.load(f)

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        """Teardown: end the run's whole session (its own PID is the process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


def run_push(url: str, tmp_path: Any, *flags: str, timeout: float = 60.0,
             expect: int = 0) -> dict[str, Any]:
    """One ``rawsse push`` run to the end, exiting ``expect``; returns its report."""
    report = str(tmp_path / f"push-{time.monotonic_ns()}.json")
    done = subprocess.run(rawsse("push", "--url", url, "--report", report, "--quiet", *flags),
                          env=ENV, capture_output=True, timeout=timeout, start_new_session=True)
    assert done.returncode == expect, done.stderr.decode(errors="replace")
    with open(report) as f:
        return json.load(f)
