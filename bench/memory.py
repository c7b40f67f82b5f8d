"""Memory per connection: process samples (psutil), kernel samples (/proc), and the slope fit.

Method: take samples at several connection levels and report the slope of a
least-squares line (bytes per additional connection), never total/N, which would hide the fixed
interpreter baseline (~14-23 MB per process).

- User space, summed over the server's master and workers (``/proc/PID/smaps_rollup``):
  RSS, the headline figure; for one process it is the honest one. With forked workers each sum is
  biased by copy-on-write: when a worker writes to a page it shares with the master, physical
  memory grows by one page, the RSS sum by nothing, the USS sum by two (the copy is private to the
  worker and the original now private to the master), and the PSS sum by exactly one. But PSS
  also counts file pages (the interpreter, shared libraries) shared with *other* processes, and
  the devices are Python processes too: each one started takes a share of those pages off the
  server's PSS (measured: PSS slope 1.2 KB vs USS 1.57 KB for one run). Anonymous PSS
  (``Pss_Anon``) has neither bias: anonymous pages are shared only within the fork tree. It is
  the figure to read for several workers; the others are kept.
- Kernel: socket memory is not in RSS at all. ``/proc/slabinfo`` active objects x object size for
  the caches a TCP socket takes (measured on kernel 6.18: TCP 2368 B, sock_inode_cache 832, dentry
  192, filp 192, lsm_* ~56, eventpoll_epi 128 per epoll registration), ``/proc/meminfo`` Slab (adds
  slab fragmentation) and ``/proc/net/sockstat`` ``mem`` (pages charged for queued data; ~0 when
  idle, about one page per socket holding any unread bytes, tcp(7) tcp_mem).
  The kernel figures are system-wide and this machine is shared: other processes open and close
  thousands of sockets during a run (a first version that fitted slab bytes against the bench's
  own connection count read 1.5 KB of TCP slab per server socket for one variant and 2.4 KB
  for the next, in the same run). So each cache is fitted against the number of TCP sockets allocated system-wide
  (``/proc/net/sockstat`` ``TCP alloc``), which moves with every process's sockets, ours and
  theirs alike: the slope is bytes per TCP socket. On loopback both ends of a connection live in
  this kernel and take the same objects (the devices tool registers its sockets in epoll too), so
  that is the cost of one server socket. ``tcp_sockets_per_connection`` (≈ 2 when no one else
  was busy) says how much churn there was.
  SLUB's ``active_objs`` counts objects still sitting free in per-CPU slabs as active, so a cache
  with churn (``eventpoll_epi``, ``dentry``) reads up to a slab's worth high; treat its figure as
  ± one object.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import psutil

# The slab caches one established, epoll-registered TCP socket takes (the ones /proc/slabinfo
# shows growing as 9,000 loopback pairs are opened and registered, kernel 6.18).
SOCKET_CACHES = ("TCP", "sock_inode_cache", "dentry", "filp", "eventpoll_epi",
                 "lsm_file_cache", "lsm_inode_cache")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass
class ProcessMemory:
    """Sums over a process tree, in bytes."""

    rss: int
    uss: int
    pss: int
    anon_pss: int
    processes: int
    fds: int


@dataclasses.dataclass
class KernelMemory:
    """System-wide kernel figures, in bytes (``sockstat_mem`` too, converted from pages)."""

    caches: dict[str, int]
    slab_total: int
    sockstat_mem: int
    tcp_inuse: int
    tcp_alloc: int


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


def smaps_rollup(pid: int) -> tuple[int, int, int, int]:
    """(RSS, USS, PSS, anonymous PSS) in bytes from ``/proc/PID/smaps_rollup``: one small read
    however large the process. psutil's ``memory_full_info()`` walks every mapping in ``smaps``
    and, on this kernel, gave a USS 4 MB below the rollup's Private_Clean + Private_Dirty for the
    same process, so the kernel's own sums are used (psutil only where the rollup is missing)."""
    values = {b"Rss:": 0, b"Pss:": 0, b"Pss_Anon:": 0, b"Private_Clean:": 0, b"Private_Dirty:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b" ")
                if key in values:
                    values[key] = int(rest.split()[0]) * 1024
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessLookupError(pid) from None
        info = psutil.Process(pid).memory_full_info()
        return info.rss, info.uss, info.pss, info.uss
    return (values[b"Rss:"], values[b"Private_Clean:"] + values[b"Private_Dirty:"],
            values[b"Pss:"], values[b"Pss_Anon:"])


def count_fds(pid: int) -> int:
    """Open fds of ``pid`` from ``stat("/proc/PID/fd").st_size`` (Linux ≥ 6.2: the count, read
    from the fd bitmap). Listing the directory instead (psutil's ``num_fds()``) costs a readdir
    over every fd and instantiates a /proc dentry and inode per fd: polled at 300k connections it
    took 40 % of a core, and it grew the very ``dentry`` slab being measured by one object per
    socket. The listing is the fallback for older kernels, where ``st_size`` is 0."""
    try:
        size = os.stat(f"/proc/{pid}/fd").st_size
        return size if size > 0 else len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def process_memory(pids: list[int]) -> ProcessMemory:
    """RSS/USS/PSS/anon PSS and open fds summed over ``pids``; skips processes that exit meanwhile."""
    total = ProcessMemory(0, 0, 0, 0, 0, 0)
    for pid in pids:
        try:
            rss, uss, pss, anon_pss = smaps_rollup(pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
        total.rss += rss
        total.uss += uss
        total.pss += pss
        total.anon_pss += anon_pss
        total.fds += count_fds(pid)
        total.processes += 1
    return total


def open_fds(pids: list[int]) -> int:
    """Open file descriptors over ``pids``: one stat each, cheap enough to poll every 20 ms.
    Used to count the connections a server holds, whatever its worker layout."""
    return sum(count_fds(pid) for pid in pids)


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds consumed so far over ``pids`` (live processes only).

    From ``/proc/PID/task/TID/schedstat`` (nanoseconds on CPU, user and system together, summed
    over threads): psutil's ``cpu_times()`` counts in 10 ms clock ticks, which in a 3,000-push run
    is 3.3 µs per push of quantisation. psutil where schedstat is missing."""
    total = 0.0
    for pid in pids:
        try:
            total += sum(task_cpu_ns(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def task_cpu_ns(pid: int, tid: str) -> int:
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


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


def read_sockstat_tcp() -> dict[str, int]:
    """The ``TCP:`` line of ``/proc/net/sockstat``: inuse, orphan, tw, alloc, mem (pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return dict(zip(fields[1::2], map(int, fields[2::2])))
    return {}


def sockstat_resolution() -> int:
    """Bytes by which ``sockstat`` mem can be off: each CPU batches up to ``net.core.mem_pcpu_rsv``
    pages (256 by default since Linux 6.0) before adding them to the global count it shows."""
    try:
        with open("/proc/sys/net/core/mem_pcpu_rsv") as f:
            pages = int(f.read())
    except (OSError, ValueError):
        return 0
    return pages * PAGE_SIZE * (os.cpu_count() or 1)


def kernel_memory() -> KernelMemory:
    tcp = read_sockstat_tcp()
    return KernelMemory(read_slab_caches(), read_meminfo_slab(), tcp.get("mem", 0) * PAGE_SIZE,
                        tcp.get("inuse", 0), tcp.get("alloc", 0))


def sample(pids: list[int], connections: int) -> Sample:
    return Sample(connections, process_memory(pids), kernel_memory())


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
    """Bytes per stream (user memory, fitted against the server's connections) and bytes per
    server socket (kernel caches, fitted against the system's TCP sockets, see the module doc).

    ``sockstat`` mem is not fitted: samples are taken with the devices paused, so the streams that
    connected last still hold their unread preamble (a page each); ``variant.py``
    reads it once the devices have read everything instead.
    """
    conns = [float(s.connections) for s in samples]
    sockets = [float(s.kernel.tcp_alloc) for s in samples]

    def fitted(xs: list[float], values: list[float]) -> dict[str, float]:
        line = fit_line(xs, values)
        return {"bytes_per_conn": line.slope, "r2": line.r2, "intercept_bytes": line.intercept}

    caches = list(samples[0].kernel.caches) if samples else []
    per_socket = {name: fitted(sockets, [s.kernel.caches.get(name, 0) for s in samples])
                  for name in caches}
    # The same caches fitted against our own connections and halved: what the fit would say if no
    # other process touched a socket meanwhile; kept to show how much the noise moved it.
    per_pair = {name: fitted(conns, [s.kernel.caches.get(name, 0) for s in samples])
                for name in caches}
    return {
        "rss": fitted(conns, [s.process.rss for s in samples]),
        "uss": fitted(conns, [s.process.uss for s in samples]),
        "pss": fitted(conns, [s.process.pss for s in samples]),
        "anon_pss": fitted(conns, [s.process.anon_pss for s in samples]),
        "slab_total": fitted(sockets, [s.kernel.slab_total for s in samples]),
        "caches": {name: f["bytes_per_conn"] for name, f in per_socket.items()},
        "caches_r2": {name: f["r2"] for name, f in per_socket.items()},
        "socket_caches_total": sum(f["bytes_per_conn"] for f in per_socket.values()),
        "socket_caches_total_vs_own_connections_halved":
            sum(f["bytes_per_conn"] for f in per_pair.values()) / 2,
        "tcp_sockets_per_connection": fit_line(conns, sockets).slope,
    }
