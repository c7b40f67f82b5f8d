"""The operator's surface: where the operator routes listen (loopback on the push port + 1 by
default, ``--admin-listen`` elsewhere, ``public`` on the push port), start refusals that name
the flag (overlapping listeners, a port a client connection holds, argparse errors), and admin
changes that every worker holds or none does. Real ``rawsse serve`` processes on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, Server, reserve_port
from rawsse.apns.admin import MAX_TIMESTAMP_MS, MAX_TOKEN_STATES, AdminError, AdminState
from wire import HTTPClient, Response

OPERATOR_ROUTES = ("/stats", "/metrics", "/admin/tokens", "/admin/faults")


def rawsse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rawsse", *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PYTHONPATH=ROOT))


def call(port: int, method: str, path: str, body: object = None) -> Response:
    """One request on a new connection: new connections spread over every worker."""
    client = HTTPClient("127.0.0.1", port)
    try:
        return client.request(method, path, b"" if body is None else json.dumps(body).encode())
    finally:
        client.close()


def reserve_two_ports() -> tuple[list[socket.socket], int]:
    """Hold a port P and P + 1 (the default operator port) for one server."""
    for _ in range(50):
        holder, port = reserve_port()
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            second.close()
            holder.close()
            continue
        return [holder, second], port
    raise AssertionError("no two consecutive free ports")


# -- where the operator routes are ---------------------------------------------------------------

def test_operator_routes_default_to_loopback_on_the_push_port_plus_one():
    holders, port = reserve_two_ports()
    server = Server(["--workers", "2", "--keepalive", "0"], port)
    try:
        server.wait_ready()
        assert server.admin_port == port + 1
        for path in OPERATOR_ROUTES:
            refused = call(port, "GET", path)
            assert (refused.status, refused.json()) == (404, {"reason": "BadPath"}), path
            assert call(port + 1, "GET", path).status == 200, path
        assert call(port, "PUT", "/admin/tokens/aabbcc", {"state": "bad"}).status == 404
        assert call(port, "GET", "/healthz").status == 200
        assert call(port + 1, "GET", "/healthz").status == 200
        assert call(port + 1, "POST", "/3/device/aabbcc", {"aps": {}}).status == 404
    finally:
        server.stop()
        for holder in holders:
            holder.close()


def test_admin_listen_moves_them_and_public_puts_them_on_the_push_port(start_server):
    moved = start_server("--workers", "1")  # conftest passes --admin-listen 127.0.0.1:<reserved>
    assert moved.admin_port != moved.port + 1
    assert call(moved.admin_port, "GET", "/stats").status == 200
    assert call(moved.port, "GET", "/stats").status == 404
    public = start_server("--workers", "1", "--admin-listen", "public")
    assert call(public.port, "GET", "/stats").status == 200
    assert call(public.port, "GET", "/admin/faults").json() == {"faults": []}


@pytest.mark.parametrize("listen_host, admin_host", [("127.0.0.1", "127.0.0.1"),
                                                     ("0.0.0.0", "127.0.0.1"),
                                                     ("127.0.0.1", "0.0.0.0")])
def test_an_admin_listener_overlapping_listen_is_refused(listen_host, admin_host):
    holder, port = reserve_port()
    with holder:
        result = rawsse("serve", "--listen", f"{listen_host}:{port}",
                        "--admin-listen", f"{admin_host}:{port}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"rawsse serve: --admin-listen: {admin_host}:{port} overlaps --listen {listen_host}:{port}: "
        "each connection would land on one of them at random; choose another port, or "
        "--admin-listen public to serve the operator routes on --listen"]


def test_a_port_held_by_a_client_connection_is_refused_naming_it():
    """The listener check sees LISTEN sockets only; a connection bound to the port passes it,
    and then every worker would fail to bind with a bare [Errno 98]."""
    peer = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    admin_holder, admin_port = reserve_port()
    try:
        client.bind(("127.0.0.1", 0))
        port = client.getsockname()[1]
        client.connect(peer.getsockname())
        result = rawsse("serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
                        "--admin-listen", f"127.0.0.1:{admin_port}")
    finally:
        client.close()
        peer.close()
        admin_holder.close()
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"rawsse serve: --listen 127.0.0.1:{port}: cannot listen: Address already in use: a "
        "client connection or a program without SO_REUSEPORT holds the port (ss -tanp shows "
        "which); choose another --listen"]


# -- flag errors: one line naming the flag ----------------------------------------------------------

@pytest.mark.parametrize("args, line", [
    (("serve", "--keepalive", "-1"), "rawsse serve: --keepalive: -1 is below 0: a duration must be ≥ 0"),
    (("serve", "--delivery-delay", "-5ms"),
     "rawsse serve: --delivery-delay: -5ms is below 0: a duration must be ≥ 0"),
    (("serve", "--no-such-flag"),
     "rawsse serve: unrecognized arguments: --no-such-flag (rawsse serve --help)"),
    (("serve", "--keepalive"),
     "rawsse serve: argument --keepalive: expected one argument (rawsse serve --help)"),
    (("push", "--count", "many"),
     "rawsse push: argument --count: invalid int value: 'many' (rawsse push --help)"),
    (("devices", "--no-such-flag"),
     "rawsse devices: unrecognized arguments: --no-such-flag (rawsse devices --help)"),
    (("tune", "--connections"),
     "rawsse tune: argument --connections: expected one argument (rawsse tune --help)"),
])
def test_flag_errors_are_one_line_naming_the_flag(args, line):
    result = rawsse(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]


# -- admin changes: every worker or none ------------------------------------------------------------

def test_an_admin_timestamp_beyond_what_the_mesh_carries_is_refused_on_every_worker(start_server):
    srv = start_server("--workers", "2")
    token = "aabbcc"
    for timestamp in (100000000000000000000000, 2**63, MAX_TIMESTAMP_MS + 1, -1, 1.5, True):
        for _ in range(8):
            refused = call(srv.admin_port, "PUT", f"/admin/tokens/{token}",
                           {"state": "unregistered", "timestamp": timestamp})
            assert refused.status == 400, (timestamp, refused.body)
            assert refused.json()["reason"] == "BadAdminRequest"
            assert '"timestamp"' in refused.json()["detail"]
    for _ in range(8):  # nothing held anywhere: pushes accepted, the list readable and empty
        assert call(srv.port, "POST", f"/3/device/{token}", {"aps": {}}).status == 200
        assert call(srv.admin_port, "GET", "/admin/tokens").json() == {"tokens": []}

    assert call(srv.admin_port, "PUT", f"/admin/tokens/{token}",
                {"state": "unregistered", "timestamp": MAX_TIMESTAMP_MS}).status == 200
    for _ in range(8):
        gone = call(srv.port, "POST", f"/3/device/{token}", {"aps": {}})
        assert (gone.status, gone.json()) == (410, {"reason": "Unregistered",
                                                    "timestamp": MAX_TIMESTAMP_MS})
        assert call(srv.admin_port, "GET", "/admin/tokens").json()["tokens"] == [
            {"token": token, "state": "unregistered", "timestamp": MAX_TIMESTAMP_MS}]


def test_token_states_are_capped_with_a_clear_error():
    admin = AdminState()
    for i in range(MAX_TOKEN_STATES):
        admin.apply({"op": "set_token", "token": f"{i:08x}", "state": "bad"})
    with pytest.raises(AdminError, match=f"{MAX_TOKEN_STATES} token states are held.*DELETE "
                                         "/admin/tokens"):
        admin.apply({"op": "set_token", "token": "ffffffffff", "state": "bad"})
    admin.apply({"op": "set_token", "token": "00000001", "state": "expired"})  # a known one: ok
    replayed = {"op": "set_token", "token": "eeeeeeeeee", "state": "bad", "stamp": 2**62}
    admin.apply(replayed)  # a change another worker made is always taken, to stay alike
    admin.apply({"op": "clear_tokens"})
    admin.apply({"op": "set_token", "token": "ffffffffff", "state": "bad"})
    assert len(admin.token_states) == 1
