"""The routes in-process: a protocol-neutral ``Request`` in, an ``Answer`` out, no socket.

A ``Recorder`` plays the protocol side of the seam (``rawsse/server/exchange.py``): it is the
request's channel and keeps what the routes answer. The worker is real (its loop, registry and
``LocalRouter``); nothing listens. The real-socket tests of the same routes are in
``test_push_api.py`` and ``test_http.py``.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from rawsse.apns.routes import Routes
from rawsse.config import ServeConfig, parse_distribution
from rawsse.server.exchange import Answer, Request
from rawsse.server.worker import Worker

TOKEN = "aabbccdd" * 8
APNS_ID = b"6f1a2b3c-0000-4000-8000-00000000abcd"


class Recorder:
    """The channel of the requests a test makes: what each got, in order."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.streams: list[bytes] = []

    def answer(self, request: Request, answer: Answer) -> None:
        self.answers.append(answer)

    def answer_ok(self, request: Request, apns_id: bytes) -> None:
        self.answer(request, Answer(200, b"", None, ((b"apns-id", apns_id),)))

    def become_stream(self, request: Request, token: bytes) -> None:
        self.streams.append(token)


def request(channel: Recorder, method: bytes, target: bytes, body: bytes = b"",
            headers: dict[bytes, bytes] | None = None, operator: bool = False) -> Request:
    req = Request(channel, operator)
    req.method = method
    req.set_target(target)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    req.body = body
    return req


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker(ServeConfig(keepalive=0))
    yield w
    w.loop.close()


def serve(worker: Worker, req: Request) -> Answer:
    channel = req.channel
    assert isinstance(channel, Recorder)
    worker.routes.handle(req)
    assert len(channel.answers) == 1, channel.answers
    return channel.answers[0]


def reason(answer: Answer) -> str:
    return json.loads(answer.body)["reason"]


def test_a_push_for_an_offline_device_is_accepted_and_kept_pending(worker: Worker) -> None:
    answer = serve(worker, request(Recorder(), b"POST", f"/3/device/{TOKEN}".encode(),
                                   b'{"aps":{}}', {b"apns-id": APNS_ID}))
    assert answer.status == 200
    assert answer.headers == ((b"apns-id", APNS_ID),)
    assert bytes.fromhex(TOKEN) in worker.registry.pending
    assert worker.stats.stored == 1


@pytest.mark.parametrize("method, target, body, headers, status, why", [
    (b"GET", f"/3/device/{TOKEN}", b"{}", {}, 405, "MethodNotAllowed"),
    (b"POST", f"/3/device/{TOKEN}/x", b"{}", {}, 404, "BadPath"),
    (b"POST", "/3/device/zz", b"{}", {}, 400, "BadDeviceToken"),
    (b"POST", "/3/device/", b"{}", {}, 400, "MissingDeviceToken"),
    (b"POST", f"/3/device/{TOKEN}", b"", {}, 400, "PayloadEmpty"),
    (b"POST", f"/3/device/{TOKEN}", b"x" * 4097, {}, 413, "PayloadTooLarge"),
    (b"POST", f"/3/device/{TOKEN}", b"{}", {b"apns-priority": b"7"}, 400, "BadPriority"),
    (b"POST", f"/3/device/{TOKEN}", b"{}", {b"apns-expiration": b"soon"}, 400, "BadExpirationDate"),
    (b"POST", f"/3/device/{TOKEN}", b"{}", {b"apns-push-type": b"fax"}, 400, "InvalidPushType"),
    (b"POST", "/nowhere", b"", {}, 404, "BadPath"),
])
def test_apple_reasons(worker: Worker, method: bytes, target: str, body: bytes,
                       headers: dict[bytes, bytes], status: int, why: str) -> None:
    answer = serve(worker, request(Recorder(), method, target.encode(), body, headers))
    assert (answer.status, reason(answer)) == (status, why)


def test_a_repeated_apns_header_is_duplicate_headers(worker: Worker) -> None:
    req = request(Recorder(), b"POST", f"/3/device/{TOKEN}".encode(), b"{}")
    req.add_header(b"apns-topic", b"a")
    req.add_header(b"apns-topic", b"b")
    assert reason(serve(worker, req)) == "DuplicateHeaders"


def test_an_unregistered_token_answers_410_with_its_timestamp(worker: Worker) -> None:
    worker.admin.apply({"op": "set_token", "token": TOKEN, "state": "unregistered",
                        "timestamp": 1700000000123})
    answer = serve(worker, request(Recorder(), b"POST", f"/3/device/{TOKEN}".encode(), b"{}"))
    assert answer.status == 410
    assert json.loads(answer.body) == {"reason": "Unregistered", "timestamp": 1700000000123}


def test_a_fault_rule_answers_instead_of_accepting(worker: Worker) -> None:
    worker.admin.apply({"op": "set_faults", "rules": ["100%:500:InternalServerError"]})
    answer = serve(worker, request(Recorder(), b"POST", f"/3/device/{TOKEN}".encode(), b"{}"))
    assert (answer.status, reason(answer)) == (500, "InternalServerError")
    assert not worker.registry.pending


def test_a_full_pending_store_answers_503_never_a_dropped_200() -> None:
    w = Worker(ServeConfig(keepalive=0, max_pending=1))
    try:
        first = serve(w, request(Recorder(), b"POST", b"/3/device/aa", b"{}"))
        second = serve(w, request(Recorder(), b"POST", b"/3/device/bb", b"{}"))
    finally:
        w.loop.close()
    assert first.status == 200
    assert (second.status, reason(second)) == (503, "ServiceUnavailable")
    assert second.headers[0][0] == b"apns-id"
    assert w.stats.queue_full == 1


def test_response_delay_answers_later() -> None:
    w = Worker(ServeConfig(keepalive=0, response_delay=parse_distribution("50ms", "x")))
    channel = Recorder()
    try:
        w.routes.handle(request(channel, b"POST", b"/3/device/aa", b"{}"))
        assert channel.answers == []
        deadline = time.monotonic() + 2
        while not channel.answers and time.monotonic() < deadline:
            w.loop.run_once()
    finally:
        w.loop.close()
    assert [a.status for a in channel.answers] == [200]


def test_events_turns_the_request_into_a_stream(worker: Worker) -> None:
    channel = Recorder()
    worker.routes.handle(request(channel, b"GET", f"/events?token={TOKEN.upper()}".encode()))
    assert channel.streams == [bytes.fromhex(TOKEN)]
    assert channel.answers == []


def test_pushes_and_devices_are_refused_on_the_operator_listener(worker: Worker) -> None:
    answer = serve(worker, request(Recorder(), b"POST", f"/3/device/{TOKEN}".encode(), b"{}",
                                   operator=True))
    assert (answer.status, reason(answer)) == (404, "BadPath")


def test_admin_routes_live_on_the_operator_listener_when_there_is_one() -> None:
    w = Worker(ServeConfig(keepalive=0, admin_listen=("127.0.0.1", 1)))
    try:
        public = serve(w, request(Recorder(), b"GET", b"/admin/faults"))
        operator = serve(w, request(Recorder(), b"GET", b"/admin/faults", operator=True))
        health = serve(w, request(Recorder(), b"GET", b"/healthz"))
    finally:
        w.loop.close()
    assert (public.status, reason(public)) == (404, "BadPath")
    assert operator.status == 200 and json.loads(operator.body) == {"faults": []}
    assert (health.status, health.body) == (200, b"ok\n")


def test_admin_changes_are_applied_and_answered(worker: Worker) -> None:
    answer = serve(worker, request(Recorder(), b"POST", b"/admin/faults", b'"5%:503"'))
    assert answer.status == 200
    assert worker.admin.faults[0].status == 503
    bad = serve(worker, request(Recorder(), b"PUT", f"/admin/tokens/{TOKEN}".encode(),
                                b'{"state": "asleep"}'))
    assert (bad.status, reason(bad)) == (400, "BadAdminRequest")


def test_broadcast_needs_a_body_and_counts_streams(worker: Worker) -> None:
    empty = serve(worker, request(Recorder(), b"POST", b"/broadcast"))
    assert (empty.status, reason(empty)) == (400, "PayloadEmpty")
    sent = serve(worker, request(Recorder(), b"POST", b"/broadcast", b'{"aps":{}}'))
    assert sent.status == 200
    assert {k: v for k, v in json.loads(sent.body).items() if k != "apns_id"} == \
        {"streams": 0, "refused": 0}


def test_stats_is_the_node_document(worker: Worker) -> None:
    answer = serve(worker, request(Recorder(), b"GET", b"/stats"))
    doc = json.loads(answer.body)
    assert answer.status == 200 and doc["node"]["streams"] == 0
    assert [w["worker"] for w in doc["workers"]] == [0]


def test_body_limit_is_apples_for_pushes(worker: Worker) -> None:
    routes: Routes = worker.routes
    voip = request(Recorder(), b"POST", b"/3/device/aa", headers={b"apns-push-type": b"voip"})
    assert routes.body_limit(request(Recorder(), b"POST", b"/3/device/aa")) == 4096
    assert routes.body_limit(voip) == 5120

