"""The master's port check (``rawsse/portcheck.py``): the /proc/net/tcp{,6} parser read back on
sockets these tests open themselves, and ``rawsse serve`` refusing a port that already has a
listener (which SO_REUSEPORT would otherwise silently share). Real sockets, real tables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from conftest import ROOT, reserve_port
from rawsse.node import portcheck
from rawsse.node.portcheck import Listener


def listening(host: str, family: int = socket.AF_INET) -> socket.socket:
    """A listener like a rawsse worker's: SO_REUSEPORT, so a second rawsse could bind beside it."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


def inode(sock: socket.socket) -> int:
    """The socket's inode: the last fixed column of its /proc/net/tcp row."""
    return os.fstat(sock.fileno()).st_ino


def read(path: str) -> str:
    with open(path) as table:
        return table.read()


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- the parser on real tables --------------------------------------------------------------------

def test_parser_reads_an_ipv4_loopback_listener() -> None:
    with listening("127.0.0.1") as sock:
        port, ino = sock.getsockname()[1], inode(sock)
        rows = portcheck.parse_table(read("/proc/net/tcp"))
    assert Listener(IPv4Address("127.0.0.1"), port, os.geteuid(), ino) in rows


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
def test_parser_reads_an_ipv6_loopback_listener() -> None:
    with listening("::1", socket.AF_INET6) as sock:
        port, ino = sock.getsockname()[1], inode(sock)
        rows = portcheck.parse_table(read("/proc/net/tcp6"))
    assert Listener(IPv6Address("::1"), port, os.geteuid(), ino) in rows


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 here")
def test_parser_reads_a_v4_mapped_listener_as_ipv4() -> None:
    """A v6 socket bound to ::ffff:127.0.0.1 serves IPv4 127.0.0.1; it is listed in tcp6."""
    with listening("::ffff:127.0.0.1", socket.AF_INET6) as sock:
        port, ino = sock.getsockname()[1], inode(sock)
        rows = portcheck.parse_table(read("/proc/net/tcp6"))
    assert Listener(IPv4Address("127.0.0.1"), port, os.geteuid(), ino) in rows


def test_a_bound_socket_is_no_listener_until_it_listens() -> None:
    """The suite holds its ports with bound, non-listening sockets: the kernel does not even list
    those in /proc/net/tcp (only the listening and connected hashes are walked)."""
    holder, port = reserve_port()
    with holder:
        ino = inode(holder)
        bound = read("/proc/net/tcp")
        holder.listen()
        listening_now = read("/proc/net/tcp")
    rows_of = {int(f[9]) for f in (line.split() for line in bound.splitlines()[1:])}
    assert ino not in rows_of
    assert ino not in {row.inode for row in portcheck.parse_table(bound)}
    assert Listener(IPv4Address("127.0.0.1"), port, os.geteuid(), ino) in \
        portcheck.parse_table(listening_now)


def test_connections_left_on_a_port_are_no_listener() -> None:
    """A server that closed its listener but still holds connections (draining) does not block
    the port: only LISTEN rows count."""
    with listening("127.0.0.1") as sock:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = sock.accept()
            with accepted:
                sock.close()
                text = read("/proc/net/tcp")
    on_port = [f for f in (line.split() for line in text.splitlines()[1:])
               if int(f[1].partition(":")[2], 16) == port]
    assert {f[3] for f in on_port} == {"01"}  # the accepted side, ESTABLISHED
    assert [row for row in portcheck.parse_table(text) if row.port == port] == []


@pytest.mark.skipif(sys.byteorder != "little", reason="the kernel's text is byte-order dependent")
@pytest.mark.parametrize("text, address", [
    ("0100007F", "127.0.0.1"),
    ("00000000", "0.0.0.0"),
    ("0F02000A", "10.0.2.15"),
    ("00000000000000000000000001000000", "::1"),
    ("00000000000000000000000000000000", "::"),
    ("0000000000000000FFFF00000100007F", "127.0.0.1"),   # ::ffff:127.0.0.1
    ("000080FE00000000FF005450563412FE", "fe80::5054:ff:fe12:3456"),
])
def test_decode_address_as_printed_on_x86(text: str, address: str) -> None:
    assert portcheck.decode_address(text) == ip_address(address)


@pytest.mark.parametrize("wanted, existing, shared", [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("127.0.0.1", "0.0.0.0", True),
    ("0.0.0.0", "127.0.0.1", True),
    ("::1", "::1", True),
    ("::1", "::2", False),
    ("::1", "::", True),
    ("::", "::1", True),
    ("127.0.0.1", "::", True),    # a v6 wildcard without IPV6_V6ONLY also takes IPv4
    ("::", "127.0.0.1", True),
    ("0.0.0.0", "::1", False),    # the v4 wildcard takes no IPv6
    ("::1", "0.0.0.0", False),
    ("::1", "127.0.0.1", False),
])
def test_overlaps(wanted: str, existing: str, shared: bool) -> None:
    assert portcheck.overlaps(ip_address(wanted), ip_address(existing)) is shared


# -- the check on real sockets --------------------------------------------------------------------

def test_a_bound_port_passes_and_the_same_port_listening_is_refused() -> None:
    holder, port = reserve_port()
    with holder:
        assert portcheck.check_addresses([("--listen", ("127.0.0.1", port))]) is None
        holder.listen()
        refusal = portcheck.check_addresses([("--listen", ("127.0.0.1", port))])
    assert refusal is not None and f"127.0.0.1:{port} already has a listening socket" in refusal


def test_a_wildcard_listener_refuses_a_specific_address() -> None:
    """Another address of the same port does not overlap; the wildcard does (checked against a
    listener on 127.0.0.1 so the test opens nothing beyond loopback)."""
    with listening("127.0.0.1") as sock:
        port = sock.getsockname()[1]
        assert portcheck.check_addresses([("--listen", ("127.0.0.2", port))]) is None
        refusal = portcheck.check_addresses([("--listen", ("0.0.0.0", port))])
    assert refusal is not None and f"overlaps a socket listening on 127.0.0.1:{port}" in refusal


def test_unreadable_or_unknown_tables_skip_the_check(tmp_path, caplog) -> None:
    """The check never stops a start by itself: no table, or one it cannot parse, means go."""
    garbled = tmp_path / "garbled"
    with listening("127.0.0.1") as sock:
        port = sock.getsockname()[1]
        garbled.write_text(read("/proc/net/tcp").replace(":", "-"))  # no address parses
        for tables in ([str(tmp_path / "tcp"), str(tmp_path / "tcp6")], [str(garbled)]):
            assert portcheck.check_addresses([("--listen", ("127.0.0.1", port))], tables) is None
    assert f"cannot parse {garbled}" in caplog.text


# -- rawsse serve -------------------------------------------------------------------------------

def serve(*flags: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rawsse", "serve", "--workers", "1", *flags],
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    return result, time.monotonic() - started


def test_serve_refuses_a_port_another_server_listens_on() -> None:
    with listening("127.0.0.1") as other:
        port = other.getsockname()[1]
        result, seconds = serve("--listen", f"127.0.0.1:{port}")
    assert result.returncode == 3, result.stderr
    assert seconds < 5
    assert result.stderr.splitlines() == [
        f"rawsse serve: --listen 127.0.0.1:{port} already has a listening socket (another "
        "rawsse?): SO_REUSEPORT would silently share the port with it; stop it or choose "
        "another --listen"]


def test_serve_refuses_an_admin_port_another_server_listens_on() -> None:
    holder, port = reserve_port()  # bound, not listening: --listen itself is fine
    with holder, listening("127.0.0.1") as other:
        admin_port = other.getsockname()[1]
        result, seconds = serve("--listen", f"127.0.0.1:{port}",
                                "--admin-listen", f"127.0.0.1:{admin_port}")
    assert result.returncode == 3, result.stderr
    assert seconds < 5
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"rawsse serve: --admin-listen 127.0.0.1:{admin_port} already has a listening socket"), \
        result.stderr
    assert lines[0].endswith("choose another --admin-listen")
