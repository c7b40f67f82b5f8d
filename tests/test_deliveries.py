"""The deliveries API (``/admin/deliveries``) and ``rawsse push --verify``: what became of each
push, asked of real ``rawsse serve`` processes (two workers, so a push and its device's stream
land on different workers), over real sockets; in Redis mode across two nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest

from conftest import ROOT, reserve_port
from rawsse.apns.deliverylog import ENTRY_BYTES, DeliveryLog
from rawsse.apns.registry import Push
from rawsse.load import verify
from rawsse.node.routing import owner_of
from rawsse.server import sse
from test_redis import (  # noqa: F401 (shared_redis and cluster are fixtures)
    _children, cluster, push, shared_redis, stats, wait_owned,
)
from wire import HTTPClient, SSEReader, wait_for

PAYLOAD = b'{"mdm":"x"}'  # what test_redis.push sends


def tokens_of(tag: str, worker: int, count: int = 1) -> list[str]:
    """``count`` hex tokens owned by ``worker`` of two (``owner_of``), distinct per ``tag``."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        raw = f"{tag}-{i:04d}".encode().ljust(32, b".")
        if owner_of(raw, 2) == worker:
            found.append(raw.hex())
        i += 1
    return found


def ask(node, method: str, path: str, body: object = None):
    client = HTTPClient(node.host, node.admin_port, timeout=10)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        return client.request(method, path, data)
    finally:
        client.close()


def fate(node, apns_id: str) -> dict:
    answer = ask(node, "GET", f"/admin/deliveries/{apns_id}")
    assert answer.status == 200, answer.body
    return answer.json()


def new_id() -> str:
    return str(uuid.uuid4())


def test_live_offline_expired_discarded_and_refused_pushes_across_two_workers(server, readers):
    # The one that must expire goes first, so its second passes while the others run.
    expiring, expiring_id = tokens_of("expiring", 1)[0], new_id()
    assert push(server, expiring, headers={"apns-id": expiring_id,
                                           "apns-expiration": str(int(time.time()) + 1)}).status == 200
    live = tokens_of("live", 0) + tokens_of("live", 1)
    for token in live:
        readers.append(SSEReader(server.host, server.port, token))
    for token in live:
        answer = push(server, token)
        assert answer.status == 200
        event = readers[live.index(token)].next_event(timeout=5)
        assert event is not None and event.id == answer.headers["apns-id"]
        seen = ask(server, "GET", f"/admin/deliveries?token={token}").json()
        assert seen["pending"] is None
        [delivered] = seen["deliveries"]
        assert delivered["apns_id"] == event.id and delivered["delay_ms"] == 0
        assert delivered["worker"] == live.index(token)  # the owner wrote it, wherever it came in
        frame = sse.encode_event(event.id.encode(), PAYLOAD)
        assert delivered["bytes"] == len(frame)
        assert fate(server, event.id)["fate"] == "delivered"

    # Offline: pending in its owner worker, then delivered when its device connects.
    offline, offline_id = tokens_of("offline", 1)[0], new_id()
    assert push(server, offline, headers={"apns-id": offline_id}).status == 200
    pending = fate(server, offline_id)
    assert pending["fate"] == "pending" and pending["pending"]["worker"] == 1
    by_token = ask(server, "GET", f"/admin/deliveries?token={offline}").json()
    assert by_token["pending"]["apns_id"] == offline_id and by_token["pending"]["expires"] > 0
    readers.append(SSEReader(server.host, server.port, offline))
    assert readers[-1].next_event(timeout=5).id == offline_id
    assert wait_for(lambda: fate(server, offline_id)["fate"] == "delivered")
    delivered = fate(server, offline_id)["delivered"]
    assert delivered["on_connect"] and delivered["delay_ms"] > 0
    assert delivered["accepted"] < delivered["written"]

    # apns-expiration 0 with no stream: discarded; newest wins: the older one is discarded too.
    gone, gone_id = tokens_of("gone", 0)[0], new_id()
    assert push(server, gone, headers={"apns-id": gone_id, "apns-expiration": "0"}).status == 200
    assert fate(server, gone_id)["fate"] == "discarded"
    twice, older, newer = tokens_of("twice", 1)[0], new_id(), new_id()
    for apns_id in (older, newer):
        assert push(server, twice, headers={"apns-id": apns_id}).status == 200
    replaced = fate(server, older)
    assert replaced["fate"] == "discarded" and "replaced" in replaced["detail"]
    assert replaced["events"][-1]["event"] == "replaced"  # said by the worker that held it
    assert fate(server, newer)["fate"] == "pending"

    refused_id = new_id()
    assert push(server, gone, b"", {"apns-id": refused_id}).status == 400
    refused = fate(server, refused_id)
    assert (refused["fate"], refused["status"], refused["reason"]) == ("rejected", 400,
                                                                        "PayloadEmpty")

    assert wait_for(lambda: fate(server, expiring_id)["fate"] == "expired", timeout=4)

    batch = ask(server, "POST", "/admin/deliveries",
                {"apns_ids": [offline_id, newer, gone_id, expiring_id, refused_id, new_id()]})
    assert batch.status == 200
    assert batch.json()["counts"] == {"delivered": 1, "pending": 1, "expired": 1,
                                      "discarded": 1, "rejected": 1, "unknown": 1}


def test_bad_queries_get_a_clear_answer(server):
    unknown = ask(server, "GET", f"/admin/deliveries/{new_id()}")
    assert unknown.status == 404 and unknown.json()["reason"] == "UnknownApnsId"
    assert ask(server, "GET", "/admin/deliveries/not-a-uuid").json()["reason"] == "BadMessageId"
    assert ask(server, "GET", "/admin/deliveries?token=xyz").json()["reason"] == "BadDeviceToken"
    assert ask(server, "GET", "/admin/deliveries").json()["reason"] == "MissingDeviceToken"
    too_many = ask(server, "POST", "/admin/deliveries", {"apns_ids": [new_id()] * 1001})
    assert too_many.status == 400 and "at most 1000 " in too_many.json()["detail"]
    assert ask(server, "DELETE", "/admin/deliveries").status == 405
    # The push listener does not serve it.
    client = HTTPClient(server.host, server.port)
    try:
        assert client.request("GET", f"/admin/deliveries/{new_id()}").status == 404
    finally:
        client.close()


def test_the_ring_keeps_the_last_n_outcomes_oldest_first():
    class Clock:
        now = 0.0

    log = DeliveryLog(3, Clock())  # type: ignore[arg-type]
    ids = [new_id().encode() for _ in range(5)]
    for n, apns_id in enumerate(ids):
        Clock.now = float(n)
        log.record(1, b"t", sse.encode_event(apns_id, b"{}"), 9.0)
    slots = log.find([], [b"t"])
    assert [log.entry(slot, 0.0)["apns_id"].encode() for slot in slots] == ids[2:]
    assert log.find([ids[0], ids[1]], []) == []  # overwritten: the ring is bounded
    assert [log.entry(slot, 0.0)["at"] for slot in log.find([ids[3].upper()], [])] == [3.0]


def test_entry_cost_is_what_help_says():
    """--help and the runbook give ENTRY_BYTES per entry: a full ring whose every entry keeps
    its own 32-byte token (the worst case: a delivered push records its stream's token)."""

    class Clock:
        now = 1.0

    size = 10_000
    pushes = [Push(sse.encode_event(new_id().encode(), b"{}"), 0.0, 0.0) for _ in range(size)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    log = DeliveryLog(size, Clock())  # type: ignore[arg-type]
    tokens = [os.urandom(32) for _ in range(size)]  # each request's own token object
    for token, one in zip(tokens, pushes):
        log.record(1, token, one.frame, one.expires)
    del tokens, token, one  # only the log keeps them now
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_entry = (after - before) / size
    print(f"{per_entry:.1f} B per delivery-log entry")
    assert ENTRY_BYTES * 0.85 <= per_entry <= ENTRY_BYTES, per_entry


# -- Redis mode: two nodes ------------------------------------------------------------------------

def agent_pid(node) -> int:
    workers = {w["pid"] for w in stats(node)["workers"]}
    return next(p for p in _children(node.proc.pid) if p not in workers)


def test_deliveries_across_two_nodes(shared_redis, cluster, readers):
    a, b = cluster(shared_redis, 2)
    expiring, expiring_id = tokens_of("rexpiring", 0)[0], new_id()
    assert push(b, expiring, headers={"apns-id": expiring_id,
                                      "apns-expiration": str(int(time.time()) + 1)}).status == 200
    live = tokens_of("rlive", 1)[0]
    readers.append(SSEReader(b.host, b.port, live))
    wait_owned(shared_redis.client(), cluster.prefix, [live], "nb")
    answer = push(a, live)  # to node a; the device is on node b
    assert answer.status == 200
    live_id = answer.headers["apns-id"]
    assert readers[-1].next_event(timeout=5).id == live_id
    for node in (a, b):  # either node's operator sees both nodes' part
        delivered = fate(node, live_id)
        assert delivered["fate"] == "delivered", delivered
        assert (delivered["delivered"]["node"], delivered["delivered"]["worker"]) == ("nb", 1)
        events = [(e["event"], e["node"]) for e in delivered["events"]]
        assert events == [("routed", "na"), ("delivered", "nb")], (node.node_id, delivered)
        assert delivered["delivered"]["delay_ms"] >= 0 and delivered["late_nodes"] == []

    offline, offline_id = tokens_of("roffline", 0)[0], new_id()
    assert push(a, offline, headers={"apns-id": offline_id}).status == 200
    pending = fate(b, offline_id)
    assert pending["fate"] == "pending" and pending["pending"]["where"] == "redis"
    by_token = ask(b, "GET", f"/admin/deliveries?token={offline}").json()
    assert by_token["pending"]["apns_id"] == offline_id
    assert [(e["event"], e["node"]) for e in by_token["events"]] == [("stored_in_redis", "na")]

    assert wait_for(lambda: fate(a, expiring_id)["fate"] == "expired", timeout=4)

    agent = agent_pid(b)  # a node that cannot answer in time is named, not waited for
    os.kill(agent, signal.SIGSTOP)
    try:
        started = time.monotonic()  # by token: one round, so one wait of at most 1 s
        late = ask(a, "GET", f"/admin/deliveries?token={live}").json()
        assert late["late_nodes"] == ["nb"] and time.monotonic() - started < 2
        assert [e["event"] for e in late["events"]] == ["routed"]  # what node a knows
    finally:
        os.kill(agent, signal.SIGCONT)


# -- rawsse push --verify -------------------------------------------------------------------------

def run_push(node, tokens: list[str], tmp_path, *flags: str) -> tuple[int, dict, str]:
    """``rawsse push --verify`` to ``tokens`` (one push each): exit code, report, stderr."""
    token_file, report = tmp_path / "tokens.txt", tmp_path / "report.json"
    token_file.write_text("\n".join(tokens) + "\n")
    done = subprocess.run([sys.executable, "-m", "rawsse", "push", "--url", node.url,
                           "--admin-url", node.admin_url, "--tokens", f"file:{token_file}",
                           "--verify", "--quiet", "--report", str(report), *flags], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    return done.returncode, json.loads(report.read_text()), done.stderr


def test_push_verify_passes_delivered_and_pending_pushes_and_fails_on_missing_ones(
        server, readers, tmp_path):
    online = tokens_of("vlive", 0, 2) + tokens_of("vlive", 1, 2)
    offline = tokens_of("voff", 0, 2) + tokens_of("voff", 1, 2)
    readers.extend(SSEReader(server.host, server.port, token) for token in online)
    code, report, stderr = run_push(server, online + offline, tmp_path, "--http2")
    assert code == 0, stderr
    checked = report["verify"]
    assert (checked["checked"], checked["delivered"], checked["pending"], checked["missing"]) == \
        (8, 4, 4, 0)
    # Without --admin-url: rawsse serve's default --admin-listen, the push port + 1.
    assert verify.default_admin_url("http://10.0.0.5:8378") == "http://10.0.0.5:8379"

    gone = tokens_of("vgone", 1, 3)  # apns-expiration 0 and no device: discarded, not delivered
    code, report, stderr = run_push(server, gone, tmp_path, "--expiration", "0")
    assert code == 1
    assert report["verify"]["missing"] == 3 and report["verify"]["fates"] == {"discarded": 3}
    assert "--verify: 3 of 3 pushes answered 200 were neither delivered nor pending" in stderr


def test_push_verify_says_why_it_cannot_verify(start_server, tmp_path):
    off = start_server("--delivery-log", "0")
    assert ask(off, "GET", f"/admin/deliveries/{new_id()}").json()["reason"] == "DeliveryLogOff"
    code, report, stderr = run_push(off, tokens_of("voffl", 0), tmp_path)
    assert code == 1 and "--delivery-log 0" in stderr and "error" in report["verify"]
    holder, port = reserve_port()  # a port nothing listens on
    try:
        with pytest.raises(verify.VerifyError, match="cannot ask --admin-url") as refused:
            verify.verify(f"http://127.0.0.1:{port}", [new_id().encode()], 0.0)
        assert refused.value.unreachable  # rawsse push exits 3, as for an unreachable --url
    finally:
        holder.close()


def test_a_delivery_log_too_large_to_allocate_is_refused_naming_the_flag():
    done = subprocess.run([sys.executable, "-m", "rawsse", "serve", "--delivery-log",
                           "99999999999"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "rawsse serve: --delivery-log: 99,999,999,999 entries would take 14000.0 GB per worker; "
        "at most 10,000,000"]
