"""Redis mode: one ``POST /broadcast`` on any node reaches every node's streams.

One ``redis-server`` and two real nodes (two workers and a Redis agent each) for the module,
``--broadcast-wait 1`` so a node that does not answer costs each test one second; each test uses
its own tokens. The tests that stop a process (a node's process group, an agent, Redis) come
last and put back what they stopped, but the very last, which stops node nb for good."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid

import psutil
import pytest

from conftest import launch
from loadtools import ENV, rawsse
from test_broadcast_workers import answering_connection, owned
from test_redis import RedisServer, _children, metrics_text, stats, token
from wire import HTTPClient, SSEReader, build_request, wait_for

from rawsse.cluster import records
from rawsse.cluster.agent_mesh import AgentMesh
from rawsse.load.broadcasts import BroadcastTally
from rawsse.node.wire import RECV_SIZE, address, iter_records

WAIT = 1.0  # --broadcast-wait of both nodes


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(redis_server):
    """Nodes na and nb (started side by side), both connected to Redis and in P nodes."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    started = []
    for node_id in ("na", "nb"):
        node, holders = launch("--redis", redis_server.url, "--node-id", node_id,
                               "--redis-prefix", prefix, "--keepalive", "0",
                               "--broadcast-wait", str(WAIT), "--stream-buffer", "4096",
                               ready=False)
        node.node_id, node.prefix = node_id, prefix
        started.append((node, holders))
    a, b = (node.wait_ready() for node, _ in started)
    assert wait_for(lambda: listed(redis_server, a) == {"na", "nb"} and
                    all(stats(n)["redis"]["up"] == 1 for n in (a, b)), timeout=15)
    yield a, b
    for node, holders in started:
        node.stop()
        for holder in holders:
            holder.close()


def listed(redis_server, node) -> set[str]:
    """The nodes in P nodes, lapsed ones included."""
    return {m.decode() for m in redis_server.client().zrange(f"{node.prefix}nodes", 0, -1)}


def broadcast(node, payload: bytes, prefix: str = "", apns_id: str | None = None) -> dict:
    client = HTTPClient(node.host, node.port, timeout=WAIT + 10)
    try:
        query = f"?prefix={prefix}" if prefix else ""
        answer = client.request("POST", f"/broadcast{query}", payload,
                                {"apns-id": apns_id} if apns_id else {})
        assert answer.status == 200, answer.body
        return answer.json()
    finally:
        client.close()


def devices(node, tag: str, count: int, readers: list) -> list[SSEReader]:
    """``count`` devices on ``node``, their tokens tagged with the node too (a token connected
    on two nodes would be one device, its older stream closed)."""
    opened = [SSEReader(node.host, node.port, token(i, tag + node.node_id)) for i in range(count)]
    readers.extend(opened)
    return opened


def test_one_broadcast_reaches_the_devices_of_every_node(nodes, readers):
    a, b = nodes
    on_a, on_b = devices(a, "cbone", 3, readers), devices(b, "cbone", 4, readers)
    apns_id = str(uuid.uuid4())
    answer = broadcast(a, b'{"aps":{"alert":"all"}}', apns_id=apns_id)
    assert answer == {"apns_id": apns_id, "streams": 7, "refused": 0,
                      "nodes": {"na": {"streams": 3, "refused": 0},
                                "nb": {"streams": 4, "refused": 0}},
                      "missing": [], "reasons": {}}
    for reader in on_a + on_b:  # the same event, one id, on both nodes
        event = reader.next_event()
        assert (event.id, event.data) == (apns_id, '{"aps":{"alert":"all"}}')

    # A prefix holds across nodes too, and any node can take the request.
    wanted = devices(a, "cbp", 2, readers) + devices(b, "cbp", 1, readers)
    prefix = "cbp".encode().hex()
    answer = broadcast(b, b"only", prefix=prefix)
    assert (answer["streams"], answer["nodes"]["na"]["streams"], answer["missing"]) == (3, 2, [])
    for reader in wanted:
        assert reader.next_event().data == "only"
    assert on_a[0].next_event(timeout=0.2) is None, "outside the prefix: not written"


def test_each_node_says_what_it_refused(nodes, readers):
    """The back-pressure rule of one node holds on each: a stream too far behind
    (``--stream-buffer``) is closed rather than buffer more, and its node counts it refused."""
    a, b = nodes
    slow_token = token(0, "cbslow")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: the kernel fills up
    slow.connect((b.host, b.port))
    try:
        slow.sendall(f"GET /events?token={slow_token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert wait_for(lambda: broadcast(a, b"hello", prefix=slow_token)["streams"] == 1)
        client = HTTPClient(a.host, a.port, timeout=20)
        payload = b"y" * 4000
        request = build_request("POST", f"/broadcast?prefix={slow_token}", payload, {})
        refused = None
        deadline = time.monotonic() + 20
        # The kernel takes ~2.8 MB (~700 events) before the stream buffers one and is closed.
        for _ in range(60):
            client.send(request * 50)
            for response in client.read_responses(50, timeout=20):
                doc = response.json()
                if doc["refused"]:
                    refused = doc
            if refused is not None or time.monotonic() > deadline:
                break
        client.close()
    finally:
        slow.close()
    assert refused is not None, "the slow stream was never refused"
    assert refused["nodes"]["nb"] == {"streams": 0, "refused": 1}
    assert refused["nodes"]["na"] == {"streams": 0, "refused": 0}
    assert refused["missing"] == []
    assert stats(b)["node"]["slow_reader_closes"] == 1


def test_push_broadcast_sums_refused_and_counts_missing_nodes(nodes, redis_server, tmp_path):
    """``rawsse push --broadcast`` on node na: a stream there too far behind is refused once (its
    reader never reads), and a node listed with no agent (named at once, no wait) is missing from
    every answer; the report, the progress line and the summary say both."""
    a, _ = nodes
    key = f"{a.prefix}nodes"
    slow_token = token(0, "cbpush")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: the kernel fills up
    slow.connect((a.host, a.port))
    redis_server.client().zadd(key, {"nquiet": int(time.time() * 1000) + 60_000})
    report_path = tmp_path / "push.json"
    try:
        slow.sendall(f"GET /events?token={slow_token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert wait_for(lambda: broadcast(a, b"hello", prefix=slow_token)["streams"] == 1)
        # ~700 events of 4 KB fill the kernel's buffers (test_each_node_says_what_it_refused).
        done = subprocess.run(
            rawsse("push", "--url", a.url, "--broadcast", "--prefix", slow_token, "--count",
                   "1500", "--pipeline", "32", "--payload", '{"aps":{},"x":"' + "y" * 3980 + '"}',
                   "--report", str(report_path)),
            env=ENV, capture_output=True, text=True, timeout=60, start_new_session=True)
    finally:
        redis_server.client().zrem(key, "nquiet")
        slow.close()
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert report["statuses"] == {"200": 1500}
    assert report["refused"] == 1 and 1 <= report["streams"] < 1500
    assert report["missing"] == {"nquiet": 1500}
    assert report["missing_reasons"]["nquiet"].startswith("not subscribed")
    assert "refused 1 missing nquiet 1500" in done.stderr  # the last progress line
    assert re.search(r"node nquiet missing +1,500 broadcasts", done.stderr), done.stderr


WORKER_WAIT = 0.5  # --broadcast-worker-wait of the late-worker pair, well under its 5 s wait


def test_late_workers_of_every_node_are_named_by_node_and_left_out_of_the_sums(
        redis_server, readers):
    """Worker 1 of both nodes held still (SIGSTOP): the node that takes the broadcast (nx) and
    the node answering it (ny) each wait their --broadcast-worker-wait for their workers, then
    name the late one in their part; the answer gathers them by node, its sums leave them out,
    and nothing is named missing as a whole. A pair of its own: the others' 1 s --broadcast-wait
    leaves no room for a worker wait before it."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    started = [launch("--redis", redis_server.url, "--node-id", node_id, "--redis-prefix", prefix,
                      "--keepalive", "0", "--broadcast-wait", "5",
                      "--broadcast-worker-wait", str(WORKER_WAIT), ready=False)
               for node_id in ("nx", "ny")]
    try:
        x, y = (node.wait_ready() for node, _ in started)
        x.prefix = prefix
        assert wait_for(lambda: listed(redis_server, x) == {"nx", "ny"} and
                        all(stats(n)["redis"]["up"] == 1 for n in (x, y)), timeout=15)
        tokens = {(node, worker): owned(f"cblate{node.port}", worker, 2)
                  for node in (x, y) for worker in (0, 1)}
        readers.extend(SSEReader(node.host, node.port, t)
                       for (node, _), ts in tokens.items() for t in ts)
        assert broadcast(x, b"all here")["streams"] == 8  # every stream held, every worker counts
        for reader in readers:
            assert reader.next_event().data == "all here"
        late = [stats(node)["workers"][1]["pid"] for node in (x, y)]
        for pid in late:
            os.kill(pid, signal.SIGSTOP)
        try:
            client = answering_connection(x)
            started_at = time.monotonic()
            body = client.request("POST", "/broadcast", b"two sleep", {}).body
            took = time.monotonic() - started_at
            client.close()
        finally:
            for pid in late:
                os.kill(pid, signal.SIGCONT)
        answer = json.loads(body)
        assert answer["missing_workers"] == {"nx": [1], "ny": [1]}, answer
        assert answer["nodes"] == {"nx": {"streams": 2, "refused": 0, "missing_workers": [1]},
                                   "ny": {"streams": 2, "refused": 0, "missing_workers": [1]}}
        assert (answer["streams"], answer["missing"]) == (4, []), answer
        assert took < 5, "ny answered within nx's --broadcast-wait"
        tally = BroadcastTally()  # what ``rawsse push --broadcast`` makes of it
        tally.add(body)
        assert tally.report()["missing_workers"] == {"nx/1": 1, "ny/1": 1}
        # The late workers had the request in their sockets: running again, they write it.
        for reader in readers:
            assert reader.next_event().id == answer["apns_id"], reader.token
    finally:
        for node, _ in started:
            node.signal(signal.SIGTERM)  # both drain at once
        for node, holders in started:
            node.stop()
            for holder in holders:
                holder.close()


def test_nodes_listed_but_unreachable_or_lapsed_are_named(nodes, redis_server):
    """A node whose heartbeat in P nodes stopped (killed: it never left) is named as lapsed;
    one still listed with no agent on its channel is named at once, without waiting."""
    a, _ = nodes
    key = f"{a.prefix}nodes"
    now_ms = int(time.time() * 1000)
    client = redis_server.client()
    client.zadd(key, {"nghost": now_ms - 5000, "nquiet": now_ms + 60_000})
    try:
        answer = broadcast(a, b"ghosts")
    finally:
        client.zrem(key, "nghost", "nquiet")
    assert answer["missing"] == ["nghost", "nquiet"]
    assert answer["reasons"]["nghost"].startswith("lapsed")
    assert answer["reasons"]["nquiet"].startswith("not subscribed"), "named without a wait"
    assert set(answer["nodes"]) == {"na", "nb"}


def test_a_stopped_node_is_named_within_the_wait(nodes, readers):
    """A node that is stopped but still listed (SIGSTOP: its Redis connections stay open, so it
    is asked) is named in the answer, which comes after --broadcast-wait, not later. Once it
    runs again it writes the event it was asked to (the answer said it may)."""
    a, b = nodes
    here, there = devices(a, "cbstop", 2, readers), devices(b, "cbstop", 1, readers)
    os.killpg(b.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = broadcast(a, b"while nb sleeps")
        elapsed = time.monotonic() - started
    finally:
        os.killpg(b.proc.pid, signal.SIGCONT)
    assert WAIT <= elapsed < WAIT + 3, elapsed  # not the 2 minutes a node waits for a worker
    assert answer["missing"] == ["nb"]
    assert answer["reasons"]["nb"].startswith(f"no answer within {WAIT:g}s")
    assert answer["nodes"] == {"na": {"streams": 2, "refused": 0}}
    assert answer["streams"] == 2
    for reader in here + there:
        assert reader.next_event().id == answer["apns_id"]
    counted = re.search(r"^rawsse_cluster_unanswered_total (\d+)$", metrics_text(a), re.M)
    assert counted and int(counted[1]) >= 1  # what an alert on unanswered nodes reads


def test_a_down_worker_of_the_answering_node_is_named_at_once_and_counts_again_respawned(
        nodes, readers):
    """Worker 1 of nb killed (kill -9) while nb's master is stopped, which holds open the time
    between a worker's death and its respawn: nb's agent cannot hand it the event (nothing
    listens on its mesh address) and names it at once, not after its --broadcast-worker-wait
    (120 s here: na's 1 s --broadcast-wait would then name all of nb). nb's part counts worker
    0's streams only; worker 1's ended with it. Respawned, it counts its streams again."""
    a, b = nodes
    tag = f"cbkill{b.port}"
    up, down = owned(tag, 0, 2), owned(tag, 1, 2)  # nb's workers 0 and 1 own these
    prefix = f"bcast-{tag}-".encode().hex()  # theirs only (``owned``'s names)
    on_up = [SSEReader(b.host, b.port, t) for t in up]
    on_down = [SSEReader(b.host, b.port, t) for t in down]
    readers.extend(on_up + on_down)
    assert broadcast(a, b"all up", prefix=prefix)["nodes"]["nb"] == \
        {"streams": 4, "refused": 0}
    for reader in on_up + on_down:
        assert reader.next_event().data == "all up"
    worker = stats(b)["workers"][1]["pid"]
    restarts = stats(b)["master"]["worker_restarts"]
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        # Dead but not reaped (its master is stopped): its sockets are closed.
        assert wait_for(lambda: psutil.Process(worker).status() == psutil.STATUS_ZOMBIE)
        answer = broadcast(a, b"one down", prefix=prefix)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert answer["missing_workers"] == {"nb": [1]}, answer
    assert answer["nodes"]["nb"] == {"streams": 2, "refused": 0, "missing_workers": [1]}
    assert (answer["streams"], answer["missing"]) == (2, []), answer
    for reader in on_up:
        assert reader.next_event().id == answer["apns_id"]
    for reader in on_down:
        assert reader.wait_closed(), "its stream ended with its worker"
    assert wait_for(lambda: respawned(b, restarts), timeout=15)
    back = [SSEReader(b.host, b.port, t) for t in down]  # its devices reconnect
    readers.extend(back)
    answer = broadcast(a, b"whole again", prefix=prefix)
    assert answer["nodes"]["nb"] == {"streams": 4, "refused": 0}, answer
    assert "missing_workers" not in answer
    for reader in on_up + back:
        assert reader.next_event().id == answer["apns_id"]


def test_agent_mesh_sends_again_to_a_respawned_worker():
    """The agent's end of the mesh over real ``SOCK_SEQPACKET`` sockets, worker 0 played by a
    socket listening at its address: the agent learns that a worker died only when a send on
    its link fails (it reads nothing there). By then the replacement may listen: the records
    for the shard go to it on a new link (a broadcast another node took, here), not to
    ``undeliverable``, which would name a worker that is up missing; a reply to the dead
    process's request is not resent (request ids start again in the replacement)."""
    node = (1 << 22) + os.getpid()  # above any pid (pid_max is at most 2**22): no node's
    undeliverable: list[int] = []
    opened: list[socket.socket] = []

    def worker() -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        opened.append(listener)
        listener.bind(address(node, 0))
        listener.listen(4)
        return listener

    def link_from(listener: socket.socket) -> socket.socket:
        listener.setblocking(False)
        try:
            link, _ = listener.accept()
        except BlockingIOError:
            raise AssertionError(f"the agent never linked: {undeliverable}") from None
        opened.append(link)
        link.settimeout(5)
        return link

    def kinds(link: socket.socket) -> list[int]:
        return [kind for kind, _ in iter_records(link.recv(RECV_SIZE))]

    async def main() -> None:
        mesh = AgentMesh(node, 1, lambda *_: None,
                         lambda _worker, kind, _body: undeliverable.append(kind))
        try:
            first = worker()
            mesh.send(0, records.BCAST, records.broadcast(1, b"", b"one"))
            mesh.flush()
            assert kinds(link_from(first)) == [records.BCAST]
            for sock in opened:  # the worker dies
                sock.close()
            replacement = worker()
            mesh.send(0, records.ROUTED, records.routed(7, 0))  # the dead one's reply
            mesh.send(0, records.BCAST, records.broadcast(2, b"", b"two"))
            mesh.flush()
            assert kinds(link_from(replacement)) == [records.BCAST]
            assert undeliverable == [records.ROUTED]
        finally:
            mesh.close()
            for sock in opened:
                sock.close()

    asyncio.run(main())


def respawned(node, restarts: int) -> bool:
    """The master reaped a worker since it counted ``restarts`` and every worker is up again
    (``/stats`` fails or lists fewer workers while one boots)."""
    try:
        doc = stats(node)
    except OSError:
        return False
    master = doc["master"]
    return (master["worker_restarts"] == restarts + 1 and master["workers_up"] == 2
            and len(doc["workers"]) == 2)


def test_with_its_agent_down_a_node_reaches_its_own_devices_and_says_others_were_not_asked(
        nodes, readers):
    """The agent killed while the master is stopped (so it cannot be respawned yet): the
    worker's link to it is gone, no node can be named, and ``*`` says so."""
    a, _ = nodes
    here = devices(a, "cbagent", 2, readers)
    workers = {w["pid"] for w in stats(a)["workers"]}
    agent = next(pid for pid in _children(a.proc.pid) if pid not in workers)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        os.kill(agent, signal.SIGKILL)
        answer = broadcast(a, b"no agent")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert answer["nodes"] == {"na": {"streams": 2, "refused": 0}}
    assert answer["missing"] == ["*"]
    assert "agent" in answer["reasons"]["*"]
    for reader in here:
        assert reader.next_event().id == answer["apns_id"]
    assert wait_for(lambda: stats(a)["redis"]["up"] == 1, timeout=15), "the agent is back"


def test_with_redis_hung_the_answer_still_comes_within_the_wait(nodes, readers, redis_server):
    """Redis stopped (SIGSTOP) under a broadcast: the answer does not wait for it longer than
    --broadcast-wait, and the reply Redis gives once it runs again is dropped quietly."""
    a, _ = nodes
    here = devices(a, "cbhung", 1, readers)
    assert broadcast(a, b"first")["missing"] == []  # na has seen nb in P nodes
    assert here[0].next_event().data == "first"
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = broadcast(a, b"redis hangs")
        elapsed = time.monotonic() - started
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert elapsed < WAIT + 1.5, elapsed  # the agent's Redis batch timeout is 3 s
    assert answer["nodes"] == {"na": {"streams": 1, "refused": 0}}
    assert answer["missing"] == ["nb"]
    assert answer["reasons"]["nb"].startswith("Redis unreachable")
    assert here[0].next_event().id == answer["apns_id"]
    # Redis answers what it was sent before the next broadcast's commands: by then the late
    # reply to the abandoned one has been handled.
    assert wait_for(lambda: broadcast(a, b"redis is back")["missing"] == [], timeout=10)
    assert "reply handler failed" not in a.output()


def test_with_redis_down_a_broadcast_reaches_this_node_and_names_the_others(nodes, readers,
                                                                            redis_server):
    a, b = nodes
    here = devices(a, "cbdown", 2, readers)
    assert broadcast(a, b"first")["missing"] == []  # na has seen nb in P nodes
    for reader in here:
        assert reader.next_event().data == "first"
    redis_server.stop()
    try:
        assert wait_for(lambda: stats(a)["redis"]["up"] == 0, timeout=10)
        answer = broadcast(a, b"redis is down")
    finally:
        redis_server.start()
    assert answer["nodes"] == {"na": {"streams": 2, "refused": 0}}
    assert answer["missing"] == ["nb"]
    assert answer["reasons"]["nb"].startswith("Redis unreachable")
    for reader in here:
        assert reader.next_event().id == answer["apns_id"]
    assert wait_for(lambda: all(stats(n)["redis"]["up"] == 1 for n in (a, b)), timeout=15)


def test_a_node_that_stops_cleanly_leaves_and_is_not_missed(nodes, redis_server):
    a, b = nodes
    assert wait_for(lambda: "nb" in listed(redis_server, a), timeout=10)  # after the outage
    b.signal(signal.SIGTERM)
    assert wait_for(lambda: "nb" not in listed(redis_server, a), timeout=5), \
        "a draining node leaves P nodes at once"
    answer = broadcast(a, b"nb has left")
    assert answer["missing"] == [] and set(answer["nodes"]) == {"na"}
