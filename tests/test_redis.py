"""Redis mode: several nodes acting as one push service.

Real ``redis-server`` processes (Debian's package; ``.ci/run`` installs it) on reserved loopback
ports, started with ``--save '' --appendonly no`` and stopped by PID; real ``rawsse serve`` nodes
(two workers and a Redis agent each), each test with its own key prefix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import psutil
import pytest
import redis

from conftest import _die_with_parent
from viewer import Viewer
from wire import HTTPClient, SSEReader, build_request, get_json, wait_for

def _redis_server_binary() -> str:
    """Debian's redis-server; installed here when missing (as root with apt), so the README's
    test command works on a fresh machine, not only under .ci/run."""
    found = shutil.which("redis-server")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is needed: apt-get install redis-server")
    return found


REDIS_SERVER = _redis_server_binary()


class RedisServer:
    """A ``redis-server`` on a loopback port; ``stop``/``start`` keep the port (an outage)."""

    def __init__(self) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))  # redis binds without SO_REUSEPORT: no holder can stay
        self.port = probe.getsockname()[1]
        probe.close()
        self.proc: subprocess.Popen | None = None
        self._client: redis.Redis | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
        client = self.client()
        assert wait_for(lambda: self._pings(client), timeout=10), "redis-server did not start"

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        """For the test to look into Redis (one per server, closed with it)."""
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        return self._client

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def shared_redis():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def own_redis():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def cluster(start_server):
    """``cluster(redis_server, n)`` → n nodes (na, nb, …) sharing one unique key prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"

    def start(server: RedisServer, count: int, *flags: str) -> list:
        nodes = [start_node(start_server, server, prefix, f"n{chr(97 + i)}", *flags)
                 for i in range(count)]
        for node in nodes:
            assert wait_for(lambda: stats(node).get("redis", {}).get("up") == 1, timeout=15)
        return nodes

    start.prefix = prefix  # type: ignore[attr-defined]
    return start


def start_node(start_server, server: RedisServer, prefix: str, node_id: str, *flags: str):
    node = start_server("--redis", server.url, "--node-id", node_id, "--redis-prefix", prefix,
                        "--keepalive", "0", *flags)
    node.node_id = node_id
    return node


def stats(node) -> dict:
    return get_json(node.host, node.admin_port, "/stats")


def metrics_text(node) -> str:
    client = HTTPClient(node.host, node.admin_port)
    try:
        return client.request("GET", "/metrics").body.decode()
    finally:
        client.close()


def token(i: int, tag: str) -> str:
    return (tag + f"{i:06d}").encode().hex()


def owners(client: redis.Redis, prefix: str, tokens: list[str]) -> list[str | None]:
    values = client.mget([f"{prefix}owner:{t}" for t in tokens])
    return [v.decode().rsplit("|", 1)[0] if v else None for v in values]


def wait_owned(client: redis.Redis, prefix: str, tokens: list[str], node_id: str) -> None:
    assert wait_for(lambda: owners(client, prefix, tokens) == [node_id] * len(tokens), timeout=10), \
        f"every device claimed by {node_id}"


def push(node, tok: str, payload: bytes = b'{"mdm":"x"}', headers: dict | None = None):
    client = HTTPClient(node.host, node.port)
    try:
        return client.request("POST", f"/3/device/{tok}", payload, headers or {})
    finally:
        client.close()


def pipelined_pushes(node, pushes: list[tuple[str, str]]) -> list[int]:
    """(token, apns-id) pairs over one keep-alive connection, pipelined; the statuses."""
    client = HTTPClient(node.host, node.port, timeout=20)
    try:
        client.send(b"".join(build_request("POST", f"/3/device/{t}", b'{"mdm":"p"}', {"apns-id": i})
                             for t, i in pushes))
        return [r.status for r in client.read_responses(len(pushes), timeout=30)]
    finally:
        client.close()


def concurrently(jobs: list) -> list:
    results: list = [None] * len(jobs)

    def run(n: int) -> None:
        results[n] = jobs[n]()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def events_until_marker(reader: SSEReader, marker: str) -> list[str]:
    """Event ids up to (not including) the one whose data is ``marker``."""
    ids = []
    while True:
        event = reader.next_event(timeout=10)
        assert event is not None, f"{reader.token}: stream ended or went quiet before the marker"
        if event.data == marker:
            return ids
        ids.append(event.id)


# -- cross-node delivery ------------------------------------------------------------------------

def test_pushes_to_another_node_arrive_exactly_once_under_concurrent_senders(shared_redis, cluster,
                                                                            readers):
    a, b = cluster(shared_redis, 2)
    tokens = [token(i, "xnode") for i in range(150)]
    readers.extend(SSEReader(b.host, b.port, t) for t in tokens)
    wait_owned(shared_redis.client(), cluster.prefix, tokens, "nb")

    rounds = 3  # every token gets one push per round, from 5 senders on node A at once
    ids = {t: [str(uuid.uuid4()) for _ in range(rounds)] for t in tokens}
    work = [(t, ids[t][r]) for r in range(rounds) for t in tokens]
    statuses = concurrently([lambda n=n: pipelined_pushes(a, work[n::5]) for n in range(5)])
    assert all(s == 200 for batch in statuses for s in batch)

    for t in tokens:  # a marker through B itself (local): whatever came before came once
        assert push(b, t, b"end").status == 200
    for reader in readers:
        got = events_until_marker(reader, "end")
        assert sorted(got) == sorted(ids[reader.token]), f"{reader.token}: {got}"

    routing_a, routing_b = stats(a)["node"]["redis_routing"], stats(b)["node"]["redis_routing"]
    assert routing_a["routed_out"] == len(work)
    assert routing_b["routed_in"] == len(work)
    assert routing_b["given_back"] == 0
    assert not list(shared_redis.client().scan_iter(f"{cluster.prefix}pending:*"))


def test_three_nodes_every_node_reaches_every_device(shared_redis, cluster, readers):
    nodes = cluster(shared_redis, 3)
    by_node = {node.node_id: [token(i, "tri" + node.node_id) for i in range(40)] for node in nodes}
    for node in nodes:
        readers.extend(SSEReader(node.host, node.port, t) for t in by_node[node.node_id])
    client = shared_redis.client()
    for node in nodes:
        wait_owned(client, cluster.prefix, by_node[node.node_id], node.node_id)
    everyone = [t for tokens in by_node.values() for t in tokens]
    ids = {(node.node_id, t): str(uuid.uuid4()) for node in nodes for t in everyone}
    jobs = [lambda node=node, half=half: pipelined_pushes(
                node, [(t, ids[(node.node_id, t)]) for t in everyone[half::2]])
            for node in nodes for half in (0, 1)]
    assert all(s == 200 for batch in concurrently(jobs) for s in batch)

    for node in nodes:
        for t in by_node[node.node_id]:
            assert push(node, t, b"end").status == 200
    for reader in readers:
        got = events_until_marker(reader, "end")
        assert sorted(got) == sorted(ids[(n.node_id, reader.token)] for n in nodes)
    doc = stats(nodes[0])
    assert wait_for(lambda: stats(nodes[0])["nodes"] == 3, timeout=10)
    assert doc["node_id"] == "na"
    routed = sum(stats(n)["node"]["redis_routing"]["routed_out"] for n in nodes)
    assert routed == 2 * len(everyone), "each device got one local and two routed pushes"


# -- ownership ----------------------------------------------------------------------------------

def test_a_device_reconnecting_to_another_node_takes_its_pushes_along(shared_redis, cluster,
                                                                      readers):
    a, b = cluster(shared_redis, 2)
    client = shared_redis.client()
    t = token(1, "takeover")
    first = SSEReader(a.host, a.port, t)
    readers.append(first)
    wait_owned(client, cluster.prefix, [t], "na")

    second = SSEReader(b.host, b.port, t)  # newest connection wins, across nodes
    readers.append(second)
    assert first.wait_closed(timeout=5), "the older stream on the other node is closed"
    wait_owned(client, cluster.prefix, [t], "nb")
    answer = push(a, t, b'{"mdm":"follow"}')
    assert answer.status == 200
    event = second.next_event()
    assert event is not None and event.id == answer.headers["apns-id"]

    third = SSEReader(a.host, a.port, t)  # and back
    readers.append(third)
    assert second.wait_closed(timeout=5)
    wait_owned(client, cluster.prefix, [t], "na")
    answer = push(b, t, b'{"mdm":"back"}')
    event = third.next_event()
    assert event is not None and event.id == answer.headers["apns-id"]
    assert stats(a)["node"]["redis_routing"]["evictions"] == 1
    assert stats(b)["node"]["redis_routing"]["evictions"] == 1

    third.close()  # the device leaves: its ownership goes with it
    assert wait_for(lambda: owners(client, cluster.prefix, [t]) == [None])


def test_pending_push_survives_a_node_restart(shared_redis, cluster, start_server, readers):
    a, b = cluster(shared_redis, 2, "--drain-seconds", "0.5")
    client = shared_redis.client()
    offline = [token(i, "restart") for i in range(4)]
    sent = {t: push(a, t, b'{"mdm":"while offline"}') for t in offline}
    assert all(r.status == 200 for r in sent.values())
    assert all(0 < client.pttl(f"{cluster.prefix}pending:{t}") <= 24 * 3600 * 1000 for t in offline)

    a.stop()
    again = start_node(start_server, shared_redis, cluster.prefix, "na")
    assert wait_for(lambda: stats(again)["redis"]["up"] == 1, timeout=15)
    for t, node in zip(offline, [again, b, again, b]):  # the device connects to any node
        reader = SSEReader(node.host, node.port, t)
        readers.append(reader)
        event = reader.next_event()
        assert event is not None and event.id == sent[t].headers["apns-id"]
    assert not list(client.scan_iter(f"{cluster.prefix}pending:*")), "claimed exactly once"


def test_offline_devices_keep_one_push_for_its_ttl(shared_redis, cluster, readers):
    a, b = cluster(shared_redis, 2)
    client = shared_redis.client()
    key = lambda t: f"{cluster.prefix}pending:{t}"  # noqa: E731
    now = int(time.time())
    zero, past, short, long_, live = (token(i, "ttl") for i in range(5))

    assert push(a, zero, headers={"apns-expiration": "0"}).status == 200
    assert push(a, past, headers={"apns-expiration": str(now - 10)}).status == 200
    assert client.exists(key(zero), key(past)) == 0, "deliver now or discard: never stored"
    assert push(a, short, headers={"apns-expiration": str(now + 2)}).status == 200
    assert 0 < client.pttl(key(short)) <= 2000
    first = push(a, long_, headers={"apns-expiration": str(now + 3600)})
    newest = push(a, long_, headers={"apns-expiration": str(now + 3600)})
    assert 3_500_000 < client.pttl(key(long_)) <= 3_600_000
    node = stats(a)["node"]
    assert (node["discarded"], node["stored"], node["coalesced"]) == (2, 2, 1)

    device = SSEReader(b.host, b.port, live)  # deliver-now reaches a device online elsewhere
    readers.append(device)
    wait_owned(client, cluster.prefix, [live], "nb")
    now_push = push(a, live, headers={"apns-expiration": "0"})
    assert device.next_event().id == now_push.headers["apns-id"]

    assert wait_for(lambda: not client.exists(key(short)), timeout=5), "Redis expires it"
    for t in (zero, past, short):
        reader = SSEReader(b.host, b.port, t)
        readers.append(reader)
        assert reader.next_event(timeout=0.3) is None
    reader = SSEReader(b.host, b.port, long_)
    readers.append(reader)
    assert reader.next_event().id == newest.headers["apns-id"] != first.headers["apns-id"]
    assert reader.next_event(timeout=0.3) is None, "one pending push per device"


# -- Redis down ---------------------------------------------------------------------------------

class Sender(threading.Thread):
    """Pushes to one node for ``tokens`` in turn, one at a time, until told to stop;
    records every apns-id by its answer."""

    def __init__(self, node, tokens: list[str], limit: int = 4000) -> None:
        super().__init__(daemon=True)
        self.node, self.tokens, self.limit = node, tokens, limit
        self.answers: dict[int, list[tuple[str, str]]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        client = HTTPClient(self.node.host, self.node.port)
        deadline = time.monotonic() + 30
        n = 0
        while not self.stop.is_set() and n < self.limit and time.monotonic() < deadline:
            t = self.tokens[n % len(self.tokens)]
            apns_id = str(uuid.uuid4())
            answer = client.request("POST", f"/3/device/{t}", b'{"mdm":"o"}', {"apns-id": apns_id})
            self.answers.setdefault(answer.status, []).append((t, apns_id))
            n += 1
            time.sleep(0.003)
        client.close()


def test_redis_outage_gives_503s_keeps_streams_and_recovers_without_loss(own_redis, cluster,
                                                                         readers):
    a, b = cluster(own_redis, 2)
    remote = [token(i, "outage") for i in range(30)]
    local = [token(i, "outlocal") for i in range(5)]
    readers.extend(SSEReader(b.host, b.port, t) for t in remote)
    local_readers = [SSEReader(a.host, a.port, t) for t in local]
    readers.extend(local_readers)
    wait_owned(own_redis.client(), cluster.prefix, remote, "nb")
    wait_owned(own_redis.client(), cluster.prefix, local, "na")

    sender = Sender(a, remote)
    sender.start()
    time.sleep(0.7)
    own_redis.stop()
    assert wait_for(lambda: stats(a)["redis"]["up"] == 0 and stats(b)["redis"]["up"] == 0,
                    timeout=10)
    assert wait_for(lambda: len(sender.answers.get(503, [])) >= 20, timeout=10)
    for reader in local_readers:  # pushes between devices of one node need no Redis
        answer = push(a, reader.token, b'{"mdm":"local"}')
        assert answer.status == 200
        assert reader.next_event().id == answer.headers["apns-id"]

    own_redis.start()  # empty: --save '' (owner keys are rebuilt by the nodes' resync)
    assert wait_for(lambda: stats(a)["redis"]["up"] == 1 and stats(b)["redis"]["up"] == 1,
                    timeout=15)
    wait_owned(own_redis.client(), cluster.prefix, remote, "nb")
    ok_before = len(sender.answers.get(200, []))
    assert wait_for(lambda: len(sender.answers.get(200, [])) >= ok_before + 60, timeout=15)
    sender.stop.set()
    sender.join(30)

    for t in remote:
        assert push(b, t, b"end").status == 200
    accepted = sender.answers.get(200, [])
    refused = {apns_id for _, apns_id in sender.answers.get(503, [])}
    assert set(sender.answers) <= {200, 503} and refused
    doc_a, doc_b = stats(a), stats(b)
    replaced = 0
    for reader in readers[:len(remote)]:
        got = events_until_marker(reader, "end")
        assert len(got) == len(set(got)), "no push twice"
        sent = [apns_id for t, apns_id in accepted if t == reader.token]
        assert set(got) - set(sent) <= refused, "a push refused may have run, nothing else"
        # Every push answered 200 arrives, except that while node B was not back yet its
        # devices' pushes waited in Redis, one per device: a newer one replaced an older one
        # (APNs coalescing, counted), and the newer one arrived.
        for n, apns_id in enumerate(sent):
            if apns_id not in got:
                replaced += 1
                assert any(later in got for later in sent[n + 1:]), "every push answered 200 arrives"
    assert replaced == doc_a["node"]["coalesced"]
    assert doc_b["node"]["streams"] == len(remote), "no stream was dropped"
    assert doc_a["redis"]["errors"] >= len(refused)
    assert doc_a["node"]["rejections"]["503 ServiceUnavailable"] == len(refused)
    assert doc_a["node"]["redis_routing"]["route_failures"] == len(refused)
    # An outage is not back-pressure: counted apart, so the back-pressure alert stays quiet.
    assert doc_a["node"]["owner_unavailable"] == len(refused)
    assert doc_a["node"]["queue_full"] == 0
    metrics = metrics_text(a)
    assert "rawsse_redis_up 1" in metrics
    assert f"rawsse_redis_errors_total {doc_a['redis']['errors']}" in metrics


def admin(node, method: str, path: str, body: dict | None = None):
    client = HTTPClient(node.host, node.admin_port)
    try:
        return client.request(method, path, json.dumps(body).encode() if body is not None else b"")
    finally:
        client.close()


def test_admin_changes_hold_for_the_whole_cluster(own_redis, cluster, start_server):
    """Token states and fault rules set on one node answer alike on every node, on a node that
    joins later, and after a change made while Redis was down once it is back."""
    a, b = cluster(own_redis, 2, "--workers", "2")
    gone, failing, other = token(1, "admgone"), token(2, "admfail"), token(3, "admok")
    assert admin(a, "PUT", f"/admin/tokens/{gone}",
                 {"state": "unregistered", "timestamp": 4321}).status == 200
    assert admin(b, "PUT", "/admin/faults", {"rules": ["100%:429:TooManyRequests"]}).status == 200
    revoked = {"revoked_keys": ["KEYID00001"], "revoked_certificates": [], "clock_offset": 60.0}
    assert admin(a, "POST", "/admin/auth", {"revoke_key": "KEYID00001",
                                            "clock_offset": 60}).json() == revoked
    unregistered = (410, b'{"reason":"Unregistered","timestamp":4321}')
    throttled = (429, b'{"reason":"TooManyRequests"}')

    def answer(node, tok):
        response = push(node, tok)
        return response.status, response.body

    for node in (a, b):  # every worker of both nodes (new connections spread over workers)
        assert wait_for(lambda: {answer(node, gone) for _ in range(6)} == {unregistered}, timeout=5)
        assert wait_for(lambda: {answer(node, other) for _ in range(6)} == {throttled}, timeout=5)

    late = start_node(start_server, own_redis, cluster.prefix, "nlate", "--workers", "2")
    assert wait_for(lambda: stats(late).get("redis", {}).get("up") == 1, timeout=15)
    assert {answer(late, gone) for _ in range(6)} == {unregistered}
    assert {answer(late, other) for _ in range(6)} == {throttled}
    for node in (b, late):  # provider-auth revocations too: published, and stored for a joiner
        assert wait_for(lambda: admin(node, "GET", "/admin/auth").json() == revoked, timeout=5)

    own_redis.stop()  # a change made while Redis is down reaches the others when it is back
    assert wait_for(lambda: stats(b)["redis"]["up"] == 0, timeout=10)
    assert admin(b, "DELETE", "/admin/faults").status == 200
    assert admin(b, "PUT", f"/admin/tokens/{failing}", {"state": "bad"}).status == 200
    own_redis.start()
    bad = (400, b'{"reason":"BadDeviceToken"}')
    for node in (a, b, late):
        assert wait_for(lambda: {answer(node, other) for _ in range(6)} == {(200, b"")}, timeout=15)
        assert {answer(node, failing) for _ in range(6)} == {bad}
        assert {answer(node, gone) for _ in range(6)} == {unregistered}
    listed = admin(late, "GET", "/admin/tokens").json()["tokens"]
    assert sorted((t["token"], t["state"]) for t in listed) == sorted(
        [(gone, "unregistered"), (failing, "bad")])


def test_a_killed_agent_is_respawned_and_its_node_rejoins(shared_redis, cluster, readers):
    a, b = cluster(shared_redis, 2)
    tokens = [token(i, "agent") for i in range(10)]
    readers.extend(SSEReader(b.host, b.port, t) for t in tokens)
    wait_owned(shared_redis.client(), cluster.prefix, tokens, "nb")
    workers = {w["pid"] for w in stats(b)["workers"]}
    agent = next(p for p in _children(b.proc.pid) if p not in workers)
    os.kill(agent, signal.SIGKILL)

    def rejoined() -> bool:
        redis_doc = stats(b)["redis"]
        return agent not in _children(b.proc.pid) and redis_doc["up"] == 1
    assert wait_for(rejoined, timeout=15)
    for reader in readers:
        answer = push(a, reader.token)
        assert answer.status == 200
        assert reader.next_event().id == answer.headers["apns-id"]
    assert "redis agent died" in b.output()


def _children(pid: int) -> set[int]:
    return {child.pid for child in psutil.Process(pid).children()}


# -- stats, and single node without Redis -------------------------------------------------------

def test_stats_and_metrics_show_the_node_and_the_cluster(shared_redis, cluster, readers):
    a, b = cluster(shared_redis, 2)
    readers.extend(SSEReader(a.host, a.port, token(i, "statsa")) for i in range(3))
    readers.extend(SSEReader(b.host, b.port, token(i, "statsb")) for i in range(5))
    assert wait_for(lambda: stats(a)["nodes"] == 2 and stats(a)["cluster"]["streams"] == 8,
                    timeout=10)
    doc = stats(a)
    assert doc["node_id"] == "na" and doc["node"]["streams"] == 3
    assert doc["redis"]["up"] == 1 and doc["redis"]["errors"] == 0
    assert {name: n["streams"] for name, n in doc["cluster_nodes"].items()} == {"na": 3, "nb": 5}
    viewer = Viewer(a.host, a.admin_port)  # the live view's per-node rows
    try:
        figures = viewer.next()
    finally:
        viewer.close()
    assert figures["node_id"] == "na"
    assert [(row["node"], row["here"], row["streams"]) for row in figures["nodes"]] == \
        [("na", True, 3), ("nb", False, 5)]
    metrics = metrics_text(a)
    for line in ("rawsse_redis_up 1", "rawsse_redis_errors_total 0", "rawsse_cluster_nodes 2"):
        assert line in metrics


def test_single_node_never_imports_redis():
    code = ("import sys, rawsse.node.serve, rawsse.node.arbiter, rawsse.node.process, rawsse.server.worker, rawsse.node.mesh\n"
            "import argparse\n"
            "p = argparse.ArgumentParser(); rawsse.node.serve.add_arguments(p)\n"
            "rawsse.node.serve.build_config(p.parse_args([]))\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('redis', 'hiredis')]\n")
    subprocess.run([os.environ.get("PYTHON", __import__("sys").executable), "-c", code],
                   check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
