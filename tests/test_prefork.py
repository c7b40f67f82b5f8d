"""The prefork node: routing between workers, crashes, graceful stop, rolling restart, sd_notify.
Real processes, real signals, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid

from conftest import reserve_port
from wire import HTTPClient, SSEReader, build_request, get_json, wait_for

WORKERS = 4


def token(i: int, tag: str = "") -> str:
    return ("token" + tag + f"{i:06d}").encode().hex()


def node_stats(server) -> dict:
    """/stats, retried: a connection queued on a worker that was just killed is reset (without
    net.ipv4.tcp_migrate_req=1 the kernel does not move it to another worker's listener)."""
    for attempt in range(5):
        try:
            return get_json(server.host, server.admin_port, "/stats")
        except (ConnectionError, TimeoutError):
            if attempt == 4:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def open_devices(server, tokens: list[str]) -> list[SSEReader]:
    """Devices for ``tokens``, once every worker listens: ``/healthz`` answers from the first
    worker up, and a connection made before the others listen is never spread to them."""
    assert wait_for(lambda: node_stats(server)["master"]["workers_up"]
                    == node_stats(server)["master"]["workers"], timeout=15)
    return [SSEReader(server.host, server.port, t) for t in tokens]


def push_all(server, tokens: list[str], senders: int = 5) -> dict[str, str]:
    """One push per token over ``senders`` keep-alive connections; returns token -> apns-id."""
    clients = [HTTPClient(server.host, server.port) for _ in range(senders)]
    ids = {t: str(uuid.uuid4()) for t in tokens}
    try:
        for n, client in enumerate(clients):
            mine = tokens[n::senders]
            client.send(b"".join(build_request("POST", f"/3/device/{t}", f'{{"mdm":"{t}"}}'.encode(),
                                               {"apns-id": ids[t]}) for t in mine))
            refused = [(r.status, r.body) for r in client.read_responses(len(mine), timeout=15)
                       if r.status != 200]
            assert not refused, f"{len(refused)} of {len(mine)} pushes refused: {refused[:3]}"
    finally:
        for client in clients:
            client.close()
    return ids


def worker_pids(server) -> list[int]:
    return [w["pid"] for w in node_stats(server)["workers"]]


def peer_closed(reader: SSEReader) -> bool:
    """True if the server side of the stream is gone (EOF or reset), without waiting: what is
    readable now goes into the reader's buffer, then EOF or EAGAIN tells."""
    timeout = reader.sock.gettimeout()
    reader.sock.setblocking(False)  # with a timeout set, recv would first poll for that long
    try:
        while True:
            try:
                data = reader.sock.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
            reader.buffer += data
    finally:
        reader.sock.settimeout(timeout)


def test_every_push_and_broadcast_is_delivered_once_whichever_worker_takes_it(start_server, readers):
    srv = start_server("--workers", str(WORKERS))
    tokens = [token(i, "spread") for i in range(200)]
    readers.extend(open_devices(srv, tokens))
    doc = node_stats(srv)
    assert len(doc["workers"]) == WORKERS
    streams = [w["streams"] for w in doc["workers"]]
    assert sum(streams) == 200
    assert all(n >= 20 for n in streams), f"token shards spread streams over workers: {streams}"
    accepted = [w["connections_accepted"] for w in doc["workers"]]
    assert all(n > 0 for n in accepted), f"SO_REUSEPORT spreads accepts: {accepted}"

    ids = push_all(srv, tokens)
    client = HTTPClient(srv.host, srv.port)
    answer = client.request("POST", "/broadcast", b"everyone", {"apns-id": str(uuid.uuid4())})
    client.close()
    assert answer.json()["streams"] == 200
    # A last broadcast marks the end: whatever a device got before it was got exactly once.
    client = HTTPClient(srv.host, srv.port)
    assert client.request("POST", "/broadcast", b"end").json()["streams"] == 200
    client.close()
    for reader in readers:
        events = [reader.next_event(timeout=5) for _ in range(3)]
        assert None not in events, f"{reader.token}: missing events"
        assert [e.data for e in events] == [f'{{"mdm":"{reader.token}"}}', "everyone", "end"]
        assert events[0].id == ids[reader.token]
    totals = node_stats(srv)["node"]
    assert totals["delivered_live"] == 200
    assert totals["forwarded"] > 0 and totals["handoffs"] > 0


def test_killed_worker_is_respawned_and_the_loss_is_counted(start_server, readers):
    srv = start_server("--workers", str(WORKERS))
    tokens = [token(i, "kill") for i in range(120)]
    readers.extend(open_devices(srv, tokens))
    time.sleep(1.2)  # one heartbeat: the master counts a dead worker's loss from its last beat
    before = node_stats(srv)
    victim = before["workers"][1]
    assert victim["streams"] > 0
    os.kill(victim["pid"], signal.SIGKILL)

    assert wait_for(lambda: node_stats(srv)["master"]["worker_restarts"] == 1
                    and node_stats(srv)["master"]["workers_up"] == WORKERS, timeout=15)
    after = node_stats(srv)
    assert after["workers"][1]["pid"] != victim["pid"]
    assert after["master"]["lost_streams"] == victim["streams"], "the loss is counted"
    for i, worker in enumerate(after["workers"]):
        if i != 1:
            assert worker["pid"] == before["workers"][i]["pid"], "other workers untouched"

    dropped = [r for r in readers if peer_closed(r)]
    assert len(dropped) == victim["streams"], "only the dead worker's devices lost their stream"
    survivors = [r for r in readers if r not in dropped]
    # Pushes to every device: the dropped ones are offline now, so they wait as pending...
    ids = push_all(srv, tokens)
    for reader in survivors:
        assert reader.next_event().id == ids[reader.token]
    # ...and arrive when the devices reconnect to the respawned worker.
    for reader in dropped:
        again = SSEReader(srv.host, srv.port, reader.token)
        readers.append(again)
        assert again.next_event().id == ids[reader.token]


def test_sigterm_keeps_pending_pushes_for_the_next_start(start_server, tmp_path, readers):
    state = str(tmp_path / "pending.json")
    srv = start_server("--workers", str(WORKERS), "--state-file", state, "--drain-seconds", "1")
    offline = [token(i, "term") for i in range(40)]
    ids = push_all(srv, offline)
    online = SSEReader(srv.host, srv.port, token(999, "term"))
    readers.append(online)
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert online.wait_closed(timeout=10), "streams are closed during the drain"
    assert srv.proc.wait(20) == 0
    assert time.monotonic() - started < 15
    assert "saved 40 pending pushes" in srv.output()

    again = start_server("--workers", "3", "--state-file", state)  # another shard layout too
    for t in offline:
        reader = SSEReader(again.host, again.port, t)
        readers.append(reader)
        assert reader.next_event().id == ids[t]
    assert node_stats(again)["node"]["delivered_on_connect"] == 40


def test_drain_spreads_stream_closes_over_the_window(start_server, readers):
    srv = start_server("--workers", "2", "--drain-seconds", "2")
    readers.extend(open_devices(srv, [token(i, "drain") for i in range(60)]))
    start = time.monotonic()
    srv.signal(signal.SIGTERM)
    closed_at = []
    for reader in readers:
        assert reader.wait_closed(timeout=10)
        closed_at.append(time.monotonic() - start)
    assert srv.proc.wait(15) == 0
    assert max(closed_at) - min(closed_at) >= 1.0, f"closes spread over the window: {closed_at}"


def test_hup_rolling_restart_replaces_every_worker_and_keeps_pending(start_server, readers):
    srv = start_server("--workers", "2", "--drain-seconds", "0.5")
    offline = [token(i, "hup") for i in range(20)]
    ids = push_all(srv, offline)
    old = set(worker_pids(srv))
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: len(pids := worker_pids(srv)) == 2 and not (set(pids) & old)
                    and node_stats(srv)["master"]["workers_up"] == 2, timeout=20)
    for t in offline:
        reader = SSEReader(srv.host, srv.port, t)
        readers.append(reader)
        assert reader.next_event().id == ids[t]
    assert "rolling restart finished" in srv.output()


def test_ttin_is_refused_with_a_reason(start_server):
    srv = start_server("--workers", "2")
    srv.signal(signal.SIGTTIN)
    assert wait_for(lambda: "SIGTTIN ignored" in srv.output())
    assert node_stats(srv)["master"]["workers"] == 2


def test_a_port_the_workers_cannot_bind_stops_the_master_before_any_fork(start_server):
    blocker = socket.socket()
    # No SO_REUSEPORT (nor SO_REUSEADDR): the workers could not bind this port. Not listening,
    # so the listener check lets it through; the master's trial bind is what refuses it.
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    admin_holder, admin_port = reserve_port()
    from conftest import Server

    srv = Server(["--workers", "2"], port, admin_port=admin_port)
    try:
        assert srv.proc.wait(15) == 3
        assert srv.output().splitlines() == [
            f"rawsse serve: --listen 127.0.0.1:{port}: cannot listen: Address already in use: a "
            "client connection or a program without SO_REUSEPORT holds the port (ss -tanp shows "
            "which); choose another --listen"]
    finally:
        srv.stop()
        blocker.close()
        admin_holder.close()


def test_sd_notify_ready_status_watchdog_stopping(start_server, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    srv = start_server("--workers", "2", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    messages: list[str] = []

    def receive_until(text: str) -> None:
        while not any(text in m for m in messages):
            messages.append(sock.recv(4096).decode())

    receive_until("READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready and "2/2 workers" in ready
    receive_until("WATCHDOG=1")
    srv.signal(signal.SIGTERM)
    receive_until("STOPPING=1")
    receive_until("EXTEND_TIMEOUT_USEC=")
    assert srv.proc.wait(20) == 0
    sock.close()


def test_workers_exit_when_the_master_is_killed(start_server):
    """Nobody would reap or respawn them: a worker that loses its master stops at once."""
    import psutil

    srv = start_server("--workers", "2")
    workers = psutil.Process(srv.proc.pid).children()
    assert len(workers) == 2
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(5)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived their master: {[p.pid for p in alive]}"


def admin_call(server, method: str, path: str, body: dict | None = None):
    client = HTTPClient(server.host, server.admin_port)
    try:
        return client.request(method, path, json.dumps(body).encode() if body is not None else b"")
    finally:
        client.close()


def answers_on_fresh_connections(server, tok: str, connections: int = 12) -> set[tuple[int, bytes]]:
    """(status, body) of one push per new connection: new connections land on every worker."""
    seen = set()
    for _ in range(connections):
        client = HTTPClient(server.host, server.port)
        try:
            response = client.request("POST", f"/3/device/{tok}", b'{"mdm":"x"}')
        finally:
            client.close()
        seen.add((response.status, response.body))
    return seen


def test_admin_changes_made_at_run_time_survive_worker_restarts(start_server):
    """A worker respawned after a crash, or replaced by a rolling restart (systemctl reload),
    answers with the token states and fault rules set at run time, like the workers it joins."""
    srv = start_server("--workers", str(WORKERS), "--drain-seconds", "0.2")
    gone, other = token(1, "adm"), token(2, "adm")
    assert admin_call(srv, "PUT", f"/admin/tokens/{gone}",
                      {"state": "unregistered", "timestamp": 1234}).status == 200
    assert admin_call(srv, "PUT", "/admin/faults", {"rules": ["100%:429:TooManyRequests"]}).status == 200

    old = set(worker_pids(srv))
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: len(pids := worker_pids(srv)) == WORKERS and not (set(pids) & old)
                    and node_stats(srv)["master"]["workers_up"] == WORKERS, timeout=20)
    os.kill(worker_pids(srv)[2], signal.SIGKILL)
    assert wait_for(lambda: node_stats(srv)["master"]["worker_restarts"] == 1
                    and node_stats(srv)["master"]["workers_up"] == WORKERS, timeout=15)

    assert answers_on_fresh_connections(srv, gone) == {
        (410, b'{"reason":"Unregistered","timestamp":1234}')}
    assert answers_on_fresh_connections(srv, other) == {(429, b'{"reason":"TooManyRequests"}')}
    listed = {json.dumps(admin_call(srv, "GET", "/admin/faults").json()) for _ in range(12)}
    assert listed == {json.dumps({"faults": [{"percent": 100.0, "status": 429,
                                              "reason": "TooManyRequests",
                                              "rule": "100%:429:TooManyRequests"}]})}
