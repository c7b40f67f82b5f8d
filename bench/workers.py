"""What N workers cost, and a forwarded push beside a local one: ``python bench/workers.py``.

For each worker count (``--workers 1,2,4,16``), in interleaved rounds (``--rounds``), one
``rawsse serve --workers N`` on loopback: its idle memory (RSS and anonymous PSS summed over the
master and its workers, before any device), then ``--devices`` devices, then ``--pushes`` pushes
to them with 5 keep-alive senders, one push in flight each (Fleet's sender, ``rawsse push``).
Server CPU per push = CPU time of every server process over the push run
(``/proc/PID/task/*/schedstat``, as ``bench/run.py``) ÷ pushes accepted. Medians of the rounds.

Forwarded beside local (``--split``, on by default when 1 and 2 are in ``--workers``): a
2-worker run whose device tokens are all owned by worker 1, so a push worker 1 accepts is local
and one worker 0 accepts is forwarded. With n0, n1 pushes received and c0, c1 CPU seconds of
each worker, and L the CPU of one local push from the 1-worker run of the same round:
forwarded = c0 / n0 (the receiving worker's part) + (c1 − n1 × L) / n0 (the owner's part).

Every load is bounded (``--pushes``, ``--max-time``); children run in their own sessions and are
ended by PID. Results: a table on stdout, and ``--json PATH`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # ``python bench/workers.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import load, memory, procs  # noqa: E402
from rawsse.load.loadgen import fleet_token  # noqa: E402
from rawsse.node.routing import owner_of  # noqa: E402


def token_file(path: str, count: int, owned_by: int | None) -> None:
    """``count`` Fleet-scheme tokens, one a line; only those worker ``owned_by`` of 2 owns."""
    tokens, i = [], 0
    while len(tokens) < count:
        token = fleet_token(i)
        if owned_by is None or owner_of(bytes.fromhex(token), 2) == owned_by:
            tokens.append(token)
        i += 1
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")


def run_one(workers: int, args: argparse.Namespace, tokens: str, log_dir: str,
            name: str) -> dict[str, Any]:
    """One server, its idle memory, devices, a push run; CPU per process."""
    holder, port = procs.reserve_port()
    server = procs.Server("rawsse", workers, "127.0.0.1", port, log_dir,
                          extra=["--keepalive", "0"])
    devices = None
    try:
        server.wait_ready()
        time.sleep(0.5)  # the workers finish importing before the idle sample
        idle = memory.process_memory(server.pids)
        base_fds = load.wait_fds_steady(server.pids)
        report = f"{log_dir}/{name}-devices.json"
        devices = procs.Child(f"{name}-devices", [
            sys.executable, "-m", "rawsse", "devices", "--url", server.url,
            "--count", str(args.devices), "--token-scheme", f"file:{tokens}",
            "--duration", str(args.max_time + 60), "--report", report], log_dir, report)
        load.wait_for_connections(server.pids, base_fds, args.devices, timeout=60,
                                  alive=devices.running)
        load.wait_settled(server.pids, base_fds)
        by_worker = {w["worker"]: w["pid"] for w in server.stats()["workers"]}
        before = {i: memory.cpu_seconds([pid]) for i, pid in by_worker.items()}
        received = {w["worker"]: w["pushes_received"] for w in server.stats()["workers"]}
        total_before = memory.cpu_seconds(server.pids)
        push_report = f"{log_dir}/{name}-push.json"
        procs.run_to_end(f"{name}-push", [
            sys.executable, "-m", "rawsse", "push", "--url", server.url,
            "--tokens", f"file:{tokens}", "--senders", "5", "--count", str(args.pushes),
            "--max-time", str(args.max_time), "--report", push_report, "--quiet"],
            log_dir, timeout=args.max_time + 30)
        total = memory.cpu_seconds(server.pids) - total_before
        cpu = {i: memory.cpu_seconds([pid]) - before[i] for i, pid in by_worker.items()}
        after = {w["worker"]: w["pushes_received"] for w in server.stats()["workers"]}
        pushed = procs.read_report(push_report)
        accepted = pushed.get("accepted") or 0
        return {"workers": workers, "accepted": accepted, "per_second": pushed.get("per_second"),
                "cpu_us_per_push": total / max(1, accepted) * 1e6,
                "idle_rss_mb": idle.rss / 2**20, "idle_anon_pss_mb": idle.anon_pss / 2**20,
                "worker_cpu_s": cpu, "worker_pushes": {i: after[i] - received[i] for i in after}}
    finally:
        if devices is not None:
            devices.stop(timeout=30)
        server.stop()
        holder.close()


def split(local: dict[str, Any], two: dict[str, Any]) -> dict[str, float]:
    """Per-push CPU of a local and a forwarded push (module docstring)."""
    per_local = local["cpu_us_per_push"]
    n0, n1 = two["worker_pushes"][0], two["worker_pushes"][1]
    c0, c1 = two["worker_cpu_s"][0] * 1e6, two["worker_cpu_s"][1] * 1e6
    receiver = c0 / max(1, n0)
    owner = (c1 - n1 * per_local) / max(1, n0)
    return {"local_us": per_local, "forwarded_us": receiver + owner,
            "receiver_us": receiver, "owner_us": owner,
            "ratio": (receiver + owner) / per_local}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rawsse: the cost of N workers; a forwarded "
                                                 "push beside a local one")
    parser.add_argument("--workers", default="1,2,4,16", help="worker counts (default %(default)s)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-time", type=float, default=60.0, help="bound per push run (s)")
    parser.add_argument("--no-split", dest="split", action="store_false")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    log_dir = tempfile.mkdtemp(prefix="rawsse-workers-")
    spread, owned = f"{log_dir}/tokens.txt", f"{log_dir}/tokens-w1.txt"
    token_file(spread, args.devices, None)
    token_file(owned, args.devices, 1)
    do_split = args.split and 1 in counts and 2 in counts
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        runs = {n: run_one(n, args, spread, log_dir, f"r{r}-{n}w") for n in counts}
        if do_split:
            runs["split"] = split(runs[1], run_one(2, args, owned, log_dir, f"r{r}-split"))
        rounds.append(runs)
        print(f"[workers] round {r + 1}: " + ", ".join(
            f"{n}w {runs[n]['cpu_us_per_push']:.1f} µs" for n in counts), flush=True)
    median = statistics.median
    print("\n| workers | pushes/s (5 keep-alive senders) | server CPU / push | × 1 worker "
          "| idle RSS | idle anon PSS |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    one = median(r[counts[0]]["cpu_us_per_push"] for r in rounds)
    for n in counts:
        cpu = median(r[n]["cpu_us_per_push"] for r in rounds)
        print(f"| {n} | {median(r[n]['per_second'] or 0 for r in rounds):,.0f} | {cpu:.1f} µs "
              f"| {cpu / one:.2f} | {median(r[n]['idle_rss_mb'] for r in rounds):.0f} MB "
              f"| {median(r[n]['idle_anon_pss_mb'] for r in rounds):.0f} MB |")
    if do_split:
        s = {k: median(r["split"][k] for r in rounds) for k in rounds[0]["split"]}
        print(f"\nlocal push {s['local_us']:.1f} µs; forwarded push {s['forwarded_us']:.1f} µs "
              f"(receiving worker {s['receiver_us']:.1f} + owner {s['owner_us']:.1f}): "
              f"{s['ratio']:.2f} × local (medians of {args.rounds} rounds)")
    print(f"logs: {log_dir}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
