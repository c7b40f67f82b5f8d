"""``Upgrade: h2c`` is ignored (RFC 9110 §7.8; RFC 9113 §3.1 deprecates it): the request is
served as HTTP/1.1 with its body, answered once, and what follows is HTTP/1.1 again.

httptools tells llhttp to skip the body of an Upgrade request (those bytes would belong to the
new protocol), so before the fix ``curl --http2 -d …`` got ``400 PayloadEmpty`` and its body was
then parsed as a second request."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from test_http import FEEDS, connect, feed, read_responses
from test_push_api import device, new_token
from wire import get_json

UPGRADE_HEADERS = (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")


def upgrade_push(token: str, body: bytes, apns_id: str) -> bytes:
    return (f"POST /3/device/{token} HTTP/1.1\r\nHost: rawsse\r\napns-id: {apns_id}\r\n".encode()
            + UPGRADE_HEADERS + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def node(server) -> dict:
    return get_json(server.host, server.admin_port, "/stats")["node"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_http2_post_is_served_as_http11_with_its_body(server):
    """curl offers the upgrade on http:// URLs (--http2): one 200, one delivery, no 400."""
    token = new_token()
    reader = device(server, token)
    before = node(server)
    out = subprocess.run(
        ["curl", "-s", "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
         "-H", "apns-id: 11111111-2222-3333-4444-555555555555",
         "-d", '{"aps":{}}', f"{server.url}/3/device/{token}"],
        capture_output=True, text=True, timeout=10)
    assert out.stdout == "200 1.1", out
    event = reader.next_event(timeout=3)
    assert event is not None and event.id == "11111111-2222-3333-4444-555555555555"
    assert event.data == '{"aps":{}}'
    after = node(server)
    assert after["bad_requests"] == before["bad_requests"]
    assert after["pushes_received"] == before["pushes_received"] + 1


@pytest.mark.parametrize("mode", ["whole", "slices10", "bytewise"])
def test_upgrade_body_split_over_reads_then_a_pipelined_request(server, mode):
    """The body arrives in pieces after the head; the pipelined request after it is HTTP/1.1."""
    assert FEEDS[mode] != 0
    token = new_token()
    reader = device(server, token)
    body = b'{"aps":{"alert":"split"}}'
    apns_id = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    pipelined = f"POST /3/device/{token} HTTP/1.1\r\nHost: rawsse\r\nContent-Length: 2\r\n\r\n{{}}"
    before = node(server)
    sock = connect(server)
    try:
        feed(sock, upgrade_push(token, body, apns_id) + pipelined.encode(), mode)
        responses = read_responses(sock, 2)
    finally:
        sock.close()
    assert [r.status for r in responses] == [200, 200]
    assert responses[0].headers["apns-id"] == apns_id
    events = [reader.next_event(timeout=3), reader.next_event(timeout=3)]
    assert [e.data for e in events if e] == [body.decode(), "{}"]
    assert node(server)["bad_requests"] == before["bad_requests"]


def test_upgrade_with_connection_close_is_the_last_request(server):
    token = new_token()
    head = (f"POST /3/device/{token} HTTP/1.1\r\nHost: rawsse\r\nConnection: close, Upgrade\r\n"
            f"Upgrade: h2c\r\nContent-Length: 2\r\n\r\n{{}}GET /healthz HTTP/1.1\r\n\r\n")
    sock = connect(server)
    try:
        sock.sendall(head.encode())
        responses = read_responses(sock, 1)
        assert sock.recv(100) == b"", "closed after the one answer"
    finally:
        sock.close()
    assert [r.status for r in responses] == [200]


def test_upgrade_with_a_chunked_body_is_refused_clearly(server):
    head = (f"POST /3/device/{new_token()} HTTP/1.1\r\nHost: rawsse\r\n".encode()
            + UPGRADE_HEADERS + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    sock = connect(server)
    try:
        sock.sendall(head)
        (response,) = read_responses(sock, 1)
    finally:
        sock.close()
    assert response.status == 400 and response.json()["reason"] == "BadRequest"


def test_upgrade_body_over_apples_limit_gets_413_and_is_not_parsed_as_a_request(server):
    body = b"x" * 5000
    sock = connect(server)
    try:
        feed(sock, upgrade_push(new_token(), body, "aaaaaaaa-bbbb-cccc-dddd-000000000001")
             + b"GET /healthz HTTP/1.1\r\nHost: rawsse\r\n\r\n", "whole")
        responses = read_responses(sock, 2)
    finally:
        sock.close()
    assert [r.status for r in responses] == [413, 200]
    assert responses[0].json()["reason"] == "PayloadTooLarge"
