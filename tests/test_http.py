"""HTTP/1.1 done right on a raw socket (RFC 9112; nodejs/llhttp ``src/llhttp/http.ts``, the parser).

Every malformed request is fed whole, one byte per TCP segment and in 10-byte segments (h11's
tiny-chunk tests): the server must answer each with a JSON 4xx (505 for HTTP/2) and a close, in
every feeding mode, and stay healthy. Valid requests must survive the same slicing. Then
pipelining, ``Expect: 100-continue``, the header cap, slowloris and idle timeouts, HTTP/1.0,
``Connection: close``, the connection cap and half-closing clients.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid

import pytest

from conftest import launch
from wire import HTTPClient, Response, SSEReader, get_json, parse_responses

FEEDS = {"whole": None, "bytewise": 1, "slices10": 10}
# With TCP_NODELAY each send leaves as its own segment; the pause lets the server read it alone.
PIECE_PAUSE = 0.001

_serial = iter(range(1, 1_000_000))


def new_token() -> str:
    return ("http" + f"{next(_serial):06d}" + uuid.uuid4().hex[:6]).encode().hex()


# -- raw socket helpers ---------------------------------------------------------------------------

def connect(server, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def feed(sock: socket.socket, data: bytes, mode: str) -> None:
    """Send ``data`` whole or in pieces. A server that has already answered and closed may refuse
    the rest; a real client only notices on its next read, so neither do we."""
    step = FEEDS[mode] or len(data)
    for start in range(0, len(data), step):
        try:
            sock.sendall(data[start:start + step])
        except (BrokenPipeError, ConnectionResetError):
            return
        if step < len(data):
            time.sleep(PIECE_PAUSE)


def read_to_close(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (bytes, closed within ``timeout``)."""
    data = b""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    """Bytes up to and including ``marker``; fails on close or timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout}s; got {data!r}"
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}; got {data!r}"
        data += chunk
    return data


def read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list[Response]:
    data = b""
    deadline = time.monotonic() + timeout
    while len(responses := parse_responses(data)) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(responses)} of {count} responses within {timeout}s"
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(responses)} of {count} responses"
        data += chunk
    return responses


def is_open(sock: socket.socket, wait: float = 0.1) -> bool:
    """True if the server neither closed nor sent anything within ``wait``."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except ConnectionResetError:
        return False


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: rawsse"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def push_request(token: str, body: bytes = b'{"mdm":"magic"}', apns_id: str | None = None) -> bytes:
    return request("POST", f"/3/device/{token}", body, {"apns-id": apns_id} if apns_id else None)


HEALTHZ = request("GET", "/healthz")


def bad_requests(server) -> int:
    return get_json(server.host, server.admin_port, "/stats")["node"]["bad_requests"]


def assert_healthy(server) -> None:
    """A new connection is served, and nothing so far raised inside the server."""
    client = HTTPClient(server.host, server.port)
    try:
        assert client.request("GET", "/healthz").status == 200
    finally:
        client.close()
    assert "Traceback" not in server.output()


def assert_json_error(response: Response, status: int, reason: str | None = None) -> dict:
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json", response
    body = json.loads(response.body)
    assert isinstance(body.get("reason"), str) and body["reason"], body
    if reason is not None:
        assert body["reason"] == reason, body
    return body


# -- malformed requests ---------------------------------------------------------------------------

# name -> (bytes, status). Each one is refused by llhttp (nodejs/llhttp ``src/llhttp/http.ts``,
# through httptools) or by rawsse itself (h2).
MALFORMED = {
    "bad-method-byte": (b"G\x01T /healthz HTTP/1.1\r\nHost: rawsse\r\n\r\n", 400),
    "bad-version": (b"GET /healthz HTTX/1.1\r\nHost: rawsse\r\n\r\n", 400),
    "request-line-junk": (b"GET /healthz HTTP/1.1 extra\r\nHost: rawsse\r\n\r\n", 400),
    "header-without-colon": (b"GET /healthz HTTP/1.1\r\nHost rawsse\r\n\r\n", 400),
    # RFC 9112 §5.1: whitespace between a field name and the colon MUST be rejected with 400.
    "space-before-colon": (b"GET /healthz HTTP/1.1\r\nHost : rawsse\r\n\r\n", 400),
    # RFC 9112 §5.2: obs-fold outside message/http MUST be rejected (or replaced) by a server.
    "obs-fold": (b"GET /healthz HTTP/1.1\r\nHost: rawsse\r\nX-A: b\r\n  c\r\n\r\n", 400),
    "lf-only-lines": (b"GET /healthz HTTP/1.1\nHost: rawsse\n\n", 400),
    # RFC 9112 §2.2: a bare CR is invalid outside the body.
    "bare-cr-in-value": (b"GET /healthz HTTP/1.1\r\nHost: rawsse\r\nX-A: b\rc\r\n\r\n", 400),
    # RFC 9112 §6.1: TE and CL together is a smuggling signal; rejected, then closed.
    "te-and-cl": (b"POST /3/device/aabb HTTP/1.1\r\nHost: rawsse\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    # RFC 9112 §6.3 (5): differing or repeated Content-Length is unrecoverable.
    "duplicate-content-length": (b"POST /3/device/aabb HTTP/1.1\r\nHost: rawsse\r\n"
                                 b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "bad-content-length": (b"POST /3/device/aabb HTTP/1.1\r\nHost: rawsse\r\n"
                           b"Content-Length: 3x\r\n\r\nabc", 400),
    "negative-content-length": (b"POST /3/device/aabb HTTP/1.1\r\nHost: rawsse\r\n"
                                b"Content-Length: -3\r\n\r\nabc", 400),
    # RFC 9112 §6.3 (4): a request whose last transfer coding is not chunked has no knowable
    # length: 400 and close.
    "chunked-not-last": (b"POST /3/device/aabb HTTP/1.1\r\nHost: rawsse\r\n"
                         b"Transfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    "nul-in-header-name": (b"GET /healthz HTTP/1.1\r\nHost: rawsse\r\nX-\x00: b\r\n\r\n", 400),
    "invalid-chunk-size": (b"POST /3/device/aabb HTTP/1.1\r\nHost: rawsse\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    # A TLS ClientHello sent to the plain-text port (a sender configured with https://).
    "binary-junk": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(48)), 400),
}


@pytest.mark.parametrize("mode", FEEDS)
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_gets_json_error_and_close(server, case, mode):
    data, status = MALFORMED[case]
    before = bad_requests(server)
    sock = connect(server)
    try:
        feed(sock, data, mode)
        raw, closed = read_to_close(sock)
    finally:
        sock.close()
    responses = parse_responses(raw)
    assert len(responses) == 1, raw
    assert_json_error(responses[0], status)
    assert responses[0].headers.get("connection") == "close", responses[0]
    assert closed, "the server must close after a malformed request"
    assert_healthy(server)
    assert bad_requests(server) == before + 1


# -- valid requests in pieces ---------------------------------------------------------------------

def chunked_push(token: str, pieces: list[bytes]) -> bytes:
    """A push whose body is chunked and ends with a trailer field (RFC 9112 §7.1.2)."""
    head = (f"POST /3/device/{token} HTTP/1.1\r\nHost: rawsse\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return head + chunks + b"0\r\nX-Trailer: done\r\n\r\n"


@pytest.mark.parametrize("mode", FEEDS)
def test_valid_requests_in_pieces_are_served_on_one_connection(server, mode):
    token = new_token()
    reader = SSEReader(server.host, server.port, token)
    sock = connect(server)
    try:
        feed(sock, HEALTHZ, mode)
        (health,) = read_responses(sock, 1)
        assert (health.status, health.body) == (200, b"ok\n")

        plain_id = str(uuid.uuid4())
        feed(sock, push_request(token, b'{"mdm":"plain"}', plain_id), mode)
        (plain,) = read_responses(sock, 1)
        assert (plain.status, plain.headers["apns-id"]) == (200, plain_id)

        feed(sock, chunked_push(token, [b'{"mdm":', b'"chun', b'ked"}']), mode)
        (chunked,) = read_responses(sock, 1)
        assert chunked.status == 200, chunked
        assert is_open(sock), "keep-alive connection closed after valid requests"
    finally:
        sock.close()
    first, second = reader.next_event(), reader.next_event()
    reader.close()
    assert (first.id, first.data) == (plain_id, '{"mdm":"plain"}')
    assert (second.id, second.data) == (chunked.headers["apns-id"], '{"mdm":"chunked"}')


# -- pipelining (RFC 9112 §9.3.2: responses in request order) -------------------------------------

def test_hundred_pipelined_pushes_mixed_with_healthz_are_answered_in_order(server):
    ids = [str(uuid.uuid4()) for _ in range(100)]
    batch = b""
    expected: list[str] = []
    for i, apns_id in enumerate(ids):
        batch += push_request(new_token(), b'{"mdm":"pipelined%d"}' % i, apns_id)
        expected.append(apns_id)
        if i % 10 == 9:
            batch += HEALTHZ
            expected.append("healthz")
    sock = connect(server)
    try:
        sock.sendall(batch)
        responses = read_responses(sock, len(expected))
        assert is_open(sock)
    finally:
        sock.close()
    got = ["healthz" if r.body == b"ok\n" else r.headers.get("apns-id") for r in responses]
    assert got == expected
    assert all(r.status == 200 for r in responses)


def test_pipelined_events_after_two_pushes_becomes_a_stream_after_both_answers(server):
    token = new_token()
    first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
    sock = connect(server)
    try:
        sock.sendall(push_request(token, b'{"mdm":"first"}', first_id)
                     + push_request(token, b'{"mdm":"second"}', second_id)
                     + request("GET", f"/events?token={token}"))
        raw = read_until(sock, b'second"}\n\n')
    finally:
        sock.close()
    stream_at = raw.index(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream")
    answers = parse_responses(raw[:stream_at])
    assert [(r.status, r.headers["apns-id"]) for r in answers] == [(200, first_id),
                                                                   (200, second_id)]
    events = raw[stream_at:].split(b"\r\n\r\n", 1)[1]
    # Both pushes waited for the device; the newest one wins (APNs coalescing: Apple, "Sending
    # notification requests to APNs").
    assert b"id: %s\nevent: ping\ndata: {\"mdm\":\"second\"}\n\n" % second_id.encode() in events
    assert b"first" not in events


def test_bytes_pipelined_after_events_are_not_parsed_as_requests(server):
    """Once ``GET /events`` is answered the connection is a stream: what the device sends after
    it is read and dropped, never served (a push there would be answered into the stream)."""
    token = new_token()
    before = get_json(server.host, server.admin_port, "/stats")["node"]
    sock = connect(server)
    try:
        sock.sendall(request("GET", f"/events?token={token}") + push_request(new_token()) + HEALTHZ)
        raw = read_until(sock, b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream")
        raw += read_to_close(sock, timeout=0.5)[0]
    finally:
        sock.close()
    assert b"HTTP/1.1" not in raw.split(b"\r\n\r\n", 1)[1], raw
    after = get_json(server.host, server.admin_port, "/stats")["node"]
    assert after["pushes_received"] == before["pushes_received"]
    assert after["bad_requests"] == before["bad_requests"]
    assert_healthy(server)


UPGRADE_H2C = (b"GET /healthz HTTP/1.1\r\nHost: rawsse\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")


@pytest.mark.parametrize("mode", ["whole", "slices10"])
@pytest.mark.parametrize("after, statuses", [
    (HEALTHZ, [200, 200]),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [200, 505]),
    (b"\x00\x01junk\r\n\r\n", [200, 400]),
], ids=["then-healthz", "then-h2-preface", "then-junk"])
def test_upgrade_is_ignored_and_what_follows_is_parsed_as_http11(server, mode, after, statuses):
    """RFC 9110 §7.8: a server may ignore Upgrade. The request is answered over HTTP/1.1 and the
    bytes after it are HTTP/1.1 again, with the same error handling as any other request."""
    sock = connect(server)
    try:
        feed(sock, UPGRADE_H2C + after, mode)
        responses = read_responses(sock, len(statuses))
    finally:
        sock.close()
    assert [r.status for r in responses] == statuses
    assert_healthy(server)


# -- Expect: 100-continue (RFC 9110 §10.1.1) ------------------------------------------------------

def test_expect_continue_gets_interim_100_before_the_body(server):
    token = new_token()
    body = b'{"mdm":"continued"}'
    head = (f"POST /3/device/{token} HTTP/1.1\r\nHost: rawsse\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = connect(server)
    try:
        sock.sendall(head)
        interim = read_until(sock, b"\r\n\r\n", timeout=2.0)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        (final,) = read_responses(sock, 1)
    finally:
        sock.close()
    assert final.status == 200 and final.headers["apns-id"]


def test_expect_continue_with_oversized_length_gets_413_without_the_body(server):
    head = (f"POST /3/device/{new_token()} HTTP/1.1\r\nHost: rawsse\r\nExpect: 100-continue\r\n"
            "Content-Length: 5000\r\n\r\n").encode()
    sock = connect(server)
    try:
        sock.sendall(head)
        raw, closed = read_to_close(sock, timeout=2.0)
    finally:
        sock.close()
    assert not raw.startswith(b"HTTP/1.1 100"), raw
    (response,) = parse_responses(raw)
    assert_json_error(response, 413, "PayloadTooLarge")
    assert closed


def test_expect_continue_is_ignored_on_http10(server):
    """RFC 9110 §10.1.1: an HTTP/1.0 client knows no interim responses; the expectation is
    ignored and only the final response is sent."""
    body = b'{"mdm":"old"}'
    head = (f"POST /3/device/{new_token()} HTTP/1.0\r\nHost: rawsse\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = connect(server)
    try:
        sock.sendall(head + body)
        raw, closed = read_to_close(sock, timeout=2.0)
    finally:
        sock.close()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw
    assert [r.status for r in parse_responses(raw)] == [200] and closed


# -- header byte cap (431, RFC 6585 §5) -----------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"X-Pad": "a" * 20_000},
    {f"X-Pad-{i}": "a" * 40 for i in range(500)},
], ids=["one-20kb-header", "500-small-headers"])
def test_head_over_the_cap_sent_whole_gets_431(server, headers):
    before = bad_requests(server)
    sock = connect(server)
    try:
        sock.sendall(request("GET", "/healthz", headers=headers))
        raw, closed = read_to_close(sock)
    finally:
        sock.close()
    (response,) = parse_responses(raw)
    assert_json_error(response, 431)
    assert closed
    assert bad_requests(server) == before + 1


def test_header_dribbled_over_several_writes_gets_431(server):
    sock = connect(server)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: rawsse\r\nX-Pad: ")
        for _ in range(5):  # 5 × 4 KB of one unfinished header value: over the 16 KB cap
            time.sleep(0.05)
            try:
                sock.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
        raw, closed = read_to_close(sock)
    finally:
        sock.close()
    (response,) = parse_responses(raw)
    assert_json_error(response, 431)
    assert closed


@pytest.mark.parametrize("piece", [None, 1000], ids=["whole", "1kb-writes"])
def test_header_under_the_cap_is_served(server, piece):
    """A 12 KB head is under the 16 KB cap however it is split (bytes of a header that arrives
    over several reads must not be counted twice)."""
    data = request("GET", "/healthz", headers={"X-Pad": "a" * 12_000})
    sock = connect(server)
    try:
        for start in range(0, len(data), piece or len(data)):
            sock.sendall(data[start:start + (piece or len(data))])
            time.sleep(0.005 if piece else 0)
        (response,) = read_responses(sock, 1)
    finally:
        sock.close()
    assert response.status == 200


# -- slowloris and idle timeouts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_server():
    """One-second header and idle timeouts (the sweep runs once a second: expect 1–2 s)."""
    srv, holders = launch("--keepalive", "0", "--header-timeout", "1", "--idle-timeout", "1")
    yield srv
    srv.stop()
    for holder in holders:
        holder.close()


def trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send ``data`` one byte per ``interval`` until the server answers or closes; returns what
    it sent and when it closed (seconds from the first byte)."""
    started = time.monotonic()
    received = b""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            break
        assert time.monotonic() - started < limit, "no answer while trickling"
    received, closed = read_to_close(sock, timeout=limit)
    assert closed
    return received, time.monotonic() - started


SLOW_HEAD = (b"POST /3/device/aabbccdd HTTP/1.1\r\nHost: rawsse\r\n"
             b"Content-Type: application/json\r\n")


def test_slowloris_head_gets_408_and_close(strict_server):
    sock = connect(strict_server)
    try:
        raw, elapsed = trickle(sock, SLOW_HEAD, 0.3, 5.0)
    finally:
        sock.close()
    (response,) = parse_responses(raw)
    assert_json_error(response, 408, "RequestTimeout")
    assert 0.9 <= elapsed <= 2.6, elapsed


def test_slow_body_gets_408_and_close(strict_server):
    sock = connect(strict_server)
    try:
        sock.sendall(SLOW_HEAD + b"Content-Length: 100\r\n\r\n")
        raw, elapsed = trickle(sock, b'{"mdm":"' + b"x" * 91, 0.3, 5.0)
    finally:
        sock.close()
    (response,) = parse_responses(raw)
    assert_json_error(response, 408, "RequestTimeout")
    assert 0.9 <= elapsed <= 2.6, elapsed


def test_idle_keep_alive_connection_is_closed_quietly(strict_server):
    sock = connect(strict_server)
    try:
        sock.sendall(HEALTHZ)
        read_responses(sock, 1)
        answered = time.monotonic()
        raw, closed = read_to_close(sock, timeout=4.0)
        elapsed = time.monotonic() - answered
    finally:
        sock.close()
    assert closed and raw == b""
    assert 0.9 <= elapsed <= 2.6, elapsed


# -- persistence: HTTP/1.0, Connection: close (RFC 9112 §9.3, §9.6) -------------------------------

def test_http10_without_keep_alive_is_closed_after_the_response(server):
    sock = connect(server)
    try:
        sock.sendall(request("GET", "/healthz", version="1.0"))
        raw, closed = read_to_close(sock, timeout=2.0)
    finally:
        sock.close()
    (response,) = parse_responses(raw)
    assert response.status == 200 and closed


# Every spelling llhttp reads as a keep-alive: the common one, one the server's table of header
# names does not list (lowered first), and Proxy-Connection (nodejs/llhttp ``src/llhttp/http.ts``
# reads it as Connection).
@pytest.mark.parametrize("name", ["Connection", "CONNECTION", "Proxy-Connection"])
def test_http10_with_keep_alive_stays_open_for_a_second_request(server, name):
    keep = request("GET", "/healthz", headers={name: "keep-alive"}, version="1.0")
    sock = connect(server)
    try:
        sock.sendall(keep)
        (first,) = read_responses(sock, 1)
        assert is_open(sock, 0.2)
        sock.sendall(keep)
        (second,) = read_responses(sock, 1)
    finally:
        sock.close()
    assert first.status == second.status == 200
    # RFC 9112 §9.3: a 1.0 client closes unless the answer says the connection persists.
    assert first.headers.get("connection") == second.headers.get("connection") == "keep-alive"


@pytest.mark.parametrize("mode", ["whole", "slices10"])
def test_connection_close_ends_the_connection_and_ignores_what_follows(server, mode):
    """RFC 9112 §9.6: after a request with ``close`` the server MUST NOT process further
    requests on that connection; it answers it and closes (not a 400, not a reset). A server that
    closes after a response SHOULD say ``Connection: close`` in it: the last answer carries the
    header, the keep-alive answer before it does not."""
    before = bad_requests(server)
    closing = request("GET", "/healthz", headers={"Connection": "close"})
    sock = connect(server)
    try:
        feed(sock, HEALTHZ + closing + HEALTHZ, mode)
        raw, closed = read_to_close(sock, timeout=3.0)
    finally:
        sock.close()
    responses = parse_responses(raw)
    assert [(r.status, r.body) for r in responses] == [(200, b"ok\n")] * 2, raw
    assert [r.headers.get("connection") for r in responses] == [None, "close"], raw
    assert closed
    assert bad_requests(server) == before


def test_header_names_are_read_in_any_case(server):
    """RFC 9110 §5.1: field names are case-insensitive. Go writes ``Apns-Id``; a spelling the
    server's table of names does not list is read too: the id is echoed, the push type checked."""
    apns_id = str(uuid.uuid4()).upper()
    client = HTTPClient(server.host, server.port)
    try:
        response = client.request("POST", f"/3/device/{new_token()}", b'{"aps":{}}',
                                  {"APNS-ID": apns_id, "aPnS-PuSh-TyPe": "nonsense"})
    finally:
        client.close()
    assert response.status == 400 and json.loads(response.body) == {"reason": "InvalidPushType"}
    assert response.headers.get("apns-id") == apns_id


def test_half_closed_client_still_gets_its_responses(server):
    sock = connect(server)
    try:
        sock.sendall(push_request(new_token()) + HEALTHZ + push_request(new_token()))
        sock.shutdown(socket.SHUT_WR)
        raw, closed = read_to_close(sock)
    finally:
        sock.close()
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [200, 200, 200], raw
    assert closed


# -- connection cap (503, uvicorn's limit_concurrency) --------------------------------------------

def test_connection_cap_answers_503_and_keeps_the_others(start_server):
    # One worker: the cap is split between workers, and SO_REUSEPORT spreads connections by hash.
    server = start_server("--keepalive", "0", "--max-connections", "5", "--workers", "1")
    time.sleep(0.1)  # let the readiness probe's connection finish closing
    held = [HTTPClient(server.host, server.port) for _ in range(5)]
    try:
        for client in held:
            assert client.request("GET", "/healthz").status == 200
        for _ in range(2):
            extra = connect(server)
            try:
                raw, closed = read_to_close(extra, timeout=3.0)
            finally:
                extra.close()
            (response,) = parse_responses(raw)
            assert_json_error(response, 503, "ServiceUnavailable")
            assert closed
        for client in held:
            assert client.request("GET", "/healthz").status == 200
    finally:
        for client in held:
            client.close()
