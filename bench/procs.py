"""Starting and stopping what a bench run needs: a server, the devices, the push sender.

Every child runs in its own session and is ended by its own PID (its process group is the PID),
never by name. Every wait has a deadline; a child that outlives its deadline is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "bench", "baseline_server.py")


def reserve_port(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """Hold a free port for the whole run: a SO_REUSEPORT socket bound but not listening takes no
    connections while the servers' own SO_REUSEPORT listeners bind the same port (socket(7),
    SO_REUSEPORT: the kernel spreads connections over the listening sockets only)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, 0))
    return holder, holder.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """The PIDs of a process and all its descendants (a prefork master and its workers). Walking
    /proc for descendants costs tens of ms: read it once, never poll with it."""
    return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]


def child_env(root: str = ROOT) -> dict[str, str]:
    """The environment of a child: ``rawsse`` imported from ``root`` (this checkout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Child:
    """A subprocess in its own session whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: str, report_path: str = "",
                 root: str = ROOT) -> None:
        self.name, self.argv, self.report_path = name, argv, report_path
        self._tree: list[int] | None = None
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        # cwd=root too: ``python -m rawsse`` puts the working directory before PYTHONPATH, so
        # from another checkout's directory it would import that checkout's rawsse.
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=child_env(root), cwd=root,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, chars: int = 2000) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-chars:]

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the child, wait up to ``timeout``, then SIGKILL its process group (its own PID)."""
        if self.running():
            self.proc.send_signal(signum)
            if self.wait(timeout) is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def report(self) -> dict[str, Any]:
        """The JSON report the child wrote to ``report_path`` ({} if none)."""
        return read_report(self.report_path) if self.report_path else {}

    def pause(self) -> None:
        """SIGSTOP the child and its descendants, so nothing connects while memory is sampled."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, signum: int) -> None:
        # The tree is read once (walking /proc takes tens of ms, and a paced child catches up on
        # its schedule after a pause, so every ms paused overshoots the next level); a child that
        # forks workers does so at start, before the first pause.
        if self._tree is None:
            try:
                self._tree = process_tree(self.pid)
            except psutil.NoSuchProcess:
                return
        for pid in self._tree:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


class Server(Child):
    """``rawsse serve`` or the baseline, listening on ``host:port``."""

    def __init__(self, kind: str, workers: int, host: str, port: int, log_dir: str,
                 extra: list[str] | None = None, root: str = ROOT) -> None:
        listen = f"{host}:{port}"
        if kind == "rawsse":
            # The bench reads /stats on the push URL, as it does the baseline's: both listen on
            # loopback only here (the operator routes' own listener would be the port + 1, which
            # a device's connection may hold).
            argv = [sys.executable, "-m", "rawsse", "serve", "--listen", listen,
                    "--workers", str(workers), "--admin-listen", "public"]
        elif kind == "baseline":
            argv = [sys.executable, BASELINE, "--listen", listen, "--workers", str(workers)]
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        name = f"{kind}-{workers}w-server" + ("" if root == ROOT else f"-{os.path.basename(root)}")
        super().__init__(name, argv + list(extra or ()), log_dir, root=root)
        self.kind, self.workers, self.url = kind, workers, f"http://{listen}"
        # The master and its workers, read once at readiness (``process_tree`` walks /proc).
        self.pids = [self.pid]

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200 and self._workers_up():
                        self.pids = process_tree(self.pid)
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.output_tail()}")

    def _workers_up(self) -> bool:
        """With N workers, /healthz answers as soon as the first binds; wait for all of them."""
        if self.workers <= 1:
            return True
        try:
            return len(psutil.Process(self.pid).children()) >= self.workers
        except psutil.NoSuchProcess:
            return False

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as resp:
            return json.loads(resp.read())


def run_to_end(name: str, argv: list[str], log_dir: str, timeout: float,
               root: str = ROOT) -> tuple[int, str]:
    """Run a bounded command (the push sender) to completion; SIGINT it past ``timeout``, and
    always leave it ended, even when the bench itself is interrupted."""
    child = Child(name, argv, log_dir, root=root)
    try:
        code = child.wait(timeout)
    finally:
        child.stop(signal.SIGINT, timeout=5)
    return child.proc.returncode if code is None else code, child.output_tail()


def read_report(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def make_log_dir(prefix: str = "rawsse-bench-") -> str:
    return tempfile.mkdtemp(prefix=prefix)
