"""The load side: sizing to the machine's limits, the ``rawsse devices`` and ``rawsse push`` command
lines, and waiting for a server to hold a number of connections.

Limits that shape a run:
- the open-file hard limit per process (20,000 on the project's machines, not raisable): every
  process, server worker or device process, keeps ``FD_HEADROOM`` below it;
- one (source address, destination, port) tuple yields at most the ephemeral port range
  (``net.ipv4.ip_local_port_range``, 28,232 ports here), and connect() slows to a crawl past half
  of it (``PORT_FILL``): devices spread over 127.0.0.x sources.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Callable

from . import memory

# fds each process keeps free for its listener, epoll, logs, pipes and the interpreter's own.
FD_HEADROOM = 100
# SO_REUSEPORT spreads connections by a 4-tuple hash, so workers are not filled evenly: size the
# worker count for 90 % of each worker's fds (a binomial spread at 18k per worker is ±1 %, the rest
# covers a worker respawning mid-run).
WORKER_FILL = 0.9
# Use under half of the ephemeral range per source address. connect() picks a port by scanning
# from a per-destination offset over ports of one parity first (Linux __inet_hash_connect: even
# ports for connect, odd left to bind). Once the even ports of a (source, destination) pair are
# taken, every further connect walks all ~14k of them before trying an odd one: the device
# processes went to 100 % system CPU and the ramp stalled at 14.1k connections per source
# (3 sources stalled at 42.6k, 12 at 169k = 12 x 14.1k, here). At 45 % fill 6 sources took 70k
# at 4,000/s without a stall.
PORT_FILL = 0.45


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def per_process_sockets() -> int:
    """Sockets one process may hold: hard limit minus headroom (~19,900 here)."""
    return max(1000, fd_limit() - FD_HEADROOM)


def workers_for(streams: int) -> int:
    return max(1, math.ceil(streams / (per_process_sockets() * WORKER_FILL)))


def device_processes_for(streams: int) -> int:
    return max(1, math.ceil(streams / per_process_sockets()))


def ephemeral_ports() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_000


def source_addresses_for(streams: int) -> list[str]:
    """127.0.0.2, 127.0.0.3, ...: enough loopback sources that no tuple runs out of ports."""
    count = max(1, math.ceil(streams / (ephemeral_ports() * PORT_FILL)))
    return [f"127.0.0.{2 + i}" for i in range(count)]


def devices_argv(url: str, count: int, report: str, duration: float, ramp: float = 0.0,
                 first: int = 0) -> list[str]:
    """``rawsse devices`` holding ``count`` Fleet-scheme tokens from index ``first``; ``ramp`` is
    connects per second for all its processes together, 0 = as fast as they can."""
    return [sys.executable, "-m", "rawsse", "devices", "--url", url, "--count", str(count),
            "--token-scheme", "fleet", "--token-start", str(first), "--ramp", f"{ramp:g}",
            "--processes", str(device_processes_for(count)),
            "--source-addresses", str(len(source_addresses_for(count))),
            "--duration", f"{duration:g}", "--report", report]


def push_argv(url: str, count: int, tokens: int, report: str, senders: int = 5,
              pipeline: int = 1, max_time: float = 60.0) -> list[str]:
    """``rawsse push`` sending ``count`` targeted pushes cycling over Fleet-scheme devices
    0..tokens-1 (the range is inclusive), ended by ``--max-time`` at the latest."""
    return [sys.executable, "-m", "rawsse", "push", "--url", url,
            "--tokens", f"fleet:0-{tokens - 1}", "--senders", str(senders),
            "--pipeline", str(pipeline), "--count", str(count), "--max-time", f"{max_time:g}",
            "--report", report, "--quiet"]


def held_connections(server_pids: list[int], base_fds: int) -> int:
    """Connections the server holds: its processes' open fds above what they had idle. Works for
    any worker layout and either server, and costs one stat per process."""
    return max(0, memory.open_fds(server_pids) - base_fds)


def wait_for_connections(server_pids: list[int], base_fds: int, target: int, timeout: float,
                         stall: float = 20.0, alive: Callable[[], bool] = lambda: True,
                         poll: float = 0.02) -> int:
    """Poll until the server holds ``target`` connections; give up after ``timeout`` or when the
    count has not grown for ``stall`` seconds or ``alive()`` turns false. Returns the count."""
    deadline = time.monotonic() + timeout
    best, best_at = -1, time.monotonic()
    while True:
        held = held_connections(server_pids, base_fds)
        now = time.monotonic()
        if held >= target or now > deadline or not alive():
            return held
        if held > best:
            best, best_at = held, now
        elif now - best_at > stall:
            return held
        time.sleep(poll)


def wait_settled(server_pids: list[int], base_fds: int, quiet: float = 0.3,
                 timeout: float = 5.0) -> int:
    """Wait until the held count stops moving for ``quiet`` seconds (connects in flight land)."""
    deadline = time.monotonic() + timeout
    last, since = held_connections(server_pids, base_fds), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        held = held_connections(server_pids, base_fds)
        if held != last:
            last, since = held, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def wait_fds_steady(server_pids: list[int], quiet: float = 0.5, timeout: float = 30.0) -> int:
    """Wait until the server's open fds stop changing for ``quiet`` seconds (streams of devices
    that just exited are still being closed); returns that count, the base for the next phase.
    Not "back to the idle count": a server may open fds of its own on first use (rawsse's
    workers do), so the idle count is not a floor one can wait for."""
    deadline = time.monotonic() + timeout
    last, since = memory.open_fds(server_pids), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        fds = memory.open_fds(server_pids)
        if fds != last:
            last, since = fds, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last
