"""Hostile clients against a real two-worker node: pipelined /metrics floods, tokens and
prefixes the mesh cannot carry, apns-expiration values Python's int() chokes on (issue 12,
items 1, 4 and 5). Real processes, real sockets."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest
from wire import HTTPClient, SSEReader, build_request, get_json

METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def token(i: int, tag: str = "") -> str:
    return ("hostile" + tag + f"{i:06d}").encode().hex()


def worker_pids(server) -> list[int]:
    return sorted(w["pid"] for w in get_json(server.host, server.admin_port, "/stats")["workers"])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def all_fds(server) -> int:
    return sum(open_fds(pid) for pid in worker_pids(server))


def push(client: HTTPClient, tok: str, expiration: str | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    headers = {"apns-id": str(uuid.uuid4())}
    if expiration is not None:
        headers["apns-expiration"] = expiration
    client.send(build_request("POST", f"/3/device/{tok}", b'{"mdm":"x"}', headers))
    responses = client.read_responses(1, timeout=timeout)
    assert responses, "connection closed with no answer"
    return responses[0].status, responses[0].body


def no_traceback(server) -> None:
    output = server.output()
    assert "Traceback" not in output, output[-3000:]


# -- item 1: pipelined /metrics that are never read ---------------------------------------------

def flood_metrics(server, connections: int, requests: int, stop: threading.Event) -> list[socket.socket]:
    """``connections`` clients with a tiny receive buffer each pipeline ``requests`` /metrics and
    never read; bounded: gives up sending at ``stop``."""
    socks = []
    for _ in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.admin_port))
        sock.setblocking(False)
        socks.append(sock)
    pending = {sock: METRICS * requests for sock in socks}
    while pending and not stop.is_set():
        for sock in list(pending):
            try:
                sent = sock.send(pending[sock])
            except BlockingIOError:
                continue
            pending[sock] = pending[sock][sent:]
            if not pending[sock]:
                del pending[sock]
        time.sleep(0.005)
    return socks


def test_pipelined_metrics_nobody_reads_do_not_stall_the_workers(start_server, readers):
    srv = start_server("--workers", "2", "--keepalive", "0", admin=True)
    pids = worker_pids(srv)
    before = [token(i, "m") for i in range(40)]
    client = HTTPClient(srv.host, srv.port)
    try:
        for tok in before:  # stored on both workers' shards, their devices offline
            assert push(client, tok)[0] == 200
        stop = threading.Event()
        flooded: list[socket.socket] = []
        flooder = threading.Thread(target=lambda: flooded.extend(flood_metrics(srv, 20, 1000, stop)))
        flooder.start()
        slowest, answered = 0.0, 0
        deadline = time.monotonic() + 4.0
        try:
            while time.monotonic() < deadline:  # bounded: ~4 s of pushes under the flood
                started = time.monotonic()
                status, body = push(client, token(answered % 50, "live"), timeout=10)
                slowest = max(slowest, time.monotonic() - started)
                assert status == 200, body
                answered += 1
                time.sleep(0.01)
        finally:
            stop.set()
            flooder.join(10)
            for sock in flooded:
                sock.close()
        # The workers' loops keep turning: every push answered well inside the heartbeat budget.
        assert slowest < 1.0, f"a push waited {slowest:.1f}s under the /metrics flood"
        assert answered > 40
        assert worker_pids(srv) == pids
        stats = get_json(srv.host, srv.admin_port, "/stats")
        assert stats["master"]["worker_restarts"] == 0
        for tok in before:  # what was accepted before the flood is still held, and delivered
            reader = SSEReader(srv.host, srv.port, tok)
            readers.append(reader)
            assert reader.next_event(timeout=5) is not None, tok
    finally:
        client.close()
    no_traceback(srv)



def test_requests_held_back_by_the_queue_cap_are_all_answered_in_order(start_server):
    """One send of more pipelined requests than a connection may have unanswered: reading
    pauses part-way through a read and resumes with what it held, even once the kernel has
    nothing more for it (everything was read at once)."""
    srv = start_server("--workers", "2", admin=True)
    operator = HTTPClient(srv.host, srv.admin_port)
    public = HTTPClient(srv.host, srv.port)
    try:
        operator.send(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n" * 60)  # 4 at a time there
        assert [r.status for r in operator.read_responses(60, timeout=15)] == [200] * 60
        ids = [str(uuid.uuid4()) for _ in range(1500)]  # about half forwarded: answered later
        public.send(b"".join(build_request("POST", f"/3/device/{token(n, 'q')}", b'{"mdm":"q"}',
                                           {"apns-id": ids[n]}) for n in range(1500)))
        answers = public.read_responses(1500, timeout=20)
        assert [(r.status, r.headers["apns-id"]) for r in answers] == [(200, i) for i in ids]
    finally:
        operator.close()
        public.close()
    no_traceback(srv)


# -- item 4: tokens and prefixes the mesh's one-byte length fields cannot carry ------------------

LONG_TOKEN = "cd" * 300  # 300 bytes: over MAX_TOKEN_BYTES, and over the mesh's 255


def answer_on_fresh_connection(server, request: bytes) -> tuple[int, bytes]:
    """One request on its own connection (so the kernel spreads them over both workers)."""
    client = HTTPClient(server.host, server.port, timeout=3)
    try:
        client.send(request)
        responses = client.read_responses(1, timeout=3)
        assert responses, "closed with no answer"
        return responses[0].status, responses[0].body
    finally:
        client.close()


def test_an_overlong_events_token_is_bad_device_token_and_leaks_no_socket(start_server):
    srv = start_server("--workers", "2", admin=True)
    fds_before = all_fds(srv)
    request = f"GET /events?token={LONG_TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for _ in range(30):  # both workers take some: the non-owner once lost the socket
        status, body = answer_on_fresh_connection(srv, request)
        assert (status, body) == (400, b'{"reason":"BadDeviceToken"}')
    time.sleep(0.2)
    assert all_fds(srv) <= fds_before + 2  # no CLOSE-WAIT sockets piling up
    no_traceback(srv)


def test_an_overlong_push_token_or_broadcast_prefix_is_answered_bad_device_token(start_server):
    srv = start_server("--workers", "2", admin=True)
    push_request = build_request("POST", "/3/device/" + "ab" * 300, b'{"mdm":"x"}')
    broadcast = build_request("POST", "/broadcast?prefix=" + "a" * 301, b'{"mdm":"x"}')
    for _ in range(10):
        assert answer_on_fresh_connection(srv, push_request)[0] == 400
        status, body = answer_on_fresh_connection(srv, broadcast)
        assert (status, body) == (400, b'{"reason":"BadDeviceToken"}')
    no_traceback(srv)


def test_the_longest_token_accepted_crosses_the_mesh(start_server, readers):
    srv = start_server("--workers", "2", admin=True)
    longest = [("%02x" % i) * 100 for i in range(8)]  # 100 bytes each, owners on both workers
    for tok in longest:
        readers.append(SSEReader(srv.host, srv.port, tok))
        assert readers[-1].status == 200
    time.sleep(0.2)
    for tok in longest:  # on fresh connections: some pushes are forwarded to the other worker
        assert answer_on_fresh_connection(
            srv, build_request("POST", f"/3/device/{tok}", b'{"mdm":"x"}'))[0] == 200
    for reader in readers:
        assert reader.next_event(timeout=5) is not None
    status, body = answer_on_fresh_connection(
        srv, build_request("POST", "/broadcast?prefix=" + "00" * 100, b'{"mdm":"b"}'))
    assert status == 200 and b'"streams":1' in body, body
    no_traceback(srv)


# -- item 5: apns-expiration int() cannot take ---------------------------------------------------

@pytest.mark.parametrize("expiration", ["--5", "1" + "0" * 309, "9" * 5000, "+5", "1_000"])
def test_an_unparseable_expiration_is_bad_expiration_date(server, expiration):
    client = HTTPClient(server.host, server.port)
    try:
        status, body = push(client, token(1, "exp"), expiration)
        assert (status, body.startswith(b'{"reason":"BadExpirationDate"')) == (400, True), body
        assert push(client, token(1, "exp"), "-5")[0] == 200  # the connection still serves
    finally:
        client.close()
    no_traceback(server)


# -- item 4: the loop closes a socket whose failed handler cannot ---------------------------------

class _Failing:
    """A handler that raises on its first event and whose close forgets the fd (as a connection
    whose socket was detached for a hand-off does)."""

    def handle_events(self, events: int) -> None:
        raise RuntimeError("handler bug")

    def close(self, reason: str = "") -> None:
        pass


def test_a_failing_handler_s_socket_is_closed_by_the_loop():
    from rawsse.server.loop import Loop

    loop = Loop()
    ours, theirs = socket.socketpair()
    try:
        theirs.settimeout(2)
        fd = ours.detach()
        loop.add(fd, _Failing())
        theirs.send(b"x")
        loop.run_once()
        try:  # EOF (or a reset: it had unread input): the loop closed its end, not leaked it
            assert theirs.recv(1) == b""
        except ConnectionResetError:
            pass
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        theirs.close()
        loop.close()


# -- found by the fuzzer --------------------------------------------------------------------------

def test_a_closing_request_right_after_an_ignored_upgrade_is_answered_without_a_traceback(server):
    client = HTTPClient(server.host, server.port)
    try:
        client.send(build_request("GET", "/healthz", headers={"Connection": "Upgrade",
                                                              "Upgrade": "h2c"})
                    + build_request("GET", "/healthz", headers={"Connection": "close"}))
        assert [r.status for r in client.read_responses(2, timeout=3)] == [200, 200]
        assert client.wait_closed(3)
    finally:
        client.close()
    no_traceback(server)
