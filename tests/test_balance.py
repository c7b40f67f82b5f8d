"""Push senders' connections spread over a node's workers (``rawsse/node/balance.py``).

Every sender connects from a loopback source port chosen so that SO_REUSEPORT's hash gives all
of them the same worker (``wire.ports_on_one_worker`` probes each port once): without balancing
they would all be parsed there. Real processes, real sockets, real signals."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
import uuid
import zlib

import pytest

from conftest import launch
from test_h2_server import H2Client
from wire import (HTTPClient, SSEReader, build_request, get_json, ports_on_one_worker, reset_close,
                  serving_worker, wait_for)

# --keepalive sets the workers' tick, and a sibling whose last tick is LIVE_TICKS (3) ticks old
# is passed over: a stopped one after 1.5 s here.
TICK = 0.5
STALE = 3 * TICK + 0.3


@pytest.fixture(scope="module")
def node():
    srv, holders = launch("--workers", "2", "--keepalive", str(TICK))
    yield srv
    srv.stop()
    for holder in holders:
        holder.close()


def stats(srv) -> dict:
    return get_json(srv.host, srv.admin_port, "/stats")


def senders(srv) -> list[int]:
    return [w["sender_connections"] for w in stats(srv)["workers"]]


def token_of(index: int, tag: str) -> str:
    """A token that worker ``index`` of 2 owns (``routing.owner_of``: CRC-32 modulo 2)."""
    for n in range(1000):
        token = f"{tag}-{n}-{uuid.uuid4().hex[:8]}".encode()
        if zlib.crc32(token) % 2 == index:
            return token.hex()
    raise AssertionError("unreachable")


def push(client, token: str) -> tuple[int, str]:
    apns_id = str(uuid.uuid4())
    answer = client.request("POST", f"/3/device/{token}", f'{{"to":"{token}"}}'.encode(),
                            {"apns-id": apns_id})
    return answer.status, apns_id


def sender_at(srv, port: int) -> HTTPClient:
    return HTTPClient(srv.host, srv.port, source=("127.0.0.1", port))


def close_all(srv, clients) -> None:
    """Close the senders and wait until no worker counts one (each test starts from none)."""
    for client in clients:
        client.close()
    assert wait_for(lambda: senders(srv) == [0, 0], timeout=5), senders(srv)


def holder_of_one(srv) -> dict:
    """The worker holding the only sender connection open."""
    [worker] = [w for w in stats(srv)["workers"] if w["sender_connections"] == 1]
    return worker


def test_six_senders_hashed_to_one_worker_end_three_and_three(node, readers):
    _, ports = ports_on_one_worker(node.host, node.port, 6)
    tokens = [token_of(i % 2, "spread") for i in range(6)]  # devices on both workers
    readers.extend(SSEReader(node.host, node.port, t) for t in tokens)
    before = stats(node)["node"]
    clients: list[HTTPClient] = []
    sent: dict[str, list[str]] = {}
    try:
        for port, token in zip(ports, tokens):  # one at a time: each sees the last one placed
            client = sender_at(node, port)
            clients.append(client)
            status, apns_id = push(client, token)
            assert status == 200
            sent[token] = [apns_id]
        for client in clients:  # every sender reaches every device, wherever it is served
            for token in tokens:
                status, apns_id = push(client, token)
                assert status == 200
                sent[token].append(apns_id)
        doc = stats(node)
        assert [w["sender_connections"] for w in doc["workers"]] == [3, 3]
        assert doc["node"]["senders_handed_over"] - before["senders_handed_over"] == 3
        assert doc["node"]["senders_adopted"] - before["senders_adopted"] == 3
        assert all(w["pushes_received"] > 0 for w in doc["workers"])
        with urllib.request.urlopen(node.admin_url + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        for line in ('rawsse_sender_connections{worker="0"} 3',
                     'rawsse_sender_connections{worker="1"} 3',
                     "rawsse_sender_handoffs_total{", "rawsse_senders_adopted_total{",
                     "rawsse_sender_handoff_failures_total{"):
            assert line in metrics, line
    finally:
        close_all(node, clients)
    for reader in readers:
        events = [reader.next_event(timeout=5) for _ in range(7)]
        assert None not in events, f"{reader.token}: missing events"
        assert sorted(e.id for e in events) == sorted(sent[reader.token])


def test_five_senders_connecting_at_once_end_three_and_two(node):
    """As ``rawsse push`` and Fleet open them: all five, then the first push on each. Their
    first reads come before the sibling has read any hand-off, so what was handed counts for it
    until its slot shows it (``Balancer.in_flight``)."""
    _, ports = ports_on_one_worker(node.host, node.port, 5)
    clients = [sender_at(node, port) for port in ports]
    try:
        token = token_of(0, "burst")
        for client in clients:
            client.send(build_request("POST", f"/3/device/{token}", b"{}"))
        for client in clients:
            assert [r.status for r in client.read_responses(1)] == [200]
        assert sorted(senders(node)) == [2, 3]
    finally:
        close_all(node, clients)


def test_an_h2c_sender_is_handed_over_and_served(node):
    _, ports = ports_on_one_worker(node.host, node.port, 2)
    first = sender_at(node, ports[0])
    clients: list = [first]
    try:
        assert push(first, token_of(0, "h2c"))[0] == 200
        holder = holder_of_one(node)
        h2 = H2Client(node.host, node.port, source=("127.0.0.1", ports[1]))
        clients.append(h2)
        for index in (0, 1):
            answer = h2.request("POST", f"/3/device/{token_of(index, 'h2c')}", b'{"a":1}')
            assert answer.status == 200, answer
        doc = stats(node)
        other = [w for w in doc["workers"] if w["worker"] != holder["worker"]][0]
        assert other["sender_connections"] == 1 and other["senders_adopted"] >= 1
        assert [w["sender_connections"] for w in doc["workers"]] == [1, 1]
    finally:
        close_all(node, clients)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def respawned(srv, dead: int) -> bool:
    try:
        pids = [w["pid"] for w in stats(srv)["workers"]]
    except OSError:
        return False
    return len(pids) == 2 and dead not in pids


def test_a_stopped_sibling_gets_none_and_a_killed_one_costs_none(node):
    """SIGSTOP: once its tick is old the sibling is passed over (a connection handed to it would
    wait, unanswered, until it runs again). kill -9 with the master stopped, so the sibling's
    slot still looks live: the hand-off cannot leave and the connection is served here."""
    _, ports = ports_on_one_worker(node.host, node.port, 3)
    first = sender_at(node, ports[0])
    clients = [first]
    master = node.proc.pid
    try:
        assert push(first, token_of(0, "stop"))[0] == 200
        holder = holder_of_one(node)
        sibling = [w for w in stats(node)["workers"] if w["worker"] != holder["worker"]][0]
        mine = token_of(holder["worker"], "stop")  # owned by the holder: no mesh hop
        os.kill(sibling["pid"], signal.SIGSTOP)
        try:
            time.sleep(STALE)
            second = sender_at(node, ports[1])
            clients.append(second)
            second.sock.settimeout(2)
            assert push(second, mine)[0] == 200  # served by the holder, the sibling stopped
        finally:
            os.kill(sibling["pid"], signal.SIGCONT)
        assert senders(node)[holder["worker"]] == 2
        failures = stats(node)["workers"][holder["worker"]]["sender_handoff_failures"]

        os.kill(master, signal.SIGSTOP)  # no reap, no respawn: the slot keeps its last tick
        try:
            os.kill(sibling["pid"], signal.SIGKILL)
            assert wait_for(lambda: process_state(sibling["pid"]) == "Z", timeout=2)
            third = sender_at(node, ports[2])
            clients.append(third)
            third.sock.settimeout(2)
            assert push(third, mine)[0] == 200
        finally:
            os.kill(master, signal.SIGCONT)
        assert wait_for(lambda: respawned(node, sibling["pid"]), timeout=10)
        doc = stats(node)["workers"][holder["worker"]]
        assert doc["sender_connections"] == 3
        assert doc["sender_handoff_failures"] == failures + 1
    finally:
        close_all(node, clients)


def test_a_draining_sibling_gets_none(node):
    """SIGTERM to one worker: it clears its slot's stamp as its drain starts (not at its next
    tick), so a sender arriving at the other stays there instead of going to a worker that
    would answer it and close. Last to use the module's node: the drained worker is replaced
    after it."""
    holder, ports = ports_on_one_worker(node.host, node.port, 2)
    _, others = ports_on_one_worker(node.host, node.port, 2, other_than=holder)
    first = sender_at(node, ports[0])
    clients: list = [first]
    try:
        assert push(first, token_of(0, "drain"))[0] == 200
        held_by = holder_of_one(node)
        sibling = [w for w in stats(node)["workers"] if w["worker"] != held_by["worker"]][0]
        # An unfinished request keeps the sibling draining (its drain waits for it).
        slow = socket.create_connection((node.host, node.port), timeout=5,
                                        source_address=("127.0.0.1", others[0]))
        clients.append(slow)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        os.kill(sibling["pid"], signal.SIGTERM)
        # Its drain has begun once its listener is closed: the hash then gives its ports to
        # the holder.
        assert wait_for(lambda: served_from(node, others[1]) == holder, timeout=3)
        second = sender_at(node, ports[1])
        clients.append(second)
        assert push(second, token_of(0, "drain"))[0] == 200
        assert stats(node)["workers"][held_by["worker"]]["sender_connections"] == 2
    finally:
        for client in clients:
            client.close()


def served_from(srv, port: int) -> str:
    """Which worker serves a connection from ``port``; "" for a probe that landed in the accept
    queue of a listener being closed (the kernel resets those: a drain's first moment)."""
    probe = socket.create_connection((srv.host, srv.port), timeout=5,
                                     source_address=("127.0.0.1", port))
    try:
        return serving_worker(probe)
    except (ConnectionResetError, BrokenPipeError):
        return ""
    finally:
        reset_close(probe)


def test_four_senders_hashed_to_one_of_four_workers_end_one_each(start_server):
    """The rule is "this worker holds more than the least": one above the least is as even as
    whole connections go (a looser "two more" would leave 2, 1, 1, 0 here)."""
    srv = start_server("--workers", "4", "--keepalive", "0")
    _, ports = ports_on_one_worker(srv.host, srv.port, 4)
    clients = []
    try:
        for port in ports:
            clients.append(sender_at(srv, port))
            assert push(clients[-1], token_of(0, "four"))[0] == 200
        assert senders(srv) == [1, 1, 1, 1]
    finally:
        for client in clients:
            client.close()


def test_balance_senders_off_leaves_them_where_the_hash_put_them(start_server):
    srv = start_server("--workers", "2", "--balance-senders", "off")
    _, ports = ports_on_one_worker(srv.host, srv.port, 3)
    clients = [sender_at(srv, port) for port in ports]
    try:
        for client in clients:
            assert push(client, token_of(0, "off"))[0] == 200
        doc = stats(srv)
        assert sorted(w["pushes_received"] for w in doc["workers"]) == [0, 3]
        assert doc["node"]["senders_handed_over"] == 0
        assert "--balance-senders off" in srv.output()
    finally:
        for client in clients:
            client.close()
