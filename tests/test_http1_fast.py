"""The hand-written fast path for common HTTP/1.1 requests (``rawsse/server/http1_fast.py``)
against two independent parsers, then over real sockets.

Differential: a seeded corpus (the requests Go's net/http, curl and Fleet's client send, their
headers in random orders and spellings, every boundary and malformation the fast path
declines, every split point of a request) is read by ``read_request``; for each input it either
declines, or yields what httptools (llhttp, the parser behind it) yields: method, target, the
headers a route keeps, the repeated-header flag, the body, and the bytes consumed; h11, where it
accepts the input, agrees. Over sockets: pipelined mixes of fast-path and httptools requests
answered in order, a request split over reads, curl.
"""

from __future__ import annotations

import fcntl
import random
import re
import shutil
import socket
import struct
import subprocess
import termios
import uuid
from typing import Any

import h11
import httptools
import pytest

from rawsse.apns.apple import REQUEST_HEADERS, SINGLE_HEADERS
from rawsse.apns.validation import CHECKED_HEADERS, is_apns_id
from rawsse.server import http1_fast
from rawsse.server.http1_fast import HEADER_NAMES, MEMO_ENTRIES, read_request
from test_http import connect, is_open, new_token, read_responses, read_to_close
from wire import HTTPClient, SSEReader, get_json, wait_for

HEAD_LIMIT = 8192
APNS_ID = "0190f5c2-7a6b-7c3d-8e9f-0a1b2c3d4e5f"
TOKEN = "ab" * 32
BODY = b'{"mdm":"pushmagicABC123"}'

# (name, value) header lists as each client sends them; bodies added by _request.
GO_PUSH = [("Host", "127.0.0.1:8378"), ("User-Agent", "Go-http-client/1.1"),
           ("Content-Length", "%d"), ("Apns-Id", APNS_ID),
           ("Content-Type", "application/json"), ("Accept-Encoding", "gzip")]
FLEET_PUSH = [("Host", "api.push.apple.com"), ("User-Agent", "Go-http-client/1.1"),
              ("Content-Length", "%d"), ("Apns-Expiration", "0"), ("Apns-Priority", "10"),
              ("Apns-Push-Type", "mdm"), ("Apns-Topic", "com.apple.mgmt.External.abc"),
              ("Authorization", "bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ0In0.c2ln"),
              ("Content-Type", "application/json"), ("Accept-Encoding", "gzip")]
CURL_PUSH = [("Host", "127.0.0.1:8378"), ("User-Agent", "curl/7.88.1"), ("Accept", "*/*"),
             ("apns-id", APNS_ID), ("apns-push-type", "alert"), ("Content-Length", "%d"),
             ("Content-Type", "application/x-www-form-urlencoded")]
CURL_GET = [("Host", "127.0.0.1:8378"), ("User-Agent", "curl/7.88.1"), ("Accept", "*/*")]
TARGETS = [f"/3/device/{TOKEN}", "/healthz", f"/events?token={TOKEN}", "/broadcast?prefix=ab",
           "/admin/tokens/ab", "/a/b;c=d/%7E~!$&'()*+,:@?x=1&y=/?z", "/"]


def _request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
             version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}"]
    lines += [f"{name}: {value % len(body) if '%d' in value else value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _spell(name: str, rng: random.Random) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        return name.lower()
    if choice == 1:
        return name.title()
    if choice == 2:
        return name.upper()
    if choice == 3:
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)
    return name


def _valid(rng: random.Random) -> bytes:
    """A request the fast path should take: one of the clients' shapes, shuffled and respelled,
    sometimes with headers nothing reads, repeated single headers, OWS, other targets."""
    kind = rng.randrange(4)
    headers = list([GO_PUSH, FLEET_PUSH, CURL_PUSH, CURL_GET][kind])
    rng.shuffle(headers)
    headers = [(_spell(name, rng), value) for name, value in headers]
    if rng.random() < 0.3:
        headers.insert(rng.randrange(len(headers) + 1),
                       (rng.choice(["X-Request-Id", "traceparent", "X!#$%&'*+-.^_`|~9"]),
                        rng.choice(["1", "", " spaced  inside", "a\tb", "\"quoted\""])))
    if rng.random() < 0.1:
        headers.append((rng.choice(["apns-id", "Apns-Topic", "rawsse-delivery-delay"]), "again"))
    if rng.random() < 0.2:
        headers = [(name, rng.choice(["", " ", "\t", " \t "]) + value) for name, value in headers]
    body = b"" if kind == 3 else rng.choice([BODY, b"", b"x" * rng.randrange(1, 6000)])
    method = "GET" if kind == 3 else rng.choice(["POST", "POST", "PUT", "DELETE", "GET"])
    return _request(method, rng.choice(TARGETS), headers, body)


# Each turns a valid request into one the fast path must decline: (why, mutation).
def _replace(old: bytes, new: bytes) -> Any:
    return lambda data: data.replace(old, new, 1)


def _insert_header(line: bytes) -> Any:
    return lambda data: data.replace(b"\r\n", b"\r\n" + line + b"\r\n", 1)


def _length(replacement: bytes) -> Any:
    """Rewrite the Content-Length value (group 2) of a request."""
    return lambda data: _CONTENT_LENGTH.sub(rb"\g<1>" + replacement, data, count=1)


def _body_length(data: bytes) -> int:
    match = _CONTENT_LENGTH.search(data)
    return int(match.group(2)) if match else 0


_CONTENT_LENGTH = re.compile(rb"(?i)(\r\ncontent-length:[ \t]*)(\d+)")

MUTATIONS = [
    ("Transfer-Encoding", _insert_header(b"Transfer-Encoding: chunked")),
    ("transfer-encoding with CL", _insert_header(b"transfer-encoding: identity")),
    ("duplicate Content-Length", _insert_header(b"Content-Length: 0")),
    ("duplicate CL respelled", _insert_header(b"CONTENT-LENGTH: 0")),
    ("signed Content-Length", _length(rb"+\g<2>")),
    ("hex Content-Length", _length(rb"0x\g<2>")),
    ("Content-Length with space", _length(rb"\g<2> ")),
    ("Content-Length list", _length(rb"\g<2>, \g<2>")),
    ("huge Content-Length", _length(rb"99999999999999999999")),
    ("Content-Length one more", lambda data: _length(b"%d" % (_body_length(data) + 1))(data)),
    ("obs-fold", _replace(b"\r\n", b"\r\n X-Folded: continued\r\n")),
    ("obs-fold tab", _insert_header(b"X-A: 1\r\n\tcontinued")),
    ("bare LF ending a header", _insert_header(b"X-A: 1\nX-B: 2")),
    ("bare LF lines", lambda data: data.replace(b"\r\n", b"\n")),
    ("bare CR in a value", _insert_header(b"X-A: a\rb")),
    ("NUL in a value", _insert_header(b"X-A: a\x00b")),
    ("DEL in a value", _insert_header(b"X-A: a\x7fb")),
    ("control byte in a value", _insert_header(b"Apns-Id: a\x01b")),
    ("obs-text in a value", _insert_header(b"X-A: caf\xc3\xa9")),
    ("space before colon", _insert_header(b"Apns-Id : x")),
    ("space in a name", _insert_header(b"X A: x")),
    ("no colon", _insert_header(b"X-A")),
    ("empty name", _insert_header(b": x")),
    ("bad name byte", _insert_header(b"X/A: x")),
    ("trailing OWS on a kept value", _insert_header(b"apns-topic: com.example ")),
    ("trailing tab on a kept value", _insert_header(b"Apns-Topic: com.example\t")),
    ("Expect", _insert_header(b"Expect: 100-continue")),
    ("Upgrade", _insert_header(b"Upgrade: h2c")),
    ("Connection close", _insert_header(b"Connection: close")),
    ("Connection keep-alive", _insert_header(b"connection: keep-alive")),
    ("Proxy-Connection", _insert_header(b"Proxy-Connection: close")),
    ("HTTP/1.0", _replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n")),
    ("HTTP/2.0", _replace(b" HTTP/1.1\r\n", b" HTTP/2.0\r\n")),
    ("lower-case version", _replace(b" HTTP/1.1\r\n", b" http/1.1\r\n")),
    ("HTTP/1.10", _replace(b" HTTP/1.1\r\n", b" HTTP/1.10\r\n")),
    ("double space", _replace(b" ", b"  ")),
    ("tab separator", _replace(b" ", b"\t")),
    ("trailing space", _replace(b" HTTP/1.1\r\n", b" HTTP/1.1 \r\n")),
    ("lower-case method", lambda data: data.split(b" ", 1)[0].lower() + b" " + data.split(b" ", 1)[1]),
    ("unknown method", lambda data: b"PATCH " + data.split(b" ", 1)[1]),
    ("PRI", lambda data: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("absolute-form", lambda data: data.replace(b" /", b" http://h/", 1)),
    ("asterisk-form", lambda data: data.split(b" ", 1)[0] + b" * " + data.split(b" ", 2)[2]),
    ("fragment", lambda data: data.replace(b" HTTP/1.1", b"#frag HTTP/1.1", 1)),
    ("quote in target", lambda data: data.replace(b" HTTP/1.1", b"\"x HTTP/1.1", 1)),
    ("empty line first", lambda data: b"\r\n" + data),
    ("blank line first", lambda data: b"\r\n\r\n" + data),
    ("head over the limit", _insert_header(b"X-Pad: " + b"p" * HEAD_LIMIT)),
    ("body over MAX_BODY", _insert_header(b"Content-Length: 70000")),
    ("body cut short", lambda data: data[:-1] if not data.endswith(b"\r\n\r\n") else data + b"x"),
]


def _httptools(data: bytes) -> Any:
    """A function of ``end``: what http1.py's httptools callbacks make of ``data[:end]`` if it
    completes a request, else None."""
    class Collector:
        def __init__(self) -> None:
            self.url, self.headers, self.duplicate, self.body = b"", {}, False, b""
            self.done = False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:  # as Http1Connection.on_header
            kept = HEADER_NAMES.get(name)
            if kept is None:
                kept = HEADER_NAMES.get(name.lower(), b"")
            if kept in REQUEST_HEADERS:
                if kept in self.headers and kept in SINGLE_HEADERS:
                    self.duplicate = True
                self.headers[kept] = value

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

    def complete_at(end: int) -> Collector | None:
        collector = Collector()
        parser = httptools.HttpRequestParser(collector)
        try:
            parser.feed_data(data[:end])
        except httptools.HttpParserError:
            return None
        collector.method = parser.get_method()  # type: ignore[attr-defined]
        return collector if collector.done else None

    return complete_at


def _httptools_reads(data: bytes, end: int) -> tuple[Any, ...] | None:
    """What httptools reads of ``data[:end]`` if that is exactly one complete request (and
    ``data[:end - 1]`` is not): (method, target, kept headers, duplicate, body, end)."""
    complete_at = _httptools(data)
    if complete_at(end - 1) is not None:
        return None
    collector = complete_at(end)
    if collector is None:
        return None
    return (collector.method, collector.url, collector.headers, collector.duplicate,
            collector.body, end)


def _h11(data: bytes) -> tuple[Any, ...] | None:
    """h11's reading of the request: (method, target, its kept headers, body), or None when
    h11 refuses it (it also insists on Host, which llhttp does not)."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    try:
        event = connection.next_event()
        if not isinstance(event, h11.Request):
            return None
        body = b""
        while True:
            part = connection.next_event()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    headers = {name: value for name, value in event.headers if name in REQUEST_HEADERS}
    return event.method, event.target, headers, body


def _corpus() -> list[bytes]:
    rng = random.Random(14)
    valid = [_request("POST", f"/3/device/{TOKEN}", GO_PUSH, BODY),
             _request("POST", f"/3/device/{TOKEN}", FLEET_PUSH, BODY),
             _request("POST", f"/3/device/{TOKEN}", CURL_PUSH, BODY),
             _request("GET", "/healthz", CURL_GET), b"GET / HTTP/1.1\r\n\r\n",
             _request("POST", "/x", [("Content-Length", "0")]),
             _request("POST", "/x", [("Content-Length", "00001")], b"y")]
    valid += [_valid(rng) for _ in range(400)]
    corpus = list(valid)
    for data in valid[:60]:
        corpus += [mutate(data) for _, mutate in MUTATIONS]
    for data in valid[:12]:
        corpus += [data[:cut] for cut in range(len(data))]  # every split point
        corpus += [data + valid[1], data + b"GET /", data + b"\r\n"]  # pipelined after it
    return corpus


def test_the_fast_path_reads_exactly_what_httptools_reads_and_h11_agrees():
    """Twice over the corpus: the second pass finds its header blocks and lines in the memo."""
    taken = h11_checked = 0
    for data in _corpus() * 2:
        result = read_request(data, 0, HEAD_LIMIT, None, False)
        if result is None:
            continue
        taken += 1
        request, end, _ = result
        headers = dict(request.headers)  # with apns-id, which the request keeps apart
        if request.apns_id is not None:
            headers[b"apns-id"] = request.apns_id
            assert request.bad_id == (not is_apns_id(request.apns_id)), data
        else:
            assert not request.bad_id
        assert request.plain == (not request.duplicate
                                 and headers.keys().isdisjoint(CHECKED_HEADERS)), data
        fast = (request.method, request.path + (b"?" + request.query if request.query else b""),
                headers, request.duplicate, request.body, end)
        assert fast == _httptools_reads(data, end), data
        theirs = _h11(data[:end])
        if theirs is not None:
            h11_checked += 1
            assert (request.method, fast[1], headers, request.body) == theirs, data
    assert taken > 800 and h11_checked > 760


@pytest.mark.parametrize("why,mutate", MUTATIONS, ids=[why for why, _ in MUTATIONS])
def test_every_declined_case_is_declined(why, mutate):
    data = mutate(_request("POST", f"/3/device/{TOKEN}", GO_PUSH, BODY))
    assert read_request(data, 0, HEAD_LIMIT, None, False) is None, why


def test_a_block_like_the_last_one_is_read_for_what_it_is():
    """The last block found and the last block without its apns-id are compared, not looked
    up: blocks that differ from the last only before the id's line, only after it, only in
    the id or its spelling, or (no id) in one byte, each read one after another, as
    httptools reads them."""
    def go(before: list[tuple[str, str]], after: list[tuple[str, str]], apns_id: str = APNS_ID,
           name: str = "Apns-Id") -> bytes:
        return _request("POST", f"/3/device/{TOKEN}", before + [(name, apns_id)] + after, BODY)

    host, length = ("Host", "h"), ("Content-Length", "%d")
    typed, topic = ("apns-push-type", "alert"), ("apns-topic", "t")
    fleet = FLEET_PUSH
    sequence = [go([host, length], [topic]), go([host, length], [topic]),
                go([host, length], [typed]), go([host, length, typed], []),
                go([host, length, typed], [], str(uuid.uuid4())), go([host, typed, length], []),
                go([host, length, typed], [], name="apns-id"), go([host, length, typed], [topic]),
                go([host, length], [("Apns-Id", "again")]),
                _request("POST", "/x", fleet, BODY), _request("POST", "/x", fleet, BODY),
                _request("POST", "/x", fleet[:3] + [("Apns-Expiration", "9")] + fleet[4:], BODY),
                _request("POST", "/x", fleet[:3] + fleet[4:], BODY),
                _request("POST", "/x", fleet, BODY)]
    for data in sequence * 2:
        request, end, _ = read_request(data, 0, HEAD_LIMIT, None, False)  # type: ignore[misc]
        headers = dict(request.headers)
        if request.apns_id is not None:
            headers[b"apns-id"] = request.apns_id
        assert (request.method, request.path, headers, request.duplicate, request.body,
                end) == _httptools_reads(data, end), data


def test_the_memo_stays_bounded_under_ever_new_headers():
    for i in range(3 * MEMO_ENTRIES):
        data = _request("GET", "/healthz", [("Host", "h"), ("X-Request-Id", str(i))])
        assert read_request(data, 0, HEAD_LIMIT, None, False) is not None
    assert len(http1_fast._BLOCKS) <= MEMO_ENTRIES and len(http1_fast._LINES) <= MEMO_ENTRIES


def test_pipelined_requests_are_read_one_after_another():
    first = _request("POST", f"/3/device/{TOKEN}", GO_PUSH, BODY)
    second = _request("GET", "/healthz", CURL_GET)
    data = first + second + b"GET /partial HTTP/1.1\r\nHost"
    request, end, token = read_request(data, 0, HEAD_LIMIT, None, False)  # type: ignore[misc]
    assert (request.path, request.body, end) == (f"/3/device/{TOKEN}".encode(), BODY, len(first))
    assert token == TOKEN.encode()  # a push: the read loop calls the push route with it
    assert read_request(data, 0, HEAD_LIMIT, None, True)[2] is None  # type: ignore[index]
    request, end, token = read_request(data, end, HEAD_LIMIT, None, False)  # type: ignore[misc]
    assert (request.path, end, token) == (b"/healthz", len(first) + len(second), None)
    assert read_request(data, end, HEAD_LIMIT, None, False) is None


# -- over real sockets ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_worker():
    """One worker: every push is answered during the read that brought it (the fast answer
    path); the two-worker paths are test_http.py's."""
    from conftest import launch
    server, holders = launch("--keepalive", "0", "--workers", "1")
    yield server
    server.stop()
    for holder in holders:
        holder.close()


def _push(token: str, apns_id: str, body: bytes, extra: list[tuple[str, str]] = ()) -> bytes:
    headers = [(n, v) for n, v in GO_PUSH if n != "Apns-Id"] + [("Apns-Id", apns_id), *extra]
    return _request("POST", f"/3/device/{token}", headers, body)


def _chunked_push(token: str, apns_id: str, body: bytes) -> bytes:
    head = (f"POST /3/device/{token} HTTP/1.1\r\nHost: x\r\napns-id: {apns_id}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def test_pipelined_fast_and_httptools_requests_are_answered_in_order(one_worker, readers):
    """One write: pushes the fast path takes, and between them requests it leaves to httptools
    (chunked, HTTP/1.0 keep-alive, obs-text in a header, Connection); then a second write
    starting with the fast path again. Every answer in order, every push
    delivered with its own payload."""
    tokens = [new_token() for _ in range(8)]
    ids = [str(uuid.uuid4()) for _ in tokens]
    for token in tokens:
        readers.append(SSEReader(one_worker.host, one_worker.port, token))
    bodies = [b'{"mdm":"fast-%d"}' % i for i in range(8)]
    first = (_push(tokens[0], ids[0], bodies[0]) + _push(tokens[1], ids[1], bodies[1])
             + _chunked_push(tokens[2], ids[2], bodies[2])
             + _push(tokens[3], ids[3], bodies[3])
             + b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
             + _push(tokens[4], ids[4], bodies[4], [("X-Note", "caf\xe9")]))
    second = (_push(tokens[5], ids[5], bodies[5])
              + _push(tokens[6], ids[6], bodies[6], [("Connection", "keep-alive")])
              + _push(tokens[7], ids[7], bodies[7]))
    sock = connect(one_worker)
    try:
        sock.sendall(first)
        answers = read_responses(sock, 6)
        sock.sendall(second)
        answers += read_responses(sock, 3)
        assert is_open(sock)
    finally:
        sock.close()
    got = [r.headers.get("apns-id", "healthz") for r in answers]
    assert got == ids[:4] + ["healthz"] + ids[4:]
    assert [r.status for r in answers] == [200] * 9
    for reader, apns_id, body in zip(readers, ids, bodies):
        event = reader.next_event()
        assert (event.id, event.data) == (apns_id, body.decode())


def test_the_apns_id_is_checked_once_whichever_parser_reads_it(one_worker, readers):
    """The apns-id's shape is checked by the parser that read it (``Request.bad_id``), not by
    the push route: pipelined in one write, a UUID and ids that are not one in each spelling
    the fast path cuts out (Go's ``Apns-Id``, curl's ``apns-id``) and one it reads line by
    line (``APNS-ID``), the same through httptools (chunked), and a repeated apns-id: each
    answered as Apple would, its id echoed as sent."""
    token = new_token()
    readers.append(SSEReader(one_worker.host, one_worker.port, token))
    good = str(uuid.uuid4()).upper()

    def push(*lines: str) -> bytes:
        return (f"POST /3/device/{token} HTTP/1.1\r\nHost: x\r\n" + "".join(
            line + "\r\n" for line in lines) + "Content-Length: 2\r\n\r\n{}").encode()

    cases = [(push(f"Apns-Id: {good}"), 200, good),
             (push("Apns-Id: not-a-uuid"), 400, "not-a-uuid"),
             (push(f"apns-id: {good[:-1]}g"), 400, good[:-1] + "g"),
             (push(f"APNS-ID: {good}x"), 400, good + "x"),
             (push(f"Apns-Id: {good}", "APNS-ID: " + good), 400, good),  # DuplicateHeaders
             (_chunked_push(token, "not-a-uuid", b"{}"), 400, "not-a-uuid"),
             (_chunked_push(token, good, b"{}"), 200, good)]
    sock = connect(one_worker)
    try:
        sock.sendall(b"".join(data for data, _, _ in cases))
        answers = read_responses(sock, len(cases))
    finally:
        sock.close()
    assert [(r.status, r.headers["apns-id"]) for r in answers] == [
        (status, apns_id) for _, status, apns_id in cases]
    assert [r.json()["reason"] for r in answers if r.status == 400] == [
        "BadMessageId"] * 3 + ["DuplicateHeaders", "BadMessageId"]
    assert [readers[0].next_event().id for _ in range(2)] == [good, good]


def test_a_push_the_fast_path_hands_straight_to_the_push_route_is_still_routed(one_worker):
    """The read loop calls the push route itself for a push the fast path read; what handle
    decides before it still holds: a push on the operator listener is 404 BadPath, a push that
    is not a POST 405."""
    push = _push(new_token(), APNS_ID, BODY)
    sock = socket.create_connection((one_worker.host, one_worker.admin_port), timeout=5)
    try:
        sock.sendall(push)
        (refused,) = read_responses(sock, 1)
    finally:
        sock.close()
    assert (refused.status, refused.json()["reason"]) == (404, "BadPath")
    sock = connect(one_worker)
    try:
        sock.sendall(push.replace(b"POST", b"PUT", 1) + push)
        answers = read_responses(sock, 2)
    finally:
        sock.close()
    assert [(r.status, r.headers["apns-id"]) for r in answers] == [(405, APNS_ID), (200, APNS_ID)]


def test_a_request_split_over_reads_then_whole_ones(one_worker):
    """A push cut inside its head and inside its body, one piece per read (httptools), then
    two whole pushes in one write (the fast path again): all answered, in order."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    split = _push(new_token(), ids[0], BODY)
    sock = connect(one_worker)
    try:
        for piece in (split[:20], split[20:-5], split[-5:]):
            sock.sendall(piece)
            assert is_open(sock, 0.05)
        assert read_responses(sock, 1)[0].headers["apns-id"] == ids[0]
        sock.sendall(_push(new_token(), ids[1], BODY) + _push(new_token(), ids[2], BODY))
        assert [r.headers["apns-id"] for r in read_responses(sock, 2)] == ids[1:]
    finally:
        sock.close()


def test_a_bad_request_after_fast_ones_is_refused_after_their_answers(one_worker):
    """Smuggling shapes after two good pushes in the same write: a duplicate Content-Length
    and TE with CL go to httptools, which refuses them (400 and a close) once the pushes
    before them are answered."""
    for bad in (b"POST /3/device/ab HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
                b"POST /3/device/ab HTTP/1.1\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
        ids = [str(uuid.uuid4()) for _ in range(2)]
        sock = connect(one_worker)
        try:
            sock.sendall(_push(new_token(), ids[0], BODY) + _push(new_token(), ids[1], BODY) + bad)
            answers = read_responses(sock, 3)
            assert [r.status for r in answers] == [200, 200, 400]
            assert [r.headers.get("apns-id") for r in answers[:2]] == ids
            assert read_to_close(sock, 2.0)[1]  # closed: nothing after it is read
        finally:
            sock.close()


def test_curl_pushes_over_one_connection(one_worker, readers):
    """curl's requests (its own header order and spellings), three over one kept-alive
    connection: each answered 200 and delivered."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    tokens = [new_token() for _ in range(3)]
    for token in tokens:
        readers.append(SSEReader(one_worker.host, one_worker.port, token))
    urls = [f"http://{one_worker.host}:{one_worker.port}/3/device/{token}" for token in tokens]
    result = subprocess.run(
        [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
         "-H", f"apns-id: {APNS_ID}", "-H", "apns-push-type: mdm", "-d", BODY.decode(), *urls],
        capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\n")[:3] == [b"200 1", b"200 0", b"200 0"]  # one connection
    for reader in readers:
        event = reader.next_event()
        assert (event.id, event.data) == (APNS_ID, BODY.decode())


def _send_queue(server_port: int, client_port: int) -> int:
    """The bytes the server's end of this loopback connection holds in its send queue
    (``tx_queue`` in /proc/net/tcp, proc(5)): what its writes handed the kernel and the client
    has not acknowledged."""
    local, remote = f":{server_port:04X}", f":{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(local) and fields[2].endswith(remote):
                return int(fields[4].split(":")[0], 16)
    raise AssertionError(f"no socket {local} -> {remote} in /proc/net/tcp")


def _unread(sock: socket.socket) -> int:
    """Bytes in the client's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def test_answers_a_full_socket_takes_only_part_of_are_written_whole_and_in_order(one_worker):
    """A client pipelines ~5 MB of answers' worth of requests (a 9 KB /dashboard, then a
    deliveries query naming its index, on the operator port) and reads nothing until the
    server's socket is full: its send buffer (autotuned, at most tcp_wmem's maximum) and the
    client's 4 KB window hold less, so one of the server's writes takes only part of its bytes
    (http1_answers ``_flush``) and keeps the rest for EPOLLOUT. Then every answer arrives whole
    and in order."""
    srv = one_worker
    dashboard = HTTPClient(srv.host, srv.admin_port)
    reference = dashboard.request("GET", "/dashboard").body
    dashboard.close()
    with open("/proc/sys/net/ipv4/tcp_wmem") as sysctl:  # read only: the most a send buffer grows
        most_queued = int(sysctl.read().split()[2])
    pairs = (most_queued + 1024 * 1024) // len(reference)
    requests = b"".join(b"GET /dashboard HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"GET /admin/deliveries?token=%08x HTTP/1.1\r\nHost: x\r\n\r\n" % i
                        for i in range(pairs))
    parsed_before = get_json(srv.host, srv.admin_port, "/stats")["node"]["http_requests"]
    polls = [0]

    def kept_a_rest() -> bool:
        """The dashboards answered so far (each request parsed was answered in the read that
        brought it) hold more bytes than the kernel took: the server's ``out`` keeps a rest."""
        polls[0] += 1
        parsed = get_json(srv.host, srv.admin_port, "/stats")["node"]["http_requests"]
        answered = (parsed - parsed_before - polls[0]) // 2 * len(reference)
        taken = _send_queue(srv.admin_port, client.sock.getsockname()[1]) + _unread(client.sock)
        return answered > taken

    client = HTTPClient(srv.host, srv.admin_port, timeout=10, rcvbuf=4096)
    try:
        client.send(requests)  # ~60 KB: the kernel takes them, read or not
        assert wait_for(kept_a_rest, timeout=10), "the server's socket never filled"
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # read faster now
        answers = client.read_responses(2 * pairs, timeout=20)
        assert _unread(client.sock) == 0 and not client.collector.responses, "nothing more"
    finally:
        client.close()
    assert [a.status for a in answers] == [200] * (2 * pairs)
    assert all(a.body == reference for a in answers[::2]), "every dashboard whole"
    assert [a.json()["token"] for a in answers[1::2]] == [f"{i:08x}" for i in range(pairs)]
