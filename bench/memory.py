"""Memory per connection: process samples (psutil), kernel samples (/proc), and the slope fit.

Method (ops.md §5.2 and §2.5): take samples at several connection levels and report the slope of a
least-squares line (bytes per additional connection), never total/N, which would hide the fixed
interpreter baseline (~14-23 MB per process).

- User space: RSS, USS and PSS summed over the server's master and workers. RSS double-counts the
  copy-on-write pages that forked workers share, so for several workers USS (private pages) and
  PSS (shared pages split among sharers) are the honest sums; for one process the three agree on
  the slope.
- Kernel: socket memory is not in RSS at all. ``/proc/slabinfo`` active objects x object size for the
  caches a TCP socket takes (ops.md §2.5: TCP 2368 B, sock_inode_cache 832, dentry 192, filp 192,
  lsm_* ~56, eventpoll_epi 128 per epoll registration), ``/proc/meminfo`` Slab (adds slab
  fragmentation) and ``/proc/net/sockstat`` ``mem`` (pages charged for queued data; ~0 when idle,
  about one page per socket holding any unread bytes, ops.md §2.2).
  On loopback both ends of every connection live in this kernel and take the same objects (the
  devices tool also registers its sockets in epoll), so a cache's slope per connection is halved
  to give the cost per server socket. The machine is shared, so these deltas carry other
  processes' noise; the fit over several levels is what keeps it small.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import psutil

# The slab caches one established, epoll-registered TCP socket takes (ops.md §2.5).
SOCKET_CACHES = ("TCP", "sock_inode_cache", "dentry", "filp", "eventpoll_epi",
                 "lsm_file_cache", "lsm_inode_cache")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass
class ProcessMemory:
    """Sums over a process tree, in bytes."""

    rss: int
    uss: int
    pss: int
    processes: int
    fds: int


@dataclasses.dataclass
class KernelMemory:
    """System-wide kernel figures, in bytes (``sockstat_mem`` too, converted from pages)."""

    caches: dict[str, int]
    slab_total: int
    sockstat_mem: int
    tcp_inuse: int


@dataclasses.dataclass
class Sample:
    """One measurement at one connection level."""

    connections: int
    process: ProcessMemory
    kernel: KernelMemory

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Fit:
    """``y = intercept + slope * x`` over the samples; ``r2`` says how straight the line is."""

    slope: float
    intercept: float
    r2: float
    points: int


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (a prefork master and its workers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def smaps_rollup(pid: int) -> tuple[int, int, int]:
    """(RSS, USS, PSS) in bytes from ``/proc/PID/smaps_rollup``: one small read however large the
    process. psutil's ``memory_full_info()`` walks every mapping in ``smaps`` and, on this kernel,
    gave a USS 4 MB below the rollup's Private_Clean + Private_Dirty for the same process, so the
    kernel's own sums are used and psutil only where the rollup is missing (kernels < 4.14)."""
    rss = uss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    uss += int(line.split()[1]) * 1024
    except FileNotFoundError:
        info = psutil.Process(pid).memory_full_info()
        return info.rss, info.uss, info.pss
    return rss, uss, pss


def process_memory(pid: int) -> ProcessMemory:
    """RSS/USS/PSS and open fds summed over ``pid``'s tree. Skips processes that exit meanwhile."""
    rss = uss = pss = fds = count = 0
    for proc in tree(pid):
        try:
            proc_rss, proc_uss, proc_pss = smaps_rollup(proc.pid)
            fds += proc.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue
        rss, uss, pss, count = rss + proc_rss, uss + proc_uss, pss + proc_pss, count + 1
    return ProcessMemory(rss, uss, pss, count, fds)


def open_fds(pid: int) -> int:
    """Open file descriptors over ``pid``'s tree: cheap (a readdir per process), used to count the
    connections a server holds whatever its worker layout."""
    total = 0
    for proc in tree(pid):
        try:
            total += proc.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds over ``pid``'s tree (live processes only)."""
    total = 0.0
    for proc in tree(pid):
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system
    return total


def read_slab_caches(names: Iterable[str] = SOCKET_CACHES) -> dict[str, int]:
    """Bytes held by each named cache: active objects x object size. Needs root (0400 file)."""
    wanted = set(names)
    found = {name: 0 for name in wanted}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    found[fields[0]] = int(fields[1]) * int(fields[3])
    except PermissionError:
        return {}
    return found


def read_meminfo_slab() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    return 0


def read_sockstat() -> tuple[int, int]:
    """(TCP inuse sockets, TCP mem in bytes) from ``/proc/net/sockstat``."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                values = dict(zip(fields[1::2], map(int, fields[2::2])))
                return values.get("inuse", 0), values.get("mem", 0) * PAGE_SIZE
    return 0, 0


def kernel_memory() -> KernelMemory:
    inuse, mem = read_sockstat()
    return KernelMemory(read_slab_caches(), read_meminfo_slab(), mem, inuse)


def sample(pid: int, connections: int) -> Sample:
    return Sample(connections, process_memory(pid), kernel_memory())


def fit_line(xs: list[float], ys: list[float]) -> Fit:
    """Ordinary least squares. Fewer than two distinct x values → slope 0."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return Fit(0.0, ys[0] if ys else 0.0, 0.0, n)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return Fit(slope, intercept, r2, n)


def slopes(samples: list[Sample]) -> dict[str, object]:
    """Bytes per connection for every measured quantity, fitted over ``samples``.

    Kernel figures are per server socket: the per-connection slope halved, since each loopback
    connection puts two sockets (server's and device's) into the same caches.
    """
    xs = [float(s.connections) for s in samples]

    def fitted(values: list[float], scale: float = 1.0) -> dict[str, float]:
        line = fit_line(xs, values)
        return {"bytes_per_conn": line.slope * scale, "r2": line.r2,
                "intercept_bytes": line.intercept * scale}

    result: dict[str, object] = {
        "rss": fitted([s.process.rss for s in samples]),
        "uss": fitted([s.process.uss for s in samples]),
        "pss": fitted([s.process.pss for s in samples]),
        "slab_total": fitted([s.kernel.slab_total for s in samples], 0.5),
        "sockstat_mem": fitted([s.kernel.sockstat_mem for s in samples], 0.5),
    }
    caches = samples[0].kernel.caches.keys() if samples else ()
    per_cache = {name: fitted([s.kernel.caches.get(name, 0) for s in samples], 0.5)["bytes_per_conn"]
                 for name in caches}
    result["caches"] = per_cache
    result["socket_caches_total"] = sum(per_cache.values())
    return result
