"""How ``rawsse push`` reads HTTP/1.1 answers (``rawsse.load.h1answers``): the common 200 and every
plainly framed answer without httptools, anything else with it, read right whichever way the
bytes are cut. Against a real ``rawsse serve`` (its answers captured over a socket, then whole
runs) and against Python's ``http.server``, an HTTP/1.1 server written by others."""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import threading
import urllib.request
from typing import Any, Iterator

import httptools
import pytest

from loadtools import run_push
from rawsse.load import driver as push_driver
from rawsse.load import push
from rawsse.load.h1answers import AnswerReader
from rawsse.load.stamp import new_stamped_id
from rawsse.server.loop import Loop

ACTIVE, BAD, GONE = "a0" * 16, "b0" * 16, "c0" * 16  # states set through the admin routes


def admin(server: Any, method: str, path: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.admin_url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=5):
        pass


@pytest.fixture(scope="module")
def states(server: Any) -> Any:
    """The module's server with ``BAD`` marked bad (400) and ``GONE`` unregistered (410)."""
    admin(server, "PUT", f"/admin/tokens/{BAD}", {"state": "bad"})
    admin(server, "PUT", f"/admin/tokens/{GONE}", {"state": "unregistered", "timestamp": 1234})
    return server


def request(token: str, apns_id: str = "", extra: str = "") -> bytes:
    """A push request as ``rawsse push`` sends it (``--headers none``)."""
    stamp = f"apns-id: {apns_id}\r\n" if apns_id else ""
    return (f"POST /3/device/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n{stamp}{extra}"
            "\r\n{}").encode()


class Counting:
    """httptools, the reference: how many answers the bytes hold."""

    def __init__(self) -> None:
        self.answers = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.answers += 1


def exchange(server: Any, requests: list[bytes]) -> bytes:
    """The bytes a real server answers ``requests`` (pipelined, one send) with."""
    counting = Counting()
    answers = b""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"".join(requests))
        while counting.answers < len(requests):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {counting.answers} answers: {answers!r}"
            counting.parser.feed_data(chunk)
            answers += chunk
    return answers


@pytest.fixture
def make_driver() -> Iterator:
    """A real push driver (``rawsse push``'s flags), never run: what the reader reports to."""
    loops: list[Loop] = []

    def make(*flags: str) -> push_driver.Driver:
        parser = argparse.ArgumentParser()
        push.add_arguments(parser)
        args = parser.parse_args(["--url", "http://127.0.0.1:9", "--tokens", "fleet:0",
                                  "--quiet", *flags])
        loops.append(Loop())
        return push_driver.Driver(args, loops[-1])

    yield make
    for loop in loops:
        loop.close()


def read_in_pieces(run: push_driver.Driver, data: bytes, cuts: list[int],
                   limit: int) -> AnswerReader:
    """``data`` fed to a new reader cut at ``cuts``, as reads would bring it."""
    reader = AnswerReader(run)
    reader.reset()
    answered = 0
    for start, end in zip([0, *cuts], [*cuts, len(data)]):
        answered += reader.feed(data[start:end], limit - answered)
    assert answered == limit
    return reader


def test_rawsse_answers_read_without_httptools_however_cut(states, make_driver) -> None:
    """200, 400 with its JSON reason, 410 with its timestamp, 503 from a fault rule: read by the
    fast path whole, split at every byte, or all in one read; a Connection: close answer
    hands the connection to httptools, which ends it after that answer."""
    ids = [new_stamped_id() for _ in range(4)]
    plain = exchange(states, [request(ACTIVE, ids[0]), request(BAD), request(GONE),
                              request(ACTIVE, ids[1])])
    admin(states, "POST", "/admin/faults", "100%:503:ServiceUnavailable")
    try:
        refused = exchange(states, [request(ACTIVE)])
    finally:
        admin(states, "DELETE", "/admin/faults")
    closing = exchange(states, [request(ACTIVE, ids[2], "Connection: close\r\n")])
    assert b"Connection: close" in closing and b'"timestamp":1234' in plain
    every = plain + refused
    expected = {"400 BadDeviceToken": 1, "410 Unregistered": 1, "503 ServiceUnavailable": 1}
    for cuts in ([], list(range(1, len(every))), [len(plain) - 3, len(plain) + 40]):
        run = make_driver()
        reader = read_in_pieces(run, every, cuts, 5)
        assert (run.accepted, run.statuses) == (2, expected), cuts
        assert reader.parser is None and reader.ended is None  # httptools never needed
    for flags in ((), ("--verify",)):  # the common 200's path, and --verify's
        reader = read_in_pieces(make_driver(*flags), closing, [], 1)
        assert reader.ended == "closed", flags
    run = make_driver("--verify")
    reader = read_in_pieces(run, every + closing, list(range(1, len(every + closing))), 6)
    assert run.verify_ids == [ids[0].encode(), ids[1].encode(), ids[2].encode()]
    assert reader.parser is not None and reader.ended == "closed"


def test_a_learned_layout_never_passes_for_another_answer(states, make_driver) -> None:
    """Once the common 200's layout is learned, an answer of the same length with another
    status, or with a Connection header where a header of it was, is not taken for it."""
    answer = exchange(states, [request(ACTIVE)])
    date = answer[answer.index(b"Date: "):answer.index(b"\r\n", answer.index(b"Date: "))]
    failed = answer.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 500 OK")
    closing = answer.replace(date, b"Connection: close\r\nX: ".ljust(len(date), b"a"))
    assert len(failed) == len(closing) == len(answer)
    run = make_driver()
    reader = read_in_pieces(run, answer + answer + failed + answer + closing, [], 5)
    assert reader.layout is not None and reader.layout[0] == len(answer)
    assert (run.accepted, run.statuses) == (4, {"500": 1})
    assert reader.ended == "closed"  # the Connection: close answer was read as one


def test_an_answer_to_nothing_asked_ends_the_connection(states, make_driver) -> None:
    answers = exchange(states, [request(ACTIVE), request(ACTIVE)])
    run = make_driver()
    reader = AnswerReader(run)
    reader.reset()
    assert reader.feed(answers, 1) == 1
    assert reader.ended == "closed" and run.accepted == 1


def test_push_runs_against_rawsse_count_every_status(states, tmp_path) -> None:
    """Pipelined (several answers a read) and keep-alive, over tokens answered 200, 400, 410."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{ACTIVE}\n{BAD}\n{GONE}\n{ACTIVE}\n")
    for flags in (("--pipeline", "8", "--senders", "2"), ("--senders", "3")):
        report = run_push(states.url, tmp_path, "--tokens", f"file:{tokens}", "--count", "400",
                          "--fail-under", "0", *flags)
        assert report["statuses"] == {"200": 200, "400 BadDeviceToken": 100,
                                      "410 Unregistered": 100}, flags
        assert report["errors"] == {} and report["latency_ms"]["count"] == 400


# -- an independent server: Python's http.server ------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """Answers by the token's first byte: 00 200, 01 200 with a body, 02 400, 03 410, 04 chunked
    200, 05 200 with Connection: close. Head and body go out in separate writes."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.path.rsplit("/", 1)[1][:2]
        status, body = {"00": (200, b""), "01": (200, b"{}"),
                        "02": (400, b'{"reason":"BadDeviceToken"}'),
                        "03": (410, b'{"reason":"Unregistered","timestamp":99}'),
                        "04": (200, b""), "05": (200, b"")}[kind]
        self.send_response(status)
        if kind == "04":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n\r\n")
            return
        if kind == "05":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def python_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def token_file(tmp_path: Any, kinds: str) -> str:
    path = tmp_path / f"tokens-{kinds}.txt"
    path.write_text("".join(f"{kind}{'ee' * 15}\n" for kind in kinds.split(",")))
    return f"file:{path}"


def test_an_independent_servers_answers(python_server, tmp_path) -> None:
    """Bodies framed by Content-Length (a 200 with one too), pipelined: every one counted."""
    report = run_push(python_server, tmp_path, "--tokens", token_file(tmp_path, "00,01,02,03"),
                      "--count", "200", "--pipeline", "4", "--senders", "2", "--fail-under", "0")
    assert report["statuses"] == {"200": 100, "400 BadDeviceToken": 50, "410 Unregistered": 50}
    assert report["errors"] == {}


def test_chunked_and_closing_answers_go_to_httptools(python_server, tmp_path) -> None:
    """A chunked answer is read by httptools (the rest of that connection too); a Connection:
    close answer ends the connection once read, with nothing in flight on it lost, and the
    sender reconnects."""
    chunked = run_push(python_server, tmp_path, "--tokens", token_file(tmp_path, "00,04,00"),
                       "--count", "9", "--senders", "1", "--pipeline", "2")
    assert chunked["statuses"] == {"200": 9} and chunked["errors"] == {}
    closing = run_push(python_server, tmp_path, "--tokens", token_file(tmp_path, "00,05"),
                       "--count", "6", "--senders", "1")
    assert closing["statuses"] == {"200": 6}
    assert closing["errors"] == {"disconnect_closed": 3}
