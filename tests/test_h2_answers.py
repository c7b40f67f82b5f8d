"""Answer headers over HTTP/1.1 and HTTP/2 alike: ``apns-id`` echoes what was sent even when it
is not a UUID (aioapns matches answers by it, and hung on a fresh one), and
``--environment development`` adds ``apns-unique-id`` to a 200 as Apple's sandbox does."""

from __future__ import annotations

import re
import struct
from typing import Iterator

import hpack
import pytest
from conftest import launch

from rawsse.h2 import frames as f
from test_h2_hostile import RawH2, frame
from test_h2_server import H2Client
from test_push_api import new_token
from wire import HTTPClient, Response

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def send(server, protocol: str, method: str, path: str, body: bytes = b"",
         headers: dict | None = None) -> Response:
    client = (H2Client if protocol == "h2" else HTTPClient)(server.host, server.port)
    try:
        return client.request(method, path, body, headers)
    finally:
        client.close()


@pytest.fixture(scope="module")
def development() -> Iterator:
    srv, holders = launch("--environment", "development", "--workers", "1")
    yield srv
    srv.stop()
    for holder in holders:
        holder.close()


@pytest.mark.parametrize("protocol", ["http1", "h2"])
@pytest.mark.parametrize("sent", ["not-a-uuid", "4FCEA7C978CC0A0329023473E54F9ED4", "x" * 200])
def test_bad_apns_id_is_echoed_as_sent(server, protocol, sent):
    response = send(server, protocol, "POST", f"/3/device/{new_token()}", b"{}", {"apns-id": sent})
    assert response.status == 400 and response.json()["reason"] == "BadMessageId"
    assert response.headers["apns-id"] == sent


@pytest.mark.parametrize("protocol", ["http1", "h2"])
@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/3/device/{token}", b"", 405),
    ("POST", "/3/device/{token}/extra", b"{}", 404),
    ("POST", "/3/device/{token}", b"x" * 6000, 413),
])
def test_every_push_error_echoes_the_apns_id_sent(server, protocol, method, path, body, status):
    sent = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    response = send(server, protocol, method, path.format(token=new_token()), body,
                    {"apns-id": sent})
    assert response.status == status
    assert response.headers["apns-id"] == sent


@pytest.mark.parametrize("protocol", ["http1", "h2"])
def test_development_200_carries_apns_unique_id(development, protocol):
    response = send(development, protocol, "POST", f"/3/device/{new_token()}", b"{}")
    assert response.status == 200
    unique = response.headers["apns-unique-id"]
    assert UUID_RE.match(unique) and unique != response.headers["apns-id"]
    error = send(development, protocol, "POST", f"/3/device/{new_token()}", b"")
    assert error.status == 400 and "apns-unique-id" not in error.headers


@pytest.mark.parametrize("protocol", ["http1", "h2"])
def test_production_200_has_no_apns_unique_id(server, protocol):
    response = send(server, protocol, "POST", f"/3/device/{new_token()}", b"{}")
    assert response.status == 200 and "apns-unique-id" not in response.headers


def test_apns_id_with_a_line_break_is_a_malformed_http2_request(server):
    """RFC 9113 §8.2.1: CR, LF or NUL in a field value make the request malformed (a stream
    error); it is not echoed back into an answer."""
    conn = RawH2(server)
    try:
        block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"),
                                        (":path", f"/3/device/{new_token()}"),
                                        ("apns-id", "a\r\nb")])
        conn.send(frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, block))
        frames_ = conn.frames(timeout=1)
    finally:
        conn.close()
    resets = [p for t, _, s, p in frames_ if t == f.RST_STREAM and s == 1]
    assert resets and struct.unpack(">L", resets[0])[0] == f.PROTOCOL_ERROR
    assert not any(t == f.HEADERS for t, _, _, _ in frames_)
