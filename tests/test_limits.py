"""Running out of file descriptors: accept() failing with EMFILE must neither spin nor kill the
worker (asyncio's accept backoff; Fleet's resilientListener), and the node recovers by itself."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time

import psutil

from conftest import ROOT, reserve_port
from wire import HTTPClient, get_json, wait_for

FD_LIMIT = 120


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_emfile_on_accept_pauses_instead_of_spinning_and_recovers():
    holder, port = reserve_port()
    admin_holder, admin_port = reserve_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawsse", "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1",
         "--admin-listen", f"127.0.0.1:{admin_port}", "--max-connections", "100000"],
        env=dict(os.environ, PYTHONPATH=ROOT), preexec_fn=_low_fd_limit, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: list[socket.socket] = []
    try:
        assert wait_for(lambda: _healthy(port), timeout=15)
        worker = psutil.Process(proc.pid).children()[0]
        # More connections than the worker has descriptors: the kernel completes them all into
        # the backlog, the worker's accept() hits EMFILE.
        for _ in range(FD_LIMIT + 80):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(1.0)
        cpu_before = sum(worker.cpu_times()[:2])
        time.sleep(2.0)
        busy = sum(worker.cpu_times()[:2]) - cpu_before
        assert worker.is_running() and proc.poll() is None, "EMFILE must not kill the worker"
        assert busy < 0.5, f"the worker spun on EMFILE: {busy:.2f}s CPU in 2s"
        for sock in clients:
            sock.close()
        clients.clear()
        assert wait_for(lambda: _healthy(port), timeout=15), "the node recovers once fds free up"
        errors = get_json("127.0.0.1", admin_port, "/stats")["node"]["accept_errors"]
        assert errors.get("EMFILE", 0) >= 1, errors
    finally:
        for sock in clients:
            sock.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        holder.close()
        admin_holder.close()


def _healthy(port: int) -> bool:
    try:
        client = HTTPClient("127.0.0.1", port, timeout=2)
        try:
            return client.request("GET", "/healthz").status == 200
        finally:
            client.close()
    except (OSError, ConnectionError):
        return False
