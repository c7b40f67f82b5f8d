"""The APNs wire contract, case by case, against a real ``rawsse serve`` (Apple, "Sending
notification requests to APNs" and "Handling notification responses from APNs")."""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
import uuid

import pytest

from wire import HTTPClient, Response, SSEReader, build_request, get_json, wait_for

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_tokens = itertools.count(1)


def new_token() -> str:
    """A distinct Fleet-style token per test: hex("token" + serial)."""
    return ("token" + f"{next(_tokens):06d}" + uuid.uuid4().hex[:6]).encode().hex()


def push(server, token: str, body: bytes = b'{"mdm":"magic"}', headers: dict | None = None,
         method: str = "POST") -> Response:
    client = HTTPClient(server.host, server.port)
    try:
        return client.request(method, f"/3/device/{token}", body, headers)
    finally:
        client.close()


def stats(server) -> dict:
    return get_json(server.host, server.admin_port, "/stats")["node"]


_open_readers: list[SSEReader] = []


@pytest.fixture(autouse=True)
def close_readers():
    yield
    while _open_readers:
        _open_readers.pop().close()


def device(server, token: str) -> SSEReader:
    reader = SSEReader(server.host, server.port, token)
    _open_readers.append(reader)
    assert reader.status == 200
    return reader


def assert_apns_error(response: Response, status: int, reason: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("apns-id"), "errors carry apns-id"
    body = response.json()
    assert body["reason"] == reason
    assert ("timestamp" in body) == (status == 410), "timestamp only on 410"


# -- success, apns-id -----------------------------------------------------------------------------

def test_push_to_connected_device_arrives_with_its_apns_id(server):
    token = new_token()
    reader = device(server, token)
    response = push(server, token, b'{"mdm":"pushmagic1"}')
    assert response.status == 200
    assert response.body == b""
    apns_id = response.headers["apns-id"]
    assert UUID_RE.match(apns_id), apns_id
    event = reader.next_event()
    assert event is not None
    assert (event.id, event.event, event.data) == (apns_id, "ping", '{"mdm":"pushmagic1"}')
    reader.close()


def test_supplied_apns_id_is_echoed_on_success_and_on_error(server):
    token = new_token()
    given = "4FCEA7C9-78CC-0A03-2902-3473E54F9ED4"
    assert push(server, token, headers={"apns-id": given}).headers["apns-id"] == given
    error = push(server, token, headers={"apns-id": given, "apns-push-type": "nope"})
    assert_apns_error(error, 400, "InvalidPushType")
    assert error.headers["apns-id"] == given


def test_malformed_apns_id_is_echoed_as_sent(server):
    """Clients match answers by apns-id (aioapns): a fresh one would leave them waiting."""
    response = push(server, new_token(), headers={"apns-id": "not-a-uuid"})
    assert_apns_error(response, 400, "BadMessageId")
    assert response.headers["apns-id"] == "not-a-uuid"


# -- every reason -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,headers,body,status,reason", [
    ("GET", "/3/device/abcd", {}, b"", 405, "MethodNotAllowed"),
    ("POST", "/3/device/ab/cd", {}, b"x", 404, "BadPath"),
    ("POST", "/3/device/", {}, b"x", 400, "MissingDeviceToken"),
    ("POST", "/3/device/zz", {}, b"x", 400, "BadDeviceToken"),
    ("POST", "/3/device/abc", {}, b"x", 400, "BadDeviceToken"),
    ("POST", "/3/device/abcd", {"apns-push-type": "fax"}, b"x", 400, "InvalidPushType"),
    ("POST", "/3/device/abcd", {"apns-expiration": "tomorrow"}, b"x", 400, "BadExpirationDate"),
    ("POST", "/3/device/abcd", {"apns-priority": "7"}, b"x", 400, "BadPriority"),
    ("POST", "/3/device/abcd", {"apns-collapse-id": "c" * 65}, b"x", 400, "BadCollapseId"),
    ("POST", "/3/device/abcd", {}, b"", 400, "PayloadEmpty"),
    ("POST", "/3/device/abcd", {}, b"x" * 4097, 413, "PayloadTooLarge"),
    ("POST", "/3/device/abcd", {"apns-push-type": "voip"}, b"x" * 5121, 413, "PayloadTooLarge"),
])
def test_apple_reasons(server, method, path, headers, body, status, reason):
    client = HTTPClient(server.host, server.port)
    response = client.request(method, path, body, headers)
    assert_apns_error(response, status, reason)
    client.close()


def test_repeated_apns_header_is_duplicate_headers(server):
    client = HTTPClient(server.host, server.port)
    client.send(b"POST /3/device/abcd HTTP/1.1\r\nHost: x\r\napns-topic: a\r\napns-topic: b\r\n"
                b"Content-Length: 1\r\n\r\nx")
    assert_apns_error(client.read_responses(1)[0], 400, "DuplicateHeaders")
    client.close()


def test_payload_limits_are_inclusive(server):
    assert push(server, new_token(), b"x" * 4096).status == 200
    assert push(server, new_token(), b"x" * 5120, {"apns-push-type": "voip"}).status == 200
    assert_apns_error(push(server, new_token(), b"x" * 5120), 413, "PayloadTooLarge")


def test_strict_tokens_require_32_bytes(start_server):
    srv = start_server("--strict-tokens")
    assert_apns_error(push(srv, "abcd"), 400, "BadDeviceToken")
    assert push(srv, "ab" * 32).status == 200


# -- simulated token states and faults ----------------------------------------------------------

def admin(server, method: str, path: str, body: dict | str | None = None) -> Response:
    client = HTTPClient(server.host, server.admin_port)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        return client.request(method, path, data)
    finally:
        client.close()


def test_unregistered_token_gets_410_with_millisecond_timestamp(server):
    token = new_token()
    assert admin(server, "PUT", f"/admin/tokens/{token}",
                 {"state": "unregistered", "timestamp": 1458114061260}).status == 200
    response = push(server, token)
    assert_apns_error(response, 410, "Unregistered")
    assert response.json()["timestamp"] == 1458114061260
    listed = admin(server, "GET", "/admin/tokens").json()["tokens"]
    assert {"token": token, "state": "unregistered", "timestamp": 1458114061260} in listed
    assert admin(server, "DELETE", f"/admin/tokens/{token}").status == 200
    assert push(server, token).status == 200


def test_bad_token_state_and_default_timestamp(server):
    bad, gone = new_token(), new_token()
    admin(server, "PUT", f"/admin/tokens/{bad}", {"state": "bad"})
    before = int(time.time() * 1000)
    admin(server, "PUT", f"/admin/tokens/{gone}", {"state": "expired"})
    assert_apns_error(push(server, bad), 400, "BadDeviceToken")
    response = push(server, gone)
    assert_apns_error(response, 410, "ExpiredToken")
    assert before <= response.json()["timestamp"] <= int(time.time() * 1000)
    admin(server, "DELETE", "/admin/tokens")


def test_bad_admin_requests_get_readable_errors(server):
    response = admin(server, "PUT", f"/admin/tokens/{new_token()}", {"state": "sleepy"})
    assert response.status == 400
    assert "state must be one of" in response.json()["detail"]
    response = admin(server, "POST", "/admin/faults", "150%:503")
    assert response.status == 400 and "between 0 and 100" in response.json()["detail"]


def test_fault_flag_answers_every_push(start_server):
    srv = start_server("--fault", "100%:429:TooManyRequests")
    for _ in range(3):
        assert_apns_error(push(srv, new_token()), 429, "TooManyRequests")
    assert stats(srv)["faulted"] == 3


def test_fault_rules_at_run_time_share_and_clear(server):
    assert admin(server, "POST", "/admin/faults", {"rule": "50%:503"}).status == 200
    assert admin(server, "GET", "/admin/faults").json()["faults"][0]["reason"] == "ServiceUnavailable"
    client = HTTPClient(server.host, server.port)
    client.send(b"".join(build_request("POST", f"/3/device/{new_token()}", b"x") for _ in range(400)))
    statuses = [r.status for r in client.read_responses(400)]
    client.close()
    failed = statuses.count(503)
    assert set(statuses) == {200, 503}
    assert 130 <= failed <= 270, failed  # binomial(400, 0.5): ±7 standard deviations
    assert admin(server, "DELETE", "/admin/faults").json() == {"faults": []}
    assert push(server, new_token()).status == 200


# -- store and forward --------------------------------------------------------------------------

def test_offline_push_is_delivered_on_connect(server):
    token = new_token()
    before = stats(server)
    response = push(server, token, b'{"mdm":"later"}')
    assert response.status == 200
    reader = device(server, token)
    event = reader.next_event()
    assert (event.id, event.data) == (response.headers["apns-id"], '{"mdm":"later"}')
    after = stats(server)
    assert after["stored"] - before["stored"] == 1
    assert after["delivered_on_connect"] - before["delivered_on_connect"] == 1
    reader.close()


def test_offline_pushes_coalesce_to_the_newest(server):
    token = new_token()
    before = stats(server)
    for n in (1, 2, 3):
        push(server, token, f'{{"mdm":"m{n}"}}'.encode())
    reader = device(server, token)
    assert reader.next_event().data == '{"mdm":"m3"}'
    assert reader.next_event(timeout=0.3) is None, "only the newest pending push is kept"
    after = stats(server)
    assert after["coalesced"] - before["coalesced"] == 2
    reader.close()


@pytest.mark.parametrize("expiration", ["0", "1"])
def test_deliver_now_or_discard(server, expiration):
    offline, online = new_token(), new_token()
    reader = device(server, online)
    before = stats(server)
    assert push(server, offline, headers={"apns-expiration": expiration}).status == 200
    assert push(server, online, b"now", headers={"apns-expiration": expiration}).status == 200
    assert reader.next_event().data == "now", "a connected device still gets it"
    late = device(server, offline)
    assert late.next_event(timeout=0.3) is None, "an offline device never does"
    assert stats(server)["discarded"] - before["discarded"] == 1
    reader.close()
    late.close()


def test_future_expiration_is_stored(server):
    token = new_token()
    push(server, token, b"kept", headers={"apns-expiration": str(int(time.time()) + 3600)})
    reader = device(server, token)
    assert reader.next_event().data == "kept"
    reader.close()


def test_pending_push_expires(start_server):
    srv = start_server("--default-ttl", "1s")
    token = new_token()
    push(srv, token, b"short-lived")
    time.sleep(1.3)
    reader = device(srv, token)
    assert reader.next_event(timeout=0.3) is None
    assert stats(srv)["expired"] == 1


def test_token_case_does_not_matter_live_or_stored(server):
    token = new_token()
    push(server, token.upper(), b"stored")
    reader = device(server, token.lower())
    assert reader.next_event().data == "stored"
    push(server, token.upper(), b"live")
    assert reader.next_event().data == "live"
    reader.close()


def test_multiline_payload_is_framed_safely(server):
    token = new_token()
    reader = device(server, token)
    push(server, token, b'{"mdm":"a\nb\r\nc\rd"}')
    push(server, token, b"next")
    assert reader.next_event().data == '{"mdm":"a\nb\nc\nd"}'
    assert reader.next_event().data == "next"
    reader.close()


# -- streams --------------------------------------------------------------------------------------

def test_stream_head_and_retry(server):
    reader = device(server, new_token())
    assert reader.head["content-type"] == "text/event-stream"
    assert reader.head["cache-control"] == "no-cache"
    assert reader.head["x-accel-buffering"] == "no"
    push(server, reader.token, b"x")
    reader.next_event()
    assert 2500 <= reader.retry <= 7500, "retry: 5000 ms jittered ±50%"
    reader.close()


@pytest.mark.parametrize("query,reason", [("", "MissingDeviceToken"), ("token=", "MissingDeviceToken"),
                                          ("token=xyz1", "BadDeviceToken"),
                                          ("token=abc", "BadDeviceToken")])
def test_events_token_is_validated_before_streaming(server, query, reason):
    client = HTTPClient(server.host, server.port)
    response = client.request("GET", f"/events?{query}")
    assert response.status == 400
    assert response.json() == {"reason": reason}
    client.close()


def test_newest_connection_wins(server):
    token = new_token()
    first = device(server, token)
    second = device(server, token)
    assert first.wait_closed(), "the older stream is closed"
    push(server, token, b"to-second")
    assert second.next_event().data == "to-second"
    assert wait_for(lambda: stats(server)["takeovers"] >= 1)
    second.close()


def test_keepalive_comments(start_server):
    srv = start_server("--keepalive", "0.3")
    reader = device(srv, new_token())
    assert reader.next_event(timeout=1.5) is None
    assert reader.comments.count("keepalive") >= 2
    push(srv, reader.token, b"after")
    assert reader.next_event().data == "after"
    reader.close()


def test_closed_device_is_forgotten_at_once(server):
    token = new_token()
    reader = device(server, token)
    reader.close()
    assert wait_for(lambda: push(server, token, b"x").status == 200 and stats(server)["pending"] >= 1)


def test_slow_reader_is_closed_and_the_push_it_held_goes_to_its_next_stream(start_server):
    """A stream whose unsent bytes would pass ``--stream-buffer`` is closed; the push that did
    not fit is taken back and goes to the device's next stream. Pushes go one at a time and stop
    at the close, so no later push can stand in for the one the stream held."""
    srv = start_server("--stream-buffer", "4096")
    token = new_token()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: the kernel fills up
    slow.connect((srv.host, srv.port))
    slow.sendall(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    client = HTTPClient(srv.host, srv.port)
    held_id = None
    # 4 KB a push: the kernel takes ~700 (2.8 MB, the server's send buffer autotuned towards
    # tcp_wmem's 4 MB default max) before the stream buffers one and closes on the next.
    for _ in range(2000):
        apns_id = str(uuid.uuid4())
        client.send(build_request("POST", f"/3/device/{token}", b"y" * 4000, {"apns-id": apns_id}))
        assert client.read_responses(1)[0].status == 200
        if stats(srv)["slow_reader_closes"]:
            held_id = apns_id
            break
    client.close()
    slow.close()
    assert held_id is not None, "the slow reader was never closed"
    assert stats(srv)["slow_reader_closes"] == 1
    reader = device(srv, token)
    event = reader.next_event(timeout=2.0)
    assert event is not None, "the push the slow stream held was lost"
    assert event.id == held_id, "the next stream got another push than the one the slow stream held"
    reader.close()


def test_broadcasts_to_a_stream_the_kernel_cannot_take_are_kept_whole_and_in_order(start_server):
    """A broadcast writes most streams in one loop (``Stream.send_to_all``); a stream whose
    socket takes only part of an event, or none, keeps the rest and writes it once the device
    reads: every event arrives whole, in order. 1,000 events of 4 KB pass what the kernel holds
    for a device that does not read (~700 of them, see the slow reader above)."""
    srv = start_server("--stream-buffer", str(16 * 1024 * 1024))
    token = new_token()
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # not read until the end
        slow.connect((srv.host, srv.port))
        slow.sendall(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        slow.settimeout(5.0)
        opened = b""
        while b"retry:" not in opened:  # the stream is held: the first broadcast reaches it
            opened += slow.recv(4096)
        client = HTTPClient(srv.host, srv.port)
        payload, ids = b"z" * 4000, [str(uuid.UUID(int=n)) for n in range(1000)]
        for apns_id in ids:
            client.send(build_request("POST", "/broadcast", payload, {"apns-id": apns_id}))
            assert client.read_responses(1)[0].json()["streams"] >= 1
        client.close()
        count = len(ids)
        event_size = len(b"id: %s\nevent: ping\ndata: %s\n\n" % (ids[0].encode(), payload))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)  # now read it quickly
        slow.settimeout(5.0)
        data = bytearray()
        deadline = time.monotonic() + 10
        while (first := data.find(b"id: ")) < 0 or len(data) - first < count * event_size:
            assert time.monotonic() < deadline, f"{data.count(b'id: ')} of {count} events"
            chunk = slow.recv(1 << 20)
            assert chunk, "the stream closed"
            data += chunk
    got = bytes(data[first:]).split(b"\n\n")
    assert got[-1] == b"" and len(got) == count + 1
    assert [e.split(b"\n")[0] for e in got[:-1]] == [b"id: %s" % i.encode() for i in ids]
    assert all(e.endswith(b"data: " + payload) for e in got[:-1])
    assert stats(srv)["slow_reader_closes"] == 0


# -- delays ---------------------------------------------------------------------------------------

def test_delivery_delay_and_per_push_override(start_server):
    srv = start_server("--delivery-delay", "400ms")
    token = new_token()
    reader = device(srv, token)
    start = time.monotonic()
    push(srv, token, b"delayed")
    assert reader.next_event().data == "delayed"
    assert time.monotonic() - start >= 0.38
    start = time.monotonic()
    push(srv, token, b"now", headers={"rawsse-delivery-delay": "0"})
    assert reader.next_event().data == "now"
    assert time.monotonic() - start < 0.3
    assert_apns_error(push(srv, token, headers={"rawsse-delivery-delay": "soon"}), 400, "BadDeliveryDelay")
    reader.close()


def test_response_delay_keeps_pipelined_order(start_server):
    srv = start_server("--response-delay", "uniform:10ms-200ms")
    client = HTTPClient(srv.host, srv.port)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    start = time.monotonic()
    client.send(b"".join(build_request("POST", f"/3/device/{new_token()}", b"x", {"apns-id": i})
                         for i in ids))
    responses = client.read_responses(20)
    assert [r.headers["apns-id"] for r in responses] == ids
    assert time.monotonic() - start >= 0.01
    client.close()


# -- back-pressure ----------------------------------------------------------------------------

def test_full_pending_store_answers_503_and_keeps_what_it_accepted(start_server):
    srv = start_server("--max-pending", "2", "--workers", "1")  # the limit is per worker
    tokens = [new_token() for _ in range(3)]
    assert [push(srv, t, t.encode()).status for t in tokens[:2]] == [200, 200]
    assert_apns_error(push(srv, tokens[2]), 503, "ServiceUnavailable")
    assert push(srv, tokens[0], b"newer").status == 200, "replacing a pending push needs no room"
    assert stats(srv)["queue_full"] == 1
    for token, expected in ((tokens[0], "newer"), (tokens[1], tokens[1])):
        reader = device(srv, token)
        assert reader.next_event().data == expected
        reader.close()


def test_full_delay_queue_answers_503(start_server):
    srv = start_server("--delivery-delay", "5s", "--max-delayed", "3", "--workers", "1")
    statuses = [push(srv, new_token()).status for _ in range(4)]
    assert statuses == [200, 200, 200, 503]


# -- broadcast, operator routes -----------------------------------------------------------------

def test_broadcast_reaches_every_stream_once_and_prefix_filters(server):
    readers = [device(server, "ab" + new_token()) for _ in range(3)] + [device(server, "cd" + new_token())]
    client = HTTPClient(server.host, server.port)
    response = client.request("POST", "/broadcast", b'{"all":1}')
    assert response.status == 200
    assert response.json()["streams"] >= 4
    for reader in readers:
        assert reader.next_event().data == '{"all":1}'
    response = client.request("POST", "/broadcast?prefix=AB", b"only-ab")
    assert response.json()["streams"] >= 3
    for reader in readers[:3]:
        assert reader.next_event().data == "only-ab"
    assert readers[3].next_event(timeout=0.3) is None
    client.close()
    for reader in readers:
        reader.close()


def test_operator_routes_on_their_own_listener(start_server):
    srv = start_server()
    public = HTTPClient(srv.host, srv.port)
    assert public.request("GET", "/healthz").status == 200
    assert public.request("GET", "/stats").status == 404
    assert public.request("GET", "/admin/faults").status == 404
    operator = HTTPClient(srv.host, srv.admin_port)
    assert operator.request("GET", "/stats").json()["node"]["connections"] >= 1
    assert operator.request("POST", "/3/device/abcd", b"x").status == 404
    public.close()
    operator.close()


def test_metrics_are_prometheus_text(server):
    push(server, new_token())
    client = HTTPClient(server.host, server.admin_port)
    response = client.request("GET", "/metrics")
    client.close()
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.body.decode()
    assert "# TYPE rawsse_pushes_total counter" in text
    def node_total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern + r' (\S+)$', text, re.M))

    assert node_total(r'^rawsse_pushes_total\{outcome="stored",worker="\d+"\}') >= 1
    assert node_total(r'^rawsse_connections\{kind="http",worker="\d+"\}') >= 1
    assert re.search(r'^rawsse_workers 2$', text, re.M)
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? \S+$", line), line
