"""CPU per push of ``rawsse push`` itself against a real server, two trees side by side.

``python bench/sender_cpu.py --trees BASE_TREE,TREE``: one ``rawsse serve --workers 1`` (this
tree's) on loopback, then, in alternating rounds, each tree's ``rawsse push`` in two shapes: 5
keep-alive senders (one push in flight each, the bench's senders) and one pipelined sender
(``--pipeline 16``). A push run's CPU is user + system time of the process (``wait4``'s rusage),
less that of a 5-push run of the same tree and shape (start-up: imports, connects), over the
pushes answered. Medians of ``--rounds``. Noisy on a shared VM; ``bench/sender_probe.py`` under
callgrind is the noise-free figure. Every run is bounded (``--count``, ``--max-time``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # ``python bench/sender_cpu.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import procs  # noqa: E402

SHAPES = {"keep-alive": ["--senders", "5"], "pipelined": ["--senders", "1", "--pipeline", "16"]}


def push_cpu(tree: str, url: str, count: int, shape: list[str], report: str) -> tuple[float, int]:
    """(CPU seconds, pushes answered 200) of one ``rawsse push`` run from ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.Popen([sys.executable, "-m", "rawsse", "push", "--url", url, "--tokens",
                             "fleet:0-999", "--count", str(count), "--quiet", "--max-time", "120",
                             "--report", report, *shape], env=env, cwd=tree,  # -m: cwd first
                            start_new_session=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"rawsse push from {tree} failed (exit {status})")
    with open(report) as f:
        accepted = json.load(f)["accepted"]
    return usage.ru_utime + usage.ru_stime, accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", required=True, help="two checkouts, comma-separated")
    parser.add_argument("--count", type=int, default=40_000, help="pushes per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = args.trees.split(",")
    log_dir = tempfile.mkdtemp(prefix="sender-cpu-")
    report = os.path.join(log_dir, "push.json")
    holder, port = procs.reserve_port()
    server = procs.Server("rawsse", 1, "127.0.0.1", port, log_dir, extra=["--keepalive", "0"])
    figures: dict[tuple[str, str], list[float]] = {}
    try:
        server.wait_ready()
        url = f"http://127.0.0.1:{port}"
        for _ in range(args.rounds):
            for name, shape in SHAPES.items():
                for tree in trees:
                    start_cpu, _ = push_cpu(tree, url, 5, shape, report)
                    cpu, accepted = push_cpu(tree, url, args.count, shape, report)
                    figures.setdefault((name, tree), []).append(
                        (cpu - start_cpu) / (accepted - 5) * 1e6)
                    time.sleep(0.2)
    finally:
        server.stop()
        holder.close()
    print(f"rawsse push CPU per push (user + system, µs; medians of {args.rounds} rounds, "
          f"{args.count:,} pushes a run)")
    for name in SHAPES:
        cells = [f"{tree}: {statistics.median(figures[(name, tree)]):.1f}" for tree in trees]
        print(f"  {name:10}  " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
