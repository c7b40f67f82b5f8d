"""A node's life: rolling restart, drain, kill -9 of the master, state files, mesh access, logs.
Real processes, real signals, real sockets (issue 12's reproducers)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
import zlib

import psutil
import pytest

from conftest import ROOT, reserve_port
from wire import HTTPClient, SSEReader, build_request, wait_for

from test_prefork import push_all, token, worker_pids
from test_redis import cluster, shared_redis  # noqa: F401 (fixtures)


def owner(tok: str, workers: int) -> int:
    """The worker owning ``tok`` (rawsse/node/routing.py owner_of: CRC-32 of the raw token)."""
    return zlib.crc32(bytes.fromhex(tok)) % workers


def shard_tokens(shard: int, workers: int, count: int, tag: str) -> list[str]:
    found, i = [], 0
    while len(found) < count:
        tok = token(i, tag)
        if owner(tok, workers) == shard:
            found.append(tok)
        i += 1
    return found


def listening_workers(master_pid: int, port: int) -> int:
    """Children of the master holding a TCP listener on ``port`` (a draining worker closed its)."""
    count = 0
    for child in psutil.Process(master_pid).children():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in child.net_connections(kind="tcp")):
                count += 1
        except psutil.NoSuchProcess:
            pass
    return count


def status_of_device_request(server, tok: str) -> int:
    """The HTTP status a device gets for ``GET /events?token=tok`` (200 = a stream opened)."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(f"GET /events?token={tok} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


def push_with_delay(client: HTTPClient, tok: str, delay_ms: int, apns_id: str) -> int:
    client.send(build_request("POST", f"/3/device/{tok}", b'{"aps":{}}',
                              {"apns-id": apns_id, "rawsse-delivery-delay": f"{delay_ms}ms"}))
    return client.read_responses(1, timeout=10)[0].status


# -- item 2: SIGHUP is a rolling restart ----------------------------------------------------------

def test_hup_restarts_one_worker_at_a_time(start_server, readers):
    """The next worker is stopped only once the previous one's replacement serves: at every
    moment at least N-1 workers listen (all of them once drained within 0.2 s of each other)."""
    workers = 2
    srv = start_server("--workers", str(workers), "--drain-seconds", "1.5", "--keepalive", "0")
    readers.extend(SSEReader(srv.host, srv.port, t) for t in  # each drain lasts ~1.5 s
                   [tok for shard in range(workers) for tok in shard_tokens(shard, workers, 15, "roll")])
    old = set(worker_pids(srv))
    srv.signal(signal.SIGHUP)
    fewest, previous = workers, workers
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "rolling restart finished" not in srv.output():
        # /proc/net/tcp is read in chunks and can skip a socket while others close (the
        # drains' streams): only a count seen twice in a row counts
        now = listening_workers(srv.proc.pid, srv.port)
        fewest, previous = min(fewest, max(now, previous)), now
        time.sleep(0.02)
    assert "rolling restart finished" in srv.output()
    assert fewest >= workers - 1, f"{workers - fewest} workers were down at once"
    assert not set(worker_pids(srv)) & old


def test_a_draining_worker_takes_no_handed_over_stream(start_server, readers):
    """A device whose owner drains gets 503 (it reconnects to the replacement) instead of a
    stream that would keep the drain going."""
    workers = 2
    srv = start_server("--workers", str(workers), "--drain-seconds", "3", "--keepalive", "0")
    # 30 streams closed one per 0.1 s step: worker 0 drains for ~3 s
    readers.extend(SSEReader(srv.host, srv.port, t) for t in shard_tokens(0, workers, 30, "held"))
    srv.signal(signal.SIGHUP)  # slot 0 goes first
    assert wait_for(lambda: listening_workers(srv.proc.pid, srv.port) == 1, timeout=5)
    statuses = [status_of_device_request(srv, t) for t in shard_tokens(0, workers, 5, "late")]
    assert statuses == [503] * 5


# -- item 3: delayed pushes at drain ------------------------------------------------------------

def test_delayed_push_forwarded_to_a_draining_owner_is_kept(start_server, readers):
    workers = 2
    srv = start_server("--workers", str(workers), "--drain-seconds", "1.5", "--keepalive", "0")
    readers.extend(SSEReader(srv.host, srv.port, t) for t in shard_tokens(0, workers, 15, "busy"))
    offline = shard_tokens(0, workers, 20, "dly")
    srv.signal(signal.SIGHUP)  # worker 0 drains; worker 1 forwards pushes to it
    assert wait_for(lambda: listening_workers(srv.proc.pid, srv.port) == 1, timeout=5)
    client = HTTPClient(srv.host, srv.port)  # lands on worker 1, the one listening
    accepted = {}
    try:
        for t in offline:
            apns_id = str(uuid.uuid4())
            if push_with_delay(client, t, 3000, apns_id) == 200:
                accepted[t] = apns_id
    finally:
        client.close()
    assert len(accepted) >= 10, "most pushes reach the draining owner"
    assert wait_for(lambda: "rolling restart finished" in srv.output(), timeout=20)
    for t, apns_id in accepted.items():
        reader = SSEReader(srv.host, srv.port, t)
        readers.append(reader)
        event = reader.next_event(timeout=5)
        assert event is not None and event.id == apns_id, f"push for {t} answered 200 was lost"


def test_drain_keeps_the_push_due_last_for_each_token(start_server, tmp_path):
    """Delayed pushes are flushed in deadline order: the one due last stays pending."""
    state = str(tmp_path / "state.json")
    srv = start_server("--workers", "1", "--state-file", state, "--drain-seconds", "0")
    tokens = [token(i, "order") for i in range(200)]
    newest = {}
    client = HTTPClient(srv.host, srv.port)
    try:
        requests = []
        for i, t in enumerate(tokens):  # deadlines fall as tokens go: the timer heap reshuffles
            base = 60_000 - 100 * i
            newest[t] = str(uuid.uuid4())
            requests.append(build_request("POST", f"/3/device/{t}", b'{"aps":{}}',
                                          {"apns-id": str(uuid.uuid4()),
                                           "rawsse-delivery-delay": f"{base}ms"}))
            requests.append(build_request("POST", f"/3/device/{t}", b'{"aps":{}}',
                                          {"apns-id": newest[t],
                                           "rawsse-delivery-delay": f"{base + 50}ms"}))
        client.send(b"".join(requests))
        assert {r.status for r in client.read_responses(len(requests), timeout=15)} == {200}
    finally:
        client.close()
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    with open(state) as f:
        saved = {tok: base64.b64decode(frame).decode() for tok, _exp, frame in json.load(f)["pending"]}
    wrong = [t for t in tokens if f"id: {newest[t]}" not in saved[t]]
    assert not wrong, f"{len(wrong)} tokens kept an older push"


# -- item 7: kill -9 of the master --------------------------------------------------------------

def test_pending_pushes_survive_a_kill_9_of_the_master(start_server, tmp_path, readers):
    state = str(tmp_path / "state.json")
    srv = start_server("--workers", "2", "--state-file", state)
    offline = [token(i, "orphan") for i in range(100)]
    ids = push_all(srv, offline)
    workers = psutil.Process(srv.proc.pid).children()
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(5)
    _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "workers exit once they saved"
    assert "master went away" in srv.output()

    again = start_server("--workers", "3", "--state-file", state)
    assert "recovered 100 pending pushes" in again.output()
    for t in offline:
        reader = SSEReader(again.host, again.port, t)
        readers.append(reader)
        event = reader.next_event(timeout=5)
        assert event is not None and event.id == ids[t]
    assert not [p for p in os.listdir(tmp_path) if ".worker" in p], "parts are merged once"


# -- security -----------------------------------------------------------------------------------

def intruder_is_shut_out(mesh_address: str) -> bool:
    """Connect to a mesh socket from this (foreign) process and send an ADMIN record that
    would answer every push 500; True if the node closes the link."""
    from rawsse.node import wire

    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    intruder.settimeout(5)
    try:
        intruder.connect(mesh_address)
        command = json.dumps({"op": "set_faults", "rules": ["100%:500"]}).encode()
        records = [(wire.record(wire.ADMIN, wire.encode(wire.ADMIN, 1, command)), -1)]
        for message, _fds in wire.pack_messages(1, records):
            try:
                intruder.send(message)
            except OSError:
                pass  # already closed by the node: what the caller wants
        try:
            return intruder.recv(16) == b""
        except ConnectionResetError:
            return True
    finally:
        intruder.close()


def pushes_answered(server, tag: str) -> set[int]:
    statuses = set()
    for i in range(10):  # new connections land on every worker
        client = HTTPClient(server.host, server.port)
        try:
            statuses.add(client.request("POST", f"/3/device/{token(i, tag)}", b'{"aps":{}}').status)
        finally:
            client.close()
    return statuses


def test_mesh_refuses_a_process_outside_the_node(start_server):
    from rawsse.node import wire

    srv = start_server("--workers", "2", admin=True)
    assert intruder_is_shut_out(wire.address(srv.proc.pid, 0))
    assert pushes_answered(srv, "intr") == {200}
    assert "mesh connection refused" in srv.output()


def test_redis_agent_mesh_refuses_a_process_outside_the_node(shared_redis, cluster):
    from rawsse.node import wire

    (node,) = cluster(shared_redis, 1)
    assert intruder_is_shut_out(wire.address(node.proc.pid, 2))  # the agent is peer "workers"
    assert pushes_answered(node, "intra") == {200}
    assert "mesh connection refused" in node.output()


def test_state_files_are_private(start_server, tmp_path):
    from rawsse.node import statefile

    path = str(tmp_path / "s.json")
    statefile.save(path, [])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    private = tmp_path / "tmp"
    private.mkdir()
    srv = start_server("--workers", "2", env={"TMPDIR": str(private)})
    dirs = [d for d in os.listdir(private) if d.startswith("rawsse-")]
    assert len(dirs) == 1, f"a private directory for the hand-over parts: {os.listdir(private)}"
    assert stat.S_IMODE(os.stat(private / dirs[0]).st_mode) == 0o700
    srv.stop()
    assert not [d for d in os.listdir(private) if d.startswith("rawsse-")], "removed at stop"


# -- careless operators -------------------------------------------------------------------------

def test_state_file_in_a_missing_directory_is_refused_at_start(tmp_path):
    holder, port = reserve_port()
    try:
        run = subprocess.run([sys.executable, "-m", "rawsse", "serve", "--listen", f"127.0.0.1:{port}",
                              "--state-file", str(tmp_path / "missing" / "state.json")],
                             capture_output=True, text=True, timeout=15,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    finally:
        holder.close()
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--state-file" in lines[0], run.stderr


def test_a_failed_save_is_logged_once_and_the_master_exits(start_server, tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    srv = start_server("--workers", "2", "--state-file", str(folder / "state.json"))
    push_all(srv, [token(i, "nosave") for i in range(10)])
    folder.rmdir()
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(20) != 0
    assert srv.output().count("could not be saved to --state-file") == 1
    assert "Traceback" not in srv.output()


# -- unbounded memory ---------------------------------------------------------------------------

def test_pending_store_is_capped_by_bytes(start_server):
    srv = start_server("--workers", "1", "--max-pending-bytes", "20000")
    body = json.dumps({"aps": {}, "pad": "x" * 1000}).encode()
    client = HTTPClient(srv.host, srv.port)
    try:
        statuses = [client.request("POST", f"/3/device/{token(i, 'bytes')}", body).status
                    for i in range(40)]
    finally:
        client.close()
    assert 10 <= statuses.count(200) <= 20 and statuses.count(503) == 40 - statuses.count(200)
    assert statuses == sorted(statuses), "once full, every further push gets 503"


# -- logs ---------------------------------------------------------------------------------------

def test_start_hup_and_stop_logs_are_one_line_per_event(start_server):
    srv = start_server("--workers", "4", "--drain-seconds", "0.2", "--fault", "1%:500",
                       "--delivery-delay", "10ms", admin=True)
    # Ready to the fixture means accepting; the master's "all 4 workers serving" may come a
    # moment later and must not be counted among the HUP's lines.
    assert wait_for(lambda: "all 4 workers serving" in srv.output(), timeout=10)
    start = srv.output()
    from rawsse import __version__

    assert __version__ in start and f"127.0.0.1:{srv.admin_port}" in start
    assert "1%:500" in start and "10ms" in start
    before = len(srv.output().splitlines())
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: "rolling restart finished" in srv.output(), timeout=20)
    time.sleep(0.3)
    hup_lines = srv.output().splitlines()[before:]
    assert not [line for line in hup_lines if "link to worker" in line]
    assert len(hup_lines) <= 2 + 2 * 4, "\n".join(hup_lines)
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    assert srv.output().splitlines()[-1].endswith("stopped (exit code 0)")


def test_an_automatic_worker_count_says_why_in_the_start_log(start_server):
    srv = start_server("--workers", "auto", "--max-connections", "1000")
    assert wait_for(lambda: "workers serving" in srv.output(), timeout=10)
    line = next(line for line in srv.output().splitlines() if "(--workers auto)" in line)
    cpus = os.cpu_count() or 1
    assert f"{max(cpus, 1)} workers (--workers auto): 1 to hold --max-connections 1000" in line
    assert f"one per CPU ({cpus})" in line and "each idle worker costs" in line
