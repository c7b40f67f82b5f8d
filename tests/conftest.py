"""Fixtures shared by every test: real ``rawsse serve`` processes on reserved loopback ports."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from typing import Iterator

import pytest
from wire import SSEReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM it if the test process dies (PR_SET_PDEATHSIG), so
    a killed pytest never leaves servers behind holding ports and CPU."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reserve_port(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """Hold a free port: a SO_REUSEPORT socket bound but not listening takes no connections,
    while the server's own SO_REUSEPORT listeners can still bind it (no free-port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


class Server:
    """A ``rawsse serve`` subprocess in its own session; ``stop()`` ends it by PID."""

    def __init__(self, args: list[str], port: int, host: str = "127.0.0.1",
                 admin_port: int | None = None, env: dict[str, str] | None = None) -> None:
        """``admin_port``: where ``--admin-listen`` (added here) puts the operator routes; None
        leaves the flag to ``args``, else the server's default, loopback on ``port`` + 1."""
        if admin_port is not None:
            args = [*args, "--admin-listen", f"127.0.0.1:{admin_port}"]
        elif "--admin-listen" not in args:
            admin_port = port + 1
        elif args[args.index("--admin-listen") + 1] != "public":
            admin_port = int(args[args.index("--admin-listen") + 1].rpartition(":")[2])
        self.host, self.port, self.admin_port = host, port, admin_port
        self.args = args
        self.log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rawsse-test-{port}.log")
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rawsse", "serve", "--listen", f"{host}:{port}", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """The operator routes (/stats, /metrics, /admin/*): not on the push port."""
        return f"http://{self.host}:{self.admin_port or self.port}"

    def wait_ready(self, timeout: float = 15.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def launch(*args: str, env: dict[str, str] | None = None, ready: bool = True,
           admin: bool = True) -> tuple[Server, list[socket.socket]]:
    """Start a server on reserved ports, the push port and the operator port (``admin_url``),
    unless ``args`` name ``--admin-listen``; returns it with the port holders to close after.
    ``admin`` is accepted for older call sites only: every server has its operator port."""
    holders = []
    holder, port = reserve_port()
    holders.append(holder)
    flags = list(args)
    admin_port = None
    if "--admin-listen" not in flags:
        admin_holder, admin_port = reserve_port()
        holders.append(admin_holder)
    if "--workers" not in flags:
        flags += ["--workers", "2"]  # every test crosses the mesh between two workers
    server = Server(flags, port, admin_port=admin_port, env=env)
    if ready:
        server.wait_ready()
    return server, holders


@pytest.fixture
def readers() -> Iterator[list]:
    """SSE readers a test opens (append them); closed when it ends, passed or failed."""
    opened: list[SSEReader] = []
    yield opened
    for reader in opened:
        reader.close()


FAILED_TRACEBACK = pytest.StashKey[types.TracebackType]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    if call.when == "call" and call.excinfo is not None:
        item.stash[FAILED_TRACEBACK] = call.excinfo.tb
    return report


@pytest.fixture(autouse=True)
def collect_leaks_here(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collect garbage at the end of every test, so a socket a test leaves open is that test's
    error (setup.cfg turns ResourceWarning into one) instead of going unseen or failing whichever
    later test the collector happens to run in. A failed test's traceback would keep its frames,
    and the sockets in them, alive past this point; its report is already written, so those
    frames' locals are cleared first."""
    yield
    failed = request.node.stash.get(FAILED_TRACEBACK, None)
    if failed is not None:
        del request.node.stash[FAILED_TRACEBACK]
    while failed is not None:
        frame = failed.tb_frame
        try:
            frame.clear()
        except RuntimeError:  # pytest's own frames, still running
            pass
        else:
            frame.f_locals  # re-syncs the locals snapshot the report made: now empty
        failed = failed.tb_next
    gc.collect()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One default server shared by a test module (tests use distinct tokens)."""
    srv, holders = launch("--keepalive", "0")
    yield srv
    srv.stop()
    for holder in holders:
        holder.close()


@pytest.fixture
def start_server() -> Iterator:
    """``start_server(*flags)`` → a ready ``Server``; all are stopped at teardown."""
    started: list[tuple[Server, list[socket.socket]]] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True,
              admin: bool = True) -> Server:
        server, holders = launch(*args, env=env, ready=ready)
        started.append((server, holders))
        return server

    yield start
    for server, holders in started:
        server.stop()
        for holder in holders:
            holder.close()
