"""``rawsse tune``: is this VM tuned for N connections, and if not, what to change.

Theory of operation
-------------------
1. ``read_host()`` takes one snapshot of the live values: the sysctls below from ``/proc/sys``,
   this process's ``RLIMIT_NOFILE``, ``/proc/meminfo``.
2. ``evaluate(host, n, role)`` runs pure checks on that snapshot; each returns a ``Row`` (setting,
   current, needed for N, ok/LOW/info, hint). Nothing here reads the system, so tests can evaluate
   a sysctl.d file's values the same way.
3. ``--apply`` (root) writes each LOW sysctl's needed value to ``/proc/sys``, never lowering a
   value, prints ``old -> new``, then checks again. It does not persist: the sysctl.d files in
   ``tune/`` do.

Rules
-----
- Exit 0 when nothing is LOW, 1 when something is, 2 for a usage error or ``--apply`` without root.
- ``RLIMIT_NOFILE`` below N is not LOW by itself: the server spreads streams over worker processes
  (and ``rawsse devices`` over ``--processes``), each holding at most ``limit - 100`` fds. The
  check reports how many processes N needs at the current limit, and is LOW only when a process
  cannot hold even ``MIN_FDS_PER_PROCESS``.
- The limit read here is the one of the calling process. Under systemd the unit's
  ``LimitNOFILE=1048576`` applies instead (the units run this check as ``ExecStartPre``, so the
  journal shows the service's real limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
from typing import Callable, Mapping

from rawsse.config import ConfigError
from rawsse.load.loadgen import MAX_PORTS_PER_SOURCE, PORT_RANGE_SHARE

PROC_SYS = "/proc/sys"
MEMINFO = "/proc/meminfo"

# --- Measured costs (a 2-vCPU, 24 GiB VM: kernel 6.18, x86_64, CPython 3.11) --------------------
# /proc/meminfo Slab grew ~4.3 KB per idle established socket (9,000 loopback pairs, two runs
# within 5%); the slab objects alone are ~3.7 KB (/proc/slabinfo), the rest is fragmentation.
# `python bench/run.py` on the real server: 4.0 KB of socket caches, 4.6 KB of Slab per server
# socket (bench/results/final-18k.md).
KERNEL_BYTES_PER_SOCKET = 4300
# Target for rawsse serve's Python side; a raw epoll + __slots__ prototype measured 0.27-0.37 KB
# (RSS growth over 15,000 idle connections). `python bench/run.py` measures the real server:
# 235-285 B per stream (RSS and anonymous PSS slopes, bench/results/final-18k.md and full.md).
SERVER_USER_BYTES_PER_STREAM = 400
# rawsse devices keeps a parser and counters per device: an estimate, not measured yet.
DEVICE_USER_BYTES_PER_STREAM = 1000
# Any socket holding queued data (even 256 B) is charged about one page in tcp_mem accounting:
# 9,000 sockets with 256 B unread -> /proc/net/sockstat "mem 8960".
PAGE_BYTES = 4096
# Interpreter + modules per process: 14-23 MB measured (RSS of idle server processes); rounded up.
PROCESS_BASELINE_BYTES = 25 * 1024 * 1024
# fds a worker keeps for itself (listeners, socketpairs to siblings, logs, state file).
FDS_RESERVED_PER_PROCESS = 100
# Below this per process, 300k streams would need hundreds of processes: treat as broken.
MIN_FDS_PER_PROCESS = 1000
# The units' LimitNOFILE; systemd clamps it to fs.nr_open.
UNIT_LIMIT_NOFILE = 1048576
# Up to this many connections the kernel's defaults for backlogs and TIME_WAIT reuse are enough:
# a whole-fleet reconnect fits in the default 4096 accept backlog within the clients' backoff.
SMALL_FLEET = 10_000
# Devices per source address: rawsse devices plans on PORT_RANGE_SHARE of the ephemeral range,
# at most MAX_PORTS_PER_SOURCE (connect() slows as the range fills, and reconnects need room
# while old sockets sit in TIME_WAIT). Imported so this check and the tool never disagree.
# tune/99-rawsse-devices.conf widens the range to WIDE_PORT_RANGE: 64,512 ports per address.
WIDE_PORT_RANGE = (1024, 65535)

SERVER, DEVICES = "server", "devices"
OK, LOW, INFO = "ok", "LOW", "info"

SYSCTLS = (
    "fs.file-max", "fs.file-nr", "fs.nr_open", "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog", "net.core.netdev_max_backlog", "net.ipv4.tcp_mem",
    "net.ipv4.tcp_migrate_req", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_count",
)

EPILOG = """\
examples:
  rawsse tune --check --connections 300000                  # server VM
  rawsse tune --check --connections 300000 --role devices   # load-generator VM
  sudo rawsse tune --apply --connections 300000             # raise what is LOW (until reboot)

Exit status: 0 all ok, 1 something LOW, 2 usage error or --apply without root.
To persist, install tune/99-rawsse-server.conf or tune/99-rawsse-devices.conf in /etc/sysctl.d/.
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """A snapshot of the live values the checks need."""

    sysctls: Mapping[str, str]     # dotted name -> text as /proc/sys shows it; absent keys missing
    nofile: tuple[int, int]        # RLIMIT_NOFILE (soft, hard)
    mem_total: int                 # bytes
    mem_available: int             # bytes

    def number(self, name: str) -> int | None:
        text = self.sysctls.get(name)
        return int(text.split()[0]) if text else None

    def numbers(self, name: str) -> list[int] | None:
        text = self.sysctls.get(name)
        return [int(part) for part in text.split()] if text else None


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the report; ``write`` is the sysctl value ``--apply`` sets when LOW."""

    setting: str
    current: str
    needed: str
    status: str
    hint: str = ""
    write: str | None = None


# --- Reading the live system ----------------------------------------------------------------------

def sysctl_path(name: str) -> str:
    return os.path.join(PROC_SYS, *name.split("."))


def read_sysctl(name: str) -> str | None:
    """The value as text with runs of whitespace collapsed; None if the key does not exist."""
    try:
        with open(sysctl_path(name)) as f:
            return " ".join(f.read().split())
    except OSError:
        return None  # absent (module not loaded, older kernel) or hidden


def read_meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (the file says kB, meaning KiB)."""
    values: dict[str, int] = {}
    with open(MEMINFO) as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


def read_nofile() -> tuple[int, int]:
    """RLIMIT_NOFILE (soft, hard); RLIM_INFINITY (-1) stands for "at most fs.nr_open"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = UNIT_LIMIT_NOFILE
    return (unlimited if soft == resource.RLIM_INFINITY else soft,
            unlimited if hard == resource.RLIM_INFINITY else hard)


def read_host() -> Host:
    """Snapshot the live values. Run it before the fleet connects: MemAvailable already excludes
    what connected streams use."""
    present = {name: value for name in SYSCTLS if (value := read_sysctl(name)) is not None}
    meminfo = read_meminfo()
    return Host(sysctls=present, nofile=read_nofile(),
                mem_total=meminfo["MemTotal"],
                mem_available=meminfo.get("MemAvailable", meminfo["MemFree"]))


# --- Small helpers ----------------------------------------------------------------------------

def parse_count(text: str | None) -> int:
    """``300000``, ``300_000``, ``300,000``, ``300k``, ``1M`` -> int >= 1, else ConfigError."""
    if text is None:
        raise ConfigError("--connections", "required: how many connections to size for, "
                                           "e.g. --connections 300000")
    cleaned = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(cleaned[-1:], 1)
    digits = cleaned[:-1] if scale > 1 else cleaned
    if not digits.lstrip("-").isdigit():
        raise ConfigError("--connections", f"{text!r} is not a whole number (e.g. 300000 or 300k)")
    value = int(digits) * scale
    if value < 1:
        raise ConfigError("--connections", f"{text!r}: must be at least 1 connection")
    return value


def human_bytes(count: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def per_process(limit: int) -> int:
    """Streams one process can hold under an fd limit."""
    return max(limit - FDS_RESERVED_PER_PROCESS, 0)


def processes_needed(n: int, limit: int) -> int:
    share = per_process(limit)
    return math.ceil(n / share) if share else n


def at_least(host: Host, name: str, needed: int | None, hint: str) -> Row:
    """Row for an integer sysctl that must be >= needed (None: any value is fine at this N)."""
    current = host.number(name)
    if current is None:
        return Row(name, "absent", "-" if needed is None else f">= {needed}", INFO,
                   f"not available on this kernel; {hint}")
    if needed is None:
        return Row(name, str(current), f"any (N <= {SMALL_FLEET:,})", OK)
    status = OK if current >= needed else LOW
    return Row(name, str(current), f">= {needed}", status, hint, str(needed))


def for_large_fleet(n: int, value: int) -> int | None:
    return value if n > SMALL_FLEET else None


# --- Checks: each (host, n) -> Row, no I/O ------------------------------------------------

def check_file_max(host: Host, n: int) -> Row:
    # One fd per connection, +10% for push senders and reconnects that overlap the old socket,
    # +10k for the rest of the system; ENFILE otherwise.
    row = at_least(host, "fs.file-max", n + n // 10 + 10_000,
                   "system-wide open files; ENFILE when exceeded")
    in_use = host.numbers("fs.file-nr")
    if in_use and row.current != "absent":
        row = dataclasses.replace(row, current=f"{row.current} (in use {in_use[0]})")
    return row


def check_nr_open(host: Host, n: int) -> Row:
    # Caps every per-process RLIMIT_NOFILE; enough that one process could hold all N, up to the
    # units' LimitNOFILE (which systemd clamps to it).
    return at_least(host, "fs.nr_open", min(n + FDS_RESERVED_PER_PROCESS, UNIT_LIMIT_NOFILE),
                    f"caps LimitNOFILE; the units ask for {UNIT_LIMIT_NOFILE}")


def check_somaxconn(host: Host, n: int) -> Row:
    # After a restart the whole fleet reconnects within the clients' 1-30 s backoff; 65535 is
    # the largest backlog older kernels honour (kernel commit 19f92a03; listen(2)).
    return at_least(host, "net.core.somaxconn", for_large_fleet(n, 65535),
                    "caps the accept backlog: reconnect storms overflow it (TcpExtListenOverflows)")


def check_syn_backlog(host: Host, n: int) -> Row:
    return at_least(host, "net.ipv4.tcp_max_syn_backlog", for_large_fleet(n, 65535),
                    "half-open connections during a reconnect storm")


def check_netdev_backlog(host: Host, n: int) -> Row:
    return at_least(host, "net.core.netdev_max_backlog", for_large_fleet(n, 16384),
                    "per-CPU packet queue; bursts of SYNs or a broadcast overflow 1000")


def tcp_mem_needed(n: int) -> list[int]:
    """Pages: a full broadcast queues ~1 page on each of N sockets (measured). Pressure mode
    must stay above that with 50% headroom (slow readers hold more than a page, plus the push
    senders' sockets); the hard limit, where sends fail, at twice it."""
    return [n, math.ceil(n * 1.5), n * 2]


def check_tcp_mem(host: Host, n: int) -> Row:
    name = "net.ipv4.tcp_mem"
    current = host.numbers(name)
    needed = tcp_mem_needed(n)
    needed_text = f">= {needed[0]} {needed[1]} {needed[2]}"
    if current is None or len(current) != 3:
        return Row(name, "absent", needed_text, INFO, "cannot read tcp_mem")
    ok = current[1] >= needed[1] and current[2] >= needed[2]
    raised = " ".join(str(max(have, want)) for have, want in zip(current, needed))
    return Row(name, " ".join(map(str, current)), needed_text, OK if ok else LOW,
               "pages; a broadcast to N streams puts TCP into memory pressure above the middle "
               "value and fails sends above the last ('TCP: out of memory')", raised)


def check_migrate_req(host: Host, n: int) -> Row:
    # A worker that exits during a rolling restart resets connections still in its accept queue
    # unless the kernel migrates them to a sibling listener (Linux 5.14;
    # Documentation/networking/ip-sysctl.rst, tcp_migrate_req).
    name = "net.ipv4.tcp_migrate_req"
    current = host.number(name)
    if current is None:
        return Row(name, "absent", "1", INFO,
                   "kernel < 5.14: a rolling restart resets connections queued on a closing worker")
    if n <= SMALL_FLEET:
        return Row(name, str(current), f"any (N <= {SMALL_FLEET:,})", OK)
    return Row(name, str(current), "1", OK if current == 1 else LOW,
               "else a rolling restart resets connections queued on a closing worker", "1")


def check_tw_reuse(host: Host, n: int) -> Row:
    # The default 2 reuses TIME_WAIT ports for loopback only; a remote server needs 1 so device
    # reconnect loops do not wait 60 s per port.
    name = "net.ipv4.tcp_tw_reuse"
    current = host.number(name)
    if current is None:
        return Row(name, "absent", "1", INFO, "cannot read tcp_tw_reuse")
    if n <= SMALL_FLEET:
        return Row(name, str(current), f"any (N <= {SMALL_FLEET:,})", OK)
    return Row(name, str(current), "1", OK if current == 1 else LOW,
               "2 reuses TIME_WAIT ports only on loopback; reconnects to a remote server need 1",
               "1")


def port_range_width(host: Host) -> int | None:
    low_high = host.numbers("net.ipv4.ip_local_port_range")
    return low_high[1] - low_high[0] + 1 if low_high and len(low_high) == 2 else None


def devices_per_source(width: int) -> int:
    """The same rule as ``rawsse devices --source-addresses auto``."""
    return max(min(MAX_PORTS_PER_SOURCE, int(width * PORT_RANGE_SHARE)), 1)


def check_port_range(host: Host, n: int) -> Row:
    # LOW when one address could carry more devices with a wider range: widening is one sysctl,
    # while every extra source address must be configured.
    name = "net.ipv4.ip_local_port_range"
    width = port_range_width(host)
    if width is None:
        return Row(name, "absent", "-", INFO, "cannot read the ephemeral port range")
    needed = math.ceil(min(n, MAX_PORTS_PER_SOURCE) / PORT_RANGE_SHARE)
    low, high = host.numbers(name) or [0, 0]
    widened = f"{min(low, WIDE_PORT_RANGE[0])} {max(high, WIDE_PORT_RANGE[1])}"
    return Row(name, f"{low} {high} ({width} ports)", f">= {needed} ports",
               OK if width >= needed else LOW,
               f"ports per source address; widen to {WIDE_PORT_RANGE[0]} {WIDE_PORT_RANGE[1]}",
               widened)


def check_source_addresses(host: Host, n: int) -> Row:
    """How many source addresses the fleet needs: one (src, dst, dst port) tuple carries one
    connection per ephemeral port."""
    usable = devices_per_source(port_range_width(host) or 1)
    count = math.ceil(n / usable)
    last = f"127.0.0.{count + 1}" if count < 254 else "..."
    return Row("source addresses", "-", f"{count} ({usable} devices each)", INFO,
               f"rawsse devices --source-addresses with {count} address(es): "
               f"127.0.0.2-{last} for a server on this VM, else addresses on this VM's interface")


def check_conntrack(host: Host, n: int) -> Row:
    # Only if nf_conntrack is loaded (iptables/nftables/Docker): one entry per connection, and a
    # full table drops packets ("nf_conntrack: table full";
    # Documentation/networking/nf_conntrack-sysctl.rst). 1.5x N leaves room for connections
    # still closing and for the host's other traffic.
    name = "net.netfilter.nf_conntrack_max"
    if host.number(name) is None:
        return Row(name, "not loaded", "-", OK,
                   "nothing to size; if a firewall or Docker loads it later, check again")
    row = at_least(host, name, math.ceil(n * 1.5),
                   "one entry per connection; when full the kernel drops packets")
    count = host.number("net.netfilter.nf_conntrack_count")
    if count is None:
        return row
    return dataclasses.replace(row, current=f"{row.current} (in use {count})")


def check_nofile(host: Host, n: int) -> Row:
    soft, hard = host.nofile
    minimum = MIN_FDS_PER_PROCESS + FDS_RESERVED_PER_PROCESS
    return Row("RLIMIT_NOFILE", f"soft {soft} / hard {hard}", f"hard >= {minimum}",
               OK if hard >= minimum else LOW,
               f"a process cannot hold even {MIN_FDS_PER_PROCESS} connections; raise LimitNOFILE "
               "(unit) or the hard limit (ulimit -Hn)")


def check_processes(host: Host, n: int, role: str) -> Row:
    soft, hard = host.nofile
    at_soft = processes_needed(n, soft)
    needed = f"{at_soft} at soft limit"
    if hard > soft:
        needed += f", {processes_needed(n, hard)} at hard"
    flag = "--workers" if role == SERVER else "--processes"
    label = "workers needed" if role == SERVER else "processes needed"
    return Row(label, f"{per_process(soft)} fds each", needed, INFO,
               f"each process holds at most RLIMIT_NOFILE-{FDS_RESERVED_PER_PROCESS} connections: "
               f"{flag} {at_soft} or more at this limit (under the unit, LimitNOFILE="
               f"{UNIT_LIMIT_NOFILE} applies)")


def memory_needed(n: int, user_bytes: int, processes: int) -> tuple[int, int]:
    """(steady, extra during a full broadcast) in bytes."""
    steady = n * (KERNEL_BYTES_PER_SOCKET + user_bytes) + processes * PROCESS_BASELINE_BYTES
    return steady, n * PAGE_BYTES


def check_memory(host: Host, n: int, role: str) -> Row:
    user_bytes = SERVER_USER_BYTES_PER_STREAM if role == SERVER else DEVICE_USER_BYTES_PER_STREAM
    steady, broadcast = memory_needed(n, user_bytes, processes_needed(n, host.nofile[0]))
    total = steady + broadcast
    return Row("memory", f"{human_bytes(host.mem_available)} available",
               f"{human_bytes(total)} ({human_bytes(steady)} + {human_bytes(broadcast)} broadcast)",
               OK if total <= host.mem_available else LOW,
               f"{KERNEL_BYTES_PER_SOCKET} B kernel + {user_bytes} B user per connection, "
               f"{PAGE_BYTES} B more each while a broadcast is queued; use a bigger VM or "
               "split the fleet over nodes")


CHECKS: dict[str, list[Callable[[Host, int], Row]]] = {
    SERVER: [check_file_max, check_nr_open, check_somaxconn, check_syn_backlog,
             check_netdev_backlog, check_tcp_mem, check_migrate_req, check_conntrack,
             check_nofile],
    DEVICES: [check_file_max, check_nr_open, check_netdev_backlog, check_tcp_mem,
              check_port_range, check_source_addresses, check_tw_reuse, check_conntrack,
              check_nofile],
}


def evaluate(host: Host, n: int, role: str) -> list[Row]:
    rows = [check(host, n) for check in CHECKS[role]]
    return rows + [check_processes(host, n, role), check_memory(host, n, role)]


# --- Output ---------------------------------------------------------------------------------------

def format_table(rows: list[Row], n: int) -> str:
    header = ("SETTING", "CURRENT", f"NEEDED FOR {n:,}", "STATUS")
    cells = [header] + [(r.setting, r.current, r.needed, r.status) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[3]
             for line in cells]
    notes = [f"  {r.status} {r.setting}: {r.hint}" for r in rows if r.status != OK and r.hint]
    return "\n".join(lines + ([""] + notes if notes else []))


def summary(rows: list[Row], n: int, role: str) -> str:
    low = [r.setting for r in rows if r.status == LOW]
    if not low:
        return f"ok: this host is tuned for {n:,} connections ({role} role)."
    text = f"LOW: {', '.join(low)}."
    if any(r.write for r in rows if r.status == LOW):
        text += (f"\n  sysctls: `sudo rawsse tune --apply --connections {n} --role {role}` (until "
                 f"reboot), or install tune/99-rawsse-{role}.conf in /etc/sysctl.d/")
    return text + "\n  see docs/runbook.md#tuning-checklist"


def print_report(host: Host, n: int, role: str) -> list[Row]:
    rows = evaluate(host, n, role)
    print(f"rawsse tune: {role} role, {n:,} connections; {os.cpu_count()} CPUs, "
          f"{human_bytes(host.mem_total)} RAM, kernel {os.uname().release}")
    print(format_table(rows, n))
    print(summary(rows, n, role))
    return rows


# --- Applying ---------------------------------------------------------------------------------

def write_sysctl(name: str, value: str) -> None:
    with open(sysctl_path(name), "w") as f:
        f.write(value + "\n")


def apply_rows(rows: list[Row]) -> bool:
    """Write every LOW sysctl; print ``name: old -> new``. False if any write failed."""
    all_written = True
    for row in rows:
        if row.status != LOW or row.write is None:
            continue
        old = read_sysctl(row.setting)
        try:
            write_sysctl(row.setting, row.write)
        except OSError as exc:  # EROFS in containers, EINVAL for a value the kernel refuses
            print(f"  {row.setting}: could not write {row.write!r}: {exc.strerror}")
            all_written = False
            continue
        print(f"  {row.setting}: {old} -> {read_sysctl(row.setting)}")
    return all_written


def run_apply(n: int, role: str) -> int:
    if os.geteuid() != 0:
        print("rawsse tune: --apply writes /proc/sys and needs root. Run it with sudo, or install "
              f"tune/99-rawsse-{role}.conf in /etc/sysctl.d/ and run "
              "`systemctl restart systemd-sysctl`.", file=sys.stderr)
        return 2
    print("rawsse tune: applying (until reboot; the sysctl.d file makes it permanent):")
    written = apply_rows(evaluate(read_host(), n, role))
    print()
    rows = print_report(read_host(), n, role)
    return 0 if written and not any(r.status == LOW for r in rows) else 1


# --- CLI --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="report current vs needed values (the default action)")
    parser.add_argument("--connections", metavar="N",
                        help="connections to size for: streams on a server, devices on a "
                             "load generator (e.g. 300000 or 300k)")
    parser.add_argument("--role", choices=(SERVER, DEVICES), default=SERVER,
                        help="server (rawsse serve) or devices (load-generator VM); "
                             "default: server")
    parser.add_argument("--apply", action="store_true",
                        help="as root: raise the LOW sysctls in /proc/sys (never lowers a "
                             "value; not persistent) and check again")


def run(args: argparse.Namespace) -> int:
    n = parse_count(args.connections)
    if args.apply:
        return run_apply(n, args.role)
    rows = print_report(read_host(), n, args.role)
    return 1 if any(r.status == LOW for r in rows) else 0
