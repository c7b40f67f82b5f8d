"""A broadcast on a prefork node (rawsse/node/mesh.py ``Mesh.broadcast``), over real processes:
every worker writes its own streams and gives its count; each worker's write loop is in /stats;
a worker that does not answer within ``--broadcast-worker-wait`` is named in the answer
(``missing_workers``), which then comes after the wait, never silently short; ``rawsse push
--broadcast`` gives it a row of its summary table.

One two-worker node for the module, with a short wait; worker 1 is held still with SIGSTOP."""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from typing import Iterator

import pytest

from conftest import Server, launch
from loadtools import ENV, rawsse
from wire import HTTPClient, SSEReader, build_request, get_json, parse_responses

from rawsse.node.routing import owner_of

WAIT = 0.5  # --broadcast-worker-wait
SLOW = 1  # the worker held still


@pytest.fixture(scope="module")
def node() -> Iterator[Server]:
    srv, holders = launch("--keepalive", "0", "--workers", "2",
                          "--broadcast-worker-wait", str(WAIT))
    yield srv
    srv.stop()
    for holder in holders:
        holder.close()


def owned(tag: str, worker: int, count: int) -> list[str]:
    """``count`` hex tokens that worker ``worker`` of two owns."""
    tokens = (f"bcast-{tag}-{i:04d}".encode() for i in itertools.count())
    return [raw.hex() for raw in itertools.islice(
        (raw for raw in tokens if owner_of(raw, 2) == worker), count)]


def workers(srv: Server) -> list[dict]:
    return get_json(srv.host, srv.admin_port, "/stats")["workers"]


def broadcast(client: HTTPClient, body: bytes) -> tuple[bytes, float]:
    """POST /broadcast on ``client``: (the answer's body, seconds it took)."""
    started = time.monotonic()
    answer = client.request("POST", "/broadcast", body, {"apns-id": str(uuid.uuid4())})
    assert answer.status == 200, answer.body
    return answer.body, time.monotonic() - started


def answering_connection(srv: Server) -> HTTPClient:
    """A keep-alive connection that a running worker accepted, found while worker SLOW is
    stopped: only a running worker answers ``/healthz`` on it."""
    for _ in range(40):
        client = HTTPClient(srv.host, srv.port)
        client.send(build_request("GET", "/healthz"))
        try:
            [answer] = client.read_responses(1, timeout=0.3)
        except TimeoutError:  # the stopped worker took this connection
            client.close()
            continue
        assert answer.status == 200
        return client
    raise AssertionError("no connection reached the running worker")


class Relay:
    """A loopback port whose one connection is relayed byte for byte over ``upstream``, a
    connection already known to reach a running worker: a connection ``rawsse push`` opened
    itself would land on the stopped worker whenever SO_REUSEPORT's hash of its 4-tuple said
    so. Keeps what the server sent (``answers``)."""

    def __init__(self, upstream: socket.socket) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers = b""
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        self.listener.settimeout(10)
        try:
            client, _ = self.listener.accept()
        except OSError:  # no connection came: the test's checks say so
            return
        with client:
            ends = {client: self.upstream, self.upstream: client}
            while True:
                ready, _, _ = select.select(list(ends), [], [], 10)
                if not ready:
                    return
                for source in ready:
                    try:
                        data = source.recv(65536)
                        if data:
                            ends[source].sendall(data)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is self.upstream:
                        self.answers += data

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()
        self.upstream.close()


def test_every_worker_writes_its_streams_and_its_write_loop_is_counted(node, readers):
    tokens = owned("all", 0, 2) + owned("all", 1, 3)
    readers.extend(SSEReader(node.host, node.port, t) for t in tokens)
    before = workers(node)
    client = HTTPClient(node.host, node.port)
    body, _ = broadcast(client, b"everyone")
    client.close()
    answer = json.loads(body)
    assert answer["streams"] == 5 and answer["refused"] == 0
    assert "missing_workers" not in answer  # every worker gave its count
    for reader in readers:
        event = reader.next_event(timeout=5)
        assert event is not None and event.data == "everyone", reader.token
    after = workers(node)
    for was, now in zip(before, after):
        assert now["broadcasts"] == was["broadcasts"] + 1
        assert now["broadcast_write_us"] > was["broadcast_write_us"], "its loop is timed"
        assert now["broadcast_deferred"] == was["broadcast_deferred"]  # small events: all taken
    assert [now["broadcast_events"] - was["broadcast_events"]
            for was, now in zip(before, after)] == [2, 3]


def test_a_worker_that_gives_no_count_in_time_is_named_and_writes_later(node, readers,
                                                                       tmp_path):
    """The broadcast is ``rawsse push --broadcast``'s, a real run: its report, progress line
    and summary table name the late worker."""
    here, late = owned("slow", 1 - SLOW, 2), owned("slow", SLOW, 3)
    readers.extend(SSEReader(node.host, node.port, t) for t in here + late)
    pid = workers(node)[SLOW]["pid"]
    payload = '{"aps":{},"m":"while one sleeps"}'
    report_path = tmp_path / "push.json"
    os.kill(pid, signal.SIGSTOP)
    try:
        relay = Relay(answering_connection(node).sock)
        try:
            done = subprocess.run(
                rawsse("push", "--url", f"http://127.0.0.1:{relay.port}", "--broadcast",
                       "--senders", "1", "--payload", payload, "--report", str(report_path)),
                env=ENV, capture_output=True, text=True, timeout=30, start_new_session=True)
        finally:
            relay.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    [answer] = [response.json() for response in parse_responses(relay.answers)]
    # Only the running worker's streams are counted, and the answer says which worker is not.
    assert answer["missing_workers"] == [SLOW], answer
    assert answer["streams"] == len(here) and answer["refused"] == 0
    report = json.loads(report_path.read_text())
    took = report["latency_ms"]["max"] / 1000
    assert WAIT <= took < WAIT + 2.0, "the answer waits --broadcast-worker-wait, no longer"
    assert report["missing_workers"] == {str(SLOW): 1}
    assert (report["streams"], report["refused"]) == (len(here), 0)
    assert f" missing workers {SLOW}:1 " in done.stderr  # the last progress line
    assert re.search(rf"^  worker {SLOW} missing +1 broadcasts$", done.stderr, re.M), done.stderr
    # The stopped worker had the request in its socket: running again, it writes the event.
    for reader in readers:
        event = reader.next_event(timeout=5)
        assert event is not None and event.data == payload, reader.token
