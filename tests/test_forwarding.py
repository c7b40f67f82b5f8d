"""Forwarded pushes answered at once within the owner's credit (rawsse/node/forwarding.py), over
real processes: a 200 survives a kill -9 of the worker that took the request; an owner killed
before it took the pushes promised to it gets them again as a respawned process, and only those;
a full owner queue still answers 503, never a 200 then a drop.

Worker 1 owns the tokens these tests push to. SIGSTOP holds it still: the pushes forwarded to it
meanwhile wait in its socket queue, neither taken nor acknowledged, and a connection that worker
0 accepted is the one that answers while it is stopped."""

from __future__ import annotations

import os
import signal
import time
import uuid
from conftest import Server
from wire import HTTPClient, SSEReader, build_request, get_json, wait_for

from rawsse.node.routing import owner_of

OWNER, RECEIVER = 1, 0  # of the two workers of conftest's module ``server``


def owned_tokens(tag: str, count: int) -> list[str]:
    """``count`` hex tokens owned by worker OWNER of two."""
    found, i = [], 0
    while len(found) < count:
        raw = f"fwd-{tag}-{i:05d}".encode()
        if owner_of(raw, 2) == OWNER:
            found.append(raw.hex())
        i += 1
    return found


def push_request(tok: str, apns_id: str) -> bytes:
    return build_request("POST", f"/3/device/{tok}", f'{{"n":"{tok[-6:]}"}}'.encode(),
                         {"apns-id": apns_id})


def stats(srv: Server) -> dict:
    """/stats, retried: a connection queued on a worker just killed is reset (test_prefork)."""
    for _ in range(20):
        try:
            return get_json(srv.host, srv.admin_port, "/stats")
        except (ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise AssertionError("/stats did not answer")


def workers(srv: Server) -> list[dict]:
    return stats(srv)["workers"]


def wait_node_whole(srv: Server, restarts: int) -> None:
    assert wait_for(lambda: stats(srv)["master"]["worker_restarts"] == restarts
                    and stats(srv)["master"]["workers_up"] == 2, timeout=15)


def warm_credit(srv: Server, tag: str) -> None:
    """Forward pushes until the receiving worker has forwarded one: the owner's answer to it
    carries the credit (pushes to a token with no device: kept pending)."""
    spare = owned_tokens(tag, 1)[0]
    before = workers(srv)[RECEIVER]["forwarded"]
    for _ in range(40):
        client = HTTPClient(srv.host, srv.port)
        try:
            assert client.request("POST", f"/3/device/{spare}", b'{"warm":1}').status == 200
        except ConnectionResetError:  # queued on a listener of a worker killed just before
            continue
        finally:
            client.close()
        if workers(srv)[RECEIVER]["forwarded"] > before:
            return
    raise AssertionError("no push reached the owner through the other worker")


def receiver_connection(srv: Server, spare: str) -> HTTPClient:
    """A keep-alive connection accepted by the receiving worker, found while the owner is
    stopped: only the receiver answers a push (for ``spare``, no device) on it."""
    for _ in range(40):
        client = HTTPClient(srv.host, srv.port)
        client.send(push_request(spare, str(uuid.uuid4())))
        try:
            [answer] = client.read_responses(1, timeout=0.3)
        except TimeoutError:  # the stopped owner took this connection
            client.close()
            continue
        assert answer.status == 200, answer.body
        return client
    raise AssertionError("no connection reached the receiving worker")


def pushes_answered(client: HTTPClient, tokens: list[str]) -> dict[str, str]:
    ids = {t: str(uuid.uuid4()) for t in tokens}
    client.send(b"".join(push_request(t, ids[t]) for t in tokens))
    statuses = [r.status for r in client.read_responses(len(tokens), timeout=3)]
    assert statuses == [200] * len(tokens), "answered at once while the owner is stopped"
    return ids


def test_a_forwarded_200_survives_a_kill_of_the_worker_that_took_it(server, readers):
    tokens = owned_tokens("recv", 12)
    readers.extend(SSEReader(server.host, server.port, t) for t in tokens)
    warm_credit(server, "recv-warm")
    pids = [w["pid"] for w in workers(server)]
    os.kill(pids[OWNER], signal.SIGSTOP)
    try:
        client = receiver_connection(server, owned_tokens("recv-spare", 1)[0])
        ids = pushes_answered(client, tokens)
        client.close()
        os.kill(pids[RECEIVER], signal.SIGKILL)  # the 200s are out: the pushes are not here now
    finally:
        os.kill(pids[OWNER], signal.SIGCONT)
    for reader in readers:
        event = reader.next_event(timeout=5)
        assert event is not None and event.id == ids[reader.token], reader.token
    assert all(not reader.events_for(0.05) for reader in readers), "each push arrived once"
    wait_node_whole(server, restarts=1)


def test_an_owner_killed_before_taking_its_pushes_gets_them_again_respawned(server, readers):
    taken = owned_tokens("taken", 8)  # delivered and acknowledged before the kill
    kept = owned_tokens("kept", 8)  # promised while the owner is stopped, then it is killed
    first = [SSEReader(server.host, server.port, t) for t in taken + kept]
    readers.extend(first)
    restarts = stats(server)["master"]["worker_restarts"]
    warm_credit(server, "kept-warm")
    pids = [w["pid"] for w in workers(server)]
    spare = owned_tokens("kept-spare", 1)[0]
    os.kill(pids[OWNER], signal.SIGSTOP)
    client = receiver_connection(server, spare)
    os.kill(pids[OWNER], signal.SIGCONT)
    taken_ids = pushes_answered(client, taken)  # on the receiver: forwarded, taken, written
    for reader in first[:len(taken)]:
        event = reader.next_event(timeout=5)
        assert event is not None and event.id == taken_ids[reader.token]
    os.kill(pids[OWNER], signal.SIGSTOP)
    kept_ids = pushes_answered(client, kept)
    client.close()
    os.kill(pids[OWNER], signal.SIGKILL)  # with those pushes unread in its socket
    wait_node_whole(server, restarts + 1)

    again = [SSEReader(server.host, server.port, t) for t in taken + kept]
    readers.extend(again)
    for reader in again[len(taken):]:
        event = reader.next_event(timeout=5)
        assert event is not None and event.id == kept_ids[reader.token], reader.token
    # Pushes the dead owner had acknowledged are not sent again: nothing reaches these twice.
    assert all(not reader.events_for(0.05) for reader in again), "no push twice"
    assert "sending 8 forwarded pushes again to worker 1" in server.output()


def test_a_full_owner_queue_is_a_503_never_a_200_then_a_drop(start_server):
    srv = start_server("--workers", "2", "--keepalive", "0", "--max-pending", "30")
    warm_credit(srv, "full-warm")  # one push pending, and credit for the receiving worker
    tokens = owned_tokens("full", 150)
    clients = [HTTPClient(srv.host, srv.port) for _ in range(5)]
    statuses: list[int] = []
    try:  # rounds of 5 pipelined pushes per connection: later rounds use the credit
        for start in range(0, len(tokens), 25):
            for n, client in enumerate(clients):
                client.send(b"".join(push_request(t, str(uuid.uuid4()))
                                     for t in tokens[start + n * 5:start + n * 5 + 5]))
            for client in clients:
                statuses += [r.status for r in client.read_responses(5, timeout=5)]
    finally:
        for client in clients:
            client.close()
    doc = stats(srv)
    owner = doc["workers"][OWNER]
    assert set(statuses) == {200, 503}
    assert statuses.count(200) + 1 == owner["pending"] <= 30, "every 200 is held, in bounds"
    assert doc["node"]["promised_over_limit"] == 0
    receiver = doc["workers"][RECEIVER]  # later rounds went on credit, the first ones asked
    assert 0 < receiver["forwarded_promised"] < receiver["forwarded"]
