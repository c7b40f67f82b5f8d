"""Syscalls and CPU per push, per worker, for N workers: ``python bench/mesh_syscalls.py``.

Where a second worker's cost goes (issue 14). One ``rawsse serve --workers N`` on loopback,
``--devices`` devices, then ``--pushes`` pushes with 5 keep-alive senders (``rawsse push``, one
push in flight per connection). Prints, per worker: pushes received over HTTP, pushes forwarded
and how many of them were promised (answered within the owner's credit: ``forwarded_promised``),
and with ``--strace`` the syscalls ``strace -c -p PID`` counted on that worker during the run.
``--messages`` traces each worker's sends instead and sorts its mesh messages by what they
carried: PUSH records, a TAKEN, or both in one message (a turn's TAKEN rides with that turn's
pushes to the same peer). It also prints pushes/s, server CPU per push (schedstat, as
``bench/run.py``) and the sender's CPU per push (``getrusage(RUSAGE_CHILDREN)``: the load generator shares the cores);
under strace those figures mean nothing.

Every child runs in its own session and is ended by PID; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # ``python bench/mesh_syscalls.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import load, memory, procs  # noqa: E402
from bench.workers import token_file  # noqa: E402

# A row of ``strace -c``: % time, seconds, usecs/call, calls, [errors], syscall
STRACE_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$")
# A send traced with ``-x -s 4096``: its bytes as \xNN escapes
SENT = re.compile(r'send(?:to|msg)\(\d+, (?:\{msg_name=NULL.*?iov_base=)?"((?:\\x[0-9a-f]{2})*)"')


def mesh_messages(path: str, workers: int) -> dict[str, int]:
    """What the mesh messages a worker sent carried: pushes, TAKENs, both, or other records
    (``rawsse/node/wire.py`` framing; a send that does not parse as one is not counted)."""
    counts = {"PUSH": 0, "TAKEN": 0, "PUSH+TAKEN": 0, "other": 0}
    with open(path) as f:
        for line in f:
            match = SENT.search(line)
            if not match:
                continue
            data = bytes.fromhex(match.group(1).replace("\\x", ""))
            kinds, offset = set(), 2
            while offset + 5 <= len(data):
                kind, length = struct.unpack_from("!BI", data, offset)
                kinds.add(kind)
                offset += 5 + length
            if len(data) < 7 or offset != len(data) or (data[0] << 8 | data[1]) & 0x7FFF >= workers:
                continue  # an HTTP answer, a heartbeat: not a mesh message
            name = {frozenset({1}): "PUSH", frozenset({16}): "TAKEN",
                    frozenset({1, 16}): "PUSH+TAKEN"}.get(frozenset(kinds), "other")
            counts[name] += 1
    return counts


def strace_counts(path: str) -> dict[str, int]:
    counts = {}
    with open(path) as f:
        for line in f:
            match = STRACE_ROW.match(line)
            if match and match.group(2) != "total":
                counts[match.group(2)] = int(match.group(1))
    return counts


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rawsse: syscalls and CPU per push per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=10000)
    parser.add_argument("--strace", action="store_true", help="count syscalls per worker")
    parser.add_argument("--messages", action="store_true",
                        help="trace each worker's sends instead, and say what its mesh messages "
                             "carried (PUSH, TAKEN, both in one message)")
    args = parser.parse_args(argv)
    log_dir = tempfile.mkdtemp(prefix="rawsse-syscalls-")
    tokens = f"{log_dir}/tokens.txt"
    token_file(tokens, args.devices, None)
    holder, port = procs.reserve_port()
    server = procs.Server("rawsse", args.workers, "127.0.0.1", port, log_dir,
                          extra=["--keepalive", "0"])
    devices = None
    tracers: list[subprocess.Popen[bytes]] = []
    try:
        server.wait_ready()
        base_fds = load.wait_fds_steady(server.pids)
        devices = procs.Child("devices", [
            sys.executable, "-m", "rawsse", "devices", "--url", server.url, "--count",
            str(args.devices), "--token-scheme", f"file:{tokens}", "--duration", "150"], log_dir)
        load.wait_for_connections(server.pids, base_fds, args.devices, timeout=60,
                                  alive=devices.running)
        load.wait_settled(server.pids, base_fds)
        before = {w["worker"]: w for w in server.stats()["workers"]}
        if args.strace or args.messages:
            how = ["-e", "trace=sendto,sendmsg", "-x", "-s", "4096"] if args.messages else ["-c"]
            tracers = [subprocess.Popen(["strace", *how, "-o", f"{log_dir}/strace-{i}.txt",
                                         "-p", str(w["pid"])], stderr=subprocess.DEVNULL)
                       for i, w in sorted(before.items())]
            time.sleep(1.0)  # attached
        cpu_before = memory.cpu_seconds(server.pids)
        client_before = children_cpu()
        report = f"{log_dir}/push.json"
        procs.run_to_end("push", [
            sys.executable, "-m", "rawsse", "push", "--url", server.url, "--tokens",
            f"file:{tokens}", "--senders", "5", "--count", str(args.pushes), "--max-time", "60",
            "--report", report, "--quiet"], log_dir, timeout=90)
        cpu = memory.cpu_seconds(server.pids) - cpu_before
        client = children_cpu() - client_before  # the sender, reaped by run_to_end
        pushed = procs.read_report(report)
        accepted = pushed.get("accepted") or 0
        after = {w["worker"]: w for w in server.stats()["workers"]}
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
        print(f"{args.workers} workers: {accepted} pushes accepted, "
              f"{pushed.get('per_second') or 0:.0f}/s, server CPU {cpu / max(1, accepted) * 1e6:.1f}"
              f" µs/push, sender (rawsse push) CPU {client / max(1, accepted) * 1e6:.1f} µs/push"
              f"{' (under strace)' if tracers else ''}")
        for i in sorted(after):
            delta = {k: after[i][k] - before[i][k]
                     for k in ("pushes_received", "forwarded", "forwarded_promised")}
            line = (f"  worker {i}: received {delta['pushes_received']}, forwarded "
                    f"{delta['forwarded']} ({delta['forwarded_promised']} promised)")
            if args.messages:
                line += ": mesh messages sent " + ", ".join(
                    f"{name} {n}" for name, n in
                    mesh_messages(f"{log_dir}/strace-{i}.txt", args.workers).items())
            elif tracers:
                counts = strace_counts(f"{log_dir}/strace-{i}.txt")
                line += ": " + ", ".join(f"{name} {n}" for name, n in
                                         sorted(counts.items(), key=lambda kv: -kv[1]) if n > 20)
            print(line)
        return 0
    finally:
        for tracer in tracers:
            if tracer.poll() is None:
                tracer.kill()
        if devices is not None:
            devices.stop(timeout=30)
        server.stop()
        holder.close()


if __name__ == "__main__":
    sys.exit(main())
