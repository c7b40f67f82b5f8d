"""Refuse to start ``rawsse serve`` where a socket already listens on the port it would serve.

Why: every worker binds the listen port with ``SO_REUSEPORT`` (``worker.bind_listener``), which
is how the workers share one port. But Linux lets *any* socket that also sets ``SO_REUSEPORT``
and belongs to the same effective UID bind the same address and port, and then hashes incoming
connections over every listener in that group. So a second rawsse started by mistake on the port
of a running one does not fail with "address in use": it quietly takes a share of the
connections. Devices land on one server, pushes on the other, and the pushes are stored as
pending instead of delivered, with no error anywhere.

So the master, before it forks any worker, looks for a socket in LISTEN state whose address
overlaps one it is about to serve, and stops with one line if there is one (``serve.run``):

- It reads the kernel's socket tables, ``/proc/net/tcp`` and ``/proc/net/tcp6``, instead of
  connecting to the port: a probe would be accepted and logged by the other server, and being
  accepted says nothing about whether it shares the port. The tables list every socket of this
  network namespace whatever its owner, without privileges (per-process socket owners, as psutil
  reports them, need root for other users' processes).
- A socket that is bound but not listening takes no connections, so it does not count (the test
  suite holds its ports that way: ``tests/conftest.py`` ``reserve_port``).
- Only the master checks, never a worker: during a HUP rolling restart a new worker binds while
  the old ones still listen, which is the point of ``SO_REUSEPORT``.
- It is advice, not a lock: a listener that appears between the check and the workers' bind is
  not seen. If the tables cannot be read the check is skipped (logged at debug; a format this
  parser does not know, at warning), never fatal.

The tables show listeners only; a port can be unusable for other reasons (a client connection
bound to it, an address not on this host, a privileged port). So the master then binds each
address once itself, with the workers' options (``bind_listener``), and closes it
(``bind_refusal``): the failure is one line naming the flag and the address, before any worker
exists, instead of every worker failing with a bare ``[Errno 98]``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from typing import Iterable, NamedTuple, Sequence

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10, printed as %02X


class Listener(NamedTuple):
    """One LISTEN row of /proc/net/tcp{,6}."""

    address: IPAddress
    port: int
    uid: int
    inode: int


# -- parsing /proc/net/tcp{,6} ------------------------------------------------------------------

def decode_address(hex_text: str) -> IPAddress:
    """The address part of a ``local_address`` column.

    The kernel prints the address as 32-bit words, each read from the network-order bytes as a
    native integer and printed with ``%08X`` (so ``127.0.0.1`` is ``0100007F`` on x86). Packing
    each word back as a native integer restores the original bytes on any byte order. An IPv4
    address mapped into IPv6 (``::ffff:127.0.0.1``, a v6 socket bound to a v4 address) is
    returned as the IPv4 address it serves.
    """
    if len(hex_text) not in (8, 32):
        raise ValueError(f"{hex_text!r} is not an 8 or 32 hex digit address")
    words = [int(hex_text[i:i + 8], 16) for i in range(0, len(hex_text), 8)]
    address = ipaddress.ip_address(struct.pack(f"={len(words)}I", *words))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_table(text: str) -> list[Listener]:
    """The LISTEN sockets of one /proc/net/tcp or tcp6 text; every other state is skipped."""
    listeners = []
    for line in text.splitlines()[1:]:  # the first line is the column header
        # Split only as far as the state first: a busy node lists 100,000s of connections.
        head = line.split(None, 4)
        if len(head) < 5 or head[3] != TCP_LISTEN:
            continue
        fields = line.split()
        address, _, port = fields[1].partition(":")
        listeners.append(Listener(decode_address(address), int(port, 16), int(fields[7]),
                                  int(fields[9])))
    return listeners


def read_listeners(paths: Sequence[str] = PROC_TABLES) -> list[Listener] | None:
    """Every LISTEN socket of this network namespace; None when no table could be read.

    A missing tcp6 alone is normal (IPv6 disabled); its listeners then cannot exist anyway. A
    table that cannot be read or parsed is skipped: the check must never stop a start by itself.
    """
    listeners: list[Listener] = []
    read_any = False
    for path in paths:
        try:
            with open(path) as table:
                text = table.read()
        except OSError as exc:
            log.debug("port check: cannot read %s: %s", path, exc)
            continue
        try:
            listeners += parse_table(text)
        except (ValueError, IndexError) as exc:  # a format this parser does not know
            log.warning("port check: cannot parse %s (%s); not checked", path, exc)
            continue
        read_any = True
    return listeners if read_any else None


# -- overlap ------------------------------------------------------------------------------------

def overlaps(wanted: IPAddress, existing: IPAddress) -> bool:
    """Would a listener on ``wanted`` share connections with one on ``existing`` (same port)?

    Same address, or either side the wildcard of its family. ``::`` counts as overlapping every
    address: an IPv6 wildcard socket without IPV6_V6ONLY (Linux's default) also accepts IPv4,
    and the tables do not say whether a socket set it.
    """
    if any(a.version == 6 and a.is_unspecified for a in (wanted, existing)):
        return True
    if wanted.version != existing.version:
        return False
    return wanted == existing or wanted.is_unspecified or existing.is_unspecified


def resolve(host: str, port: int) -> IPAddress | None:
    """The address ``bind_listener`` would bind for ``host`` (same family rule), or None when
    the name does not resolve: the workers' bind then reports that error itself."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])  # a scope id does not change overlap
    except ValueError:
        pass
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except OSError as exc:
        log.debug("port check: cannot resolve %s: %s", host, exc)
        return None
    if not infos:
        return None
    host_text = str(infos[0][4][0])  # an AF_INET/AF_INET6 sockaddr starts with the host text
    return ipaddress.ip_address(host_text.partition("%")[0])


def find_overlap(wanted: IPAddress, port: int,
                 listeners: Iterable[Listener]) -> Listener | None:
    for listener in listeners:
        if listener.port == port and overlaps(wanted, listener.address):
            return listener
    return None


# -- the check ----------------------------------------------------------------------------------

def show(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def conflict_message(flag: str, wanted: IPAddress, port: int, existing: Listener) -> str:
    target = show(wanted, port)
    if existing.address == wanted:
        where = f"{target} already has a listening socket"
    else:
        where = f"{target} overlaps a socket listening on {show(existing.address, existing.port)}"
    return (f"{flag} {where} (another rawsse?): SO_REUSEPORT would silently share the port with "
            f"it; stop it or choose another {flag}")


def check_addresses(addresses: Iterable[tuple[str, tuple[str, int] | None]],
                    paths: Sequence[str] = PROC_TABLES) -> str | None:
    """``[(flag, (host, port) or None), ...]`` → the one-line refusal for the first address
    that overlaps a listening socket, or None to go ahead."""
    wanted = [(flag, address) for flag, address in addresses if address and address[1] != 0]
    if not wanted:
        return None  # port 0: the kernel picks a free port, nothing can overlap
    listeners = read_listeners(paths)
    if listeners is None:
        log.debug("port check skipped: no socket table readable in %s", ", ".join(paths))
        return None
    for flag, (host, port) in wanted:
        address = resolve(host, port)
        if address is None:
            continue
        existing = find_overlap(address, port, listeners)
        if existing is not None:
            return conflict_message(flag, address, port, existing)
    return None


_BIND_HINTS = {
    errno.EADDRINUSE: "a client connection or a program without SO_REUSEPORT holds the port "
                      "(ss -tanp shows which)",
    errno.EADDRNOTAVAIL: "this host has no such address",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
}


def bind_refusal(addresses: Iterable[tuple[str, tuple[str, int] | None]], backlog: int) -> str | None:
    """Bind and listen on each address as a worker will, then close: the one-line refusal for
    the first that fails, or None. Port 0 is skipped (each bind would get another port)."""
    from rawsse.server.listener import bind_listener

    for flag, address in addresses:
        if not address or address[1] == 0:
            continue
        try:
            bind_listener(address, backlog).close()
        except OSError as exc:
            host, port = address
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = exc.strerror or str(exc)
            hint = _BIND_HINTS.get(exc.errno or 0)
            return (f"{flag} {shown}: cannot listen: {reason}" + (f": {hint}" if hint else "")
                    + f"; choose another {flag}")
    return None
