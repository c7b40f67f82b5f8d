"""Fleet compatibility: its push clients (fleetdm/fleet ``server/mdm/nanomdm/push/``) and its
device client (``pkg/mdm/apnsmock/client.go``).

The sender sends byte for byte what Fleet's push client sends through Go's net/http
(``wire.fleet_push_request``): HTTP/1.1 keep-alive, 5 workers each with its own connection and one
request in flight (Go's Transport does not pipeline), ``Content-Type: application/json``, the body
``{"mdm":"<PushMagic>"}`` built by concatenation, no apns-* headers (buford) or only
``Apns-Expiration`` (nanopush). The devices parse exactly as Fleet's ``apnsmock`` client does
(``wire.SSEReader``): any line that is not blank, a comment, ``data:``, ``event:``, ``id:`` or
``retry:`` is a protocol error and a line over 8192 bytes too, so a framing slip fails the test.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import launch
from wire import (HTTPClient, Response, SSEReader, build_request, fleet_push_request, get_json,
                  parse_responses)

FLEET_WORKERS = 5  # nanopush and buford both default to 5 workers
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def server():
    """Keepalive comments every 0.2 s, so they interleave with the pushes on every stream."""
    srv, holders = launch("--keepalive", "0.2")
    yield srv
    srv.stop()
    for holder in holders:
        holder.close()


def fleet_device(name: str) -> tuple[str, str]:
    """mdmtest's scheme: token = hex("token" + serial), PushMagic = "pushmagic" + serial."""
    serial = f"{name}{uuid.uuid4().hex[:8]}"
    return ("token" + serial).encode().hex(), "pushmagic" + serial


# -- Fleet's push client ----------------------------------------------------------------------

Job = tuple[str, str, "int | None"]  # token, PushMagic, apns-expiration (None: header omitted)


def fleet_send(server, jobs: list[Job]) -> list[tuple[Job, Response]]:
    """Send ``jobs`` from ``FLEET_WORKERS`` threads, each on its own keep-alive connection."""
    work: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        work.put(job)
    results: list[tuple[Job, Response]] = []
    lock = threading.Lock()

    def worker() -> None:
        client = HTTPClient(server.host, server.port)
        try:
            while True:
                try:
                    job = work.get_nowait()
                except queue.Empty:
                    return
                client.send(fleet_push_request(*job))
                (response,) = client.read_responses(1)
                with lock:
                    results.append((job, response))
        finally:
            client.close()

    with ThreadPoolExecutor(FLEET_WORKERS) as pool:
        for future in [pool.submit(worker) for _ in range(FLEET_WORKERS)]:
            future.result()
    return results


def expiration_for(variant: str) -> int | None:
    return int(time.time()) + 3600 if variant == "apns-expiration" else None


def assert_accepted(response: Response) -> str:
    """What nanopush treats as success: status 200; the id comes from the apns-id header."""
    assert response.status == 200, response
    assert response.body == b"", response
    assert UUID_RE.match(response.headers.get("apns-id", "")), response
    return response.headers["apns-id"]


def read_devices(readers: list[SSEReader], seconds: float) -> list[list]:
    """Every reader reads for ``seconds`` in its own thread; a ProtocolError is re-raised."""
    with ThreadPoolExecutor(len(readers)) as pool:
        futures = [pool.submit(reader.events_for, seconds) for reader in readers]
        return [future.result() for future in futures]


# -- delivery ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["no-apns-headers", "apns-expiration"])
def test_live_devices_get_each_of_their_pushes_exactly_once(server, variant):
    devices = [fleet_device(f"LIVE{i:03d}") for i in range(40)]
    jobs = [(token, f"{magic}-{k}", expiration_for(variant))
            for token, magic in devices for k in range(3)]
    readers = [SSEReader(server.host, server.port, token) for token, _ in devices]
    try:
        assert all(r.status == 200 for r in readers)
        with ThreadPoolExecutor(1) as background:
            sent = background.submit(fleet_send, server, jobs)
            received = read_devices(readers, 2.0)
            results = sent.result()
    finally:
        for reader in readers:
            reader.close()

    ids_by_token: dict[str, set[str]] = {}
    for (token, _magic, _exp), response in results:
        ids_by_token.setdefault(token, set()).add(assert_accepted(response))
    assert len(results) == len(jobs)
    for (token, magic), reader, events in zip(devices, readers, received):
        expected = sorted(json.dumps({"mdm": f"{magic}-{k}"}, separators=(",", ":"))
                          for k in range(3))
        assert sorted(e.data for e in events) == expected, token
        assert {e.id for e in events} == ids_by_token[token]
        assert all(e.event == "ping" for e in events)
        assert "keepalive" in reader.comments, "keepalive comments interleave with the pushes"


@pytest.mark.parametrize("variant", ["no-apns-headers", "apns-expiration"])
def test_push_first_connect_later_delivers_each_magic_once(server, variant):
    devices = [fleet_device(f"LATER{i:03d}") for i in range(30)]
    jobs = [(token, magic, expiration_for(variant)) for token, magic in devices]
    results = fleet_send(server, jobs)
    id_for = {job[0]: assert_accepted(response) for job, response in results}

    readers = [SSEReader(server.host, server.port, token) for token, _ in devices]
    try:
        received = read_devices(readers, 1.0)
    finally:
        for reader in readers:
            reader.close()
    for (token, magic), events in zip(devices, received):
        assert [(e.id, e.data) for e in events] == [(id_for[token], '{"mdm":"%s"}' % magic)]


# -- error bodies: nanopush JSON-decodes every non-200 body (nanopush/provider.go) ---------------

def raw_answer(server, data: bytes) -> Response:
    client = HTTPClient(server.host, server.port)
    try:
        client.send(data)
        responses = client.read_responses(1)
        assert responses, "no response"
        return responses[0]
    finally:
        client.close()


def assert_fleet_decodes_error(response: Response, status: int, reason: str) -> dict:
    """nanopush: status != 200 → JSON-decode the body into {Reason, Timestamp}; a body that is
    not JSON is a decode error instead of an APNs reason (the buford e2e test asserts this)."""
    assert response.status == status, response
    assert "application/json" in response.headers.get("content-type", ""), response
    body = json.loads(response.body)
    assert body["reason"] == reason
    assert ("timestamp" in body) == (status == 410), body
    return body


HEX = "746f6b656e464c454554"  # hex("tokenFLEET")

ERROR_CASES = {
    "not-hex-token": (fleet_push_request("not-hex-token", "pushmagicX"), 400, "BadDeviceToken"),
    "odd-length-token": (fleet_push_request("abc", "pushmagicX"), 400, "BadDeviceToken"),
    "magic-4096-x": (fleet_push_request(HEX, "x" * 4096), 413, "PayloadTooLarge"),
    "empty-token": (fleet_push_request("", "pushmagicX"), 400, "MissingDeviceToken"),
    "empty-body": (build_request("POST", f"/3/device/{HEX}"), 400, "PayloadEmpty"),
    "wrong-method": (build_request("GET", f"/3/device/{HEX}"), 405, "MethodNotAllowed"),
    "wrong-path": (build_request("POST", "/4/device/" + HEX, b'{"mdm":"x"}'), 404, "BadPath"),
    "bad-expiration": (fleet_push_request(HEX, "m").replace(b"Accept-Encoding",
                            b"Apns-Expiration: soon\r\nAccept-Encoding"), 400, "BadExpirationDate"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_every_push_error_is_json_with_a_reason_and_an_apns_id(server, case):
    data, status, reason = ERROR_CASES[case]
    response = raw_answer(server, data)
    assert_fleet_decodes_error(response, status, reason)
    if reason != "BadPath":
        assert UUID_RE.match(response.headers.get("apns-id", "")), response


@pytest.mark.parametrize("data", [
    b"GET /healthz HTTP/1.1\r\nHost rawsse\r\n\r\n",
], ids=["malformed-http"])  # the HTTP/2 preface is served as HTTP/2 now (tests/test_h2_*.py)
def test_protocol_errors_are_json_too(server, data):
    client = HTTPClient(server.host, server.port)
    try:
        client.send(data)
        raw = b""
        while chunk := client.sock.recv(65536):
            raw += chunk
    finally:
        client.close()
    (response,) = parse_responses(raw)
    assert response.status in (400, 505)
    assert isinstance(json.loads(response.body)["reason"], str)


def test_unregistered_token_gets_410_with_a_millisecond_timestamp(server):
    token, magic = fleet_device("GONE")
    admin = HTTPClient(server.host, server.admin_port)
    try:
        body = json.dumps({"state": "unregistered"}).encode()
        assert admin.request("PUT", f"/admin/tokens/{token}", body).status == 200
        response = raw_answer(server, fleet_push_request(token, magic))
    finally:
        admin.request("DELETE", f"/admin/tokens/{token}")
        admin.close()
    body = assert_fleet_decodes_error(response, 410, "Unregistered")
    assert isinstance(body["timestamp"], int)
    assert abs(body["timestamp"] - time.time() * 1000) < 60_000


def test_connection_stays_usable_after_an_error(server):
    """Go's Transport reuses the connection after a 4xx with a body: the next push must work."""
    token, magic = fleet_device("REUSE")
    client = HTTPClient(server.host, server.port)
    try:
        client.send(fleet_push_request(token, "x" * 4096))
        (too_large,) = client.read_responses(1)
        client.send(fleet_push_request(token, magic))
        (accepted,) = client.read_responses(1)
    finally:
        client.close()
    assert_fleet_decodes_error(too_large, 413, "PayloadTooLarge")
    assert_accepted(accepted)
    stats = get_json(server.host, server.admin_port, "/stats")["node"]
    assert stats["rejections"].get("413 PayloadTooLarge", 0) >= 1


# -- broadcasts reach Fleet devices as pushes ---------------------------------------------------

def test_broadcast_fits_fleets_line_limit_or_is_refused_as_json(server):
    """Fleet's client drops a stream on any line over 8192 bytes (``apnsmock/client.go``). A
    broadcast is a push to every device, so Apple's payload limit and apns-id rule apply: the
    largest broadcast is delivered intact, a larger one or a runaway apns-id is refused before any
    device sees it."""
    token, _ = fleet_device("BCAST")
    reader = SSEReader(server.host, server.port, token)
    client = HTTPClient(server.host, server.port)
    try:
        too_large = client.request("POST", "/broadcast", b"y" * 4097)
        long_id = client.request("POST", "/broadcast", b"z", {"apns-id": "a" * 9000})
        largest = client.request("POST", "/broadcast", b"x" * 4096)
        events = reader.events_for(0.5)
    finally:
        client.close()
        reader.close()
    assert_fleet_decodes_error(too_large, 413, "PayloadTooLarge")
    assert_fleet_decodes_error(long_id, 400, "BadMessageId")
    assert largest.status == 200 and largest.json()["streams"] >= 1
    assert [e.data for e in events] == ["x" * 4096]
