"""A longer run of the seeded mutation fuzzer (``tests/fuzzing.py``) against one real node.

    python fuzz/run.py --cases 30000 --seed 7 [--minutes 10] [--workers 2] [--only INDEX]

Starts ``rawsse serve`` on reserved loopback ports (public and operator listeners), sends the
cases, stops the server, and prints the hangs and every distinct traceback of the server's log
(with how many times each came). Exits 1 if there was any. Bounded: cases not started after
``--minutes`` are skipped. ``--only`` replays one case of a seed, for a failure found earlier.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from conftest import launch  # noqa: E402
from fuzzing import describe, load_corpus, make_cases, run_cases  # noqa: E402


def tracebacks(log: str) -> collections.Counter[str]:
    """Each traceback of the log by its innermost rawsse frame and exception line."""
    found: collections.Counter[str] = collections.Counter()
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = [line for line in block.splitlines() if line.strip()]
        frames = [line.strip() for line in lines if line.strip().startswith('File "') and
                  "rawsse" in line]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
        error = errors[-1] if errors else (lines[-1] if lines else "")
        found[f"{frames[-1] if frames else '?'}\n    {error[:200]}"] += 1
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=10.0, help="stop starting cases after this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="cases in flight at once")
    parser.add_argument("--only", type=int, default=None, help="replay this case index only")
    args = parser.parse_args()
    if args.cases < 1 or args.minutes <= 0 or args.parallel < 1:
        parser.error("--cases and --parallel must be >= 1, --minutes > 0")
    cases = make_cases(args.seed, args.cases if args.only is None else args.only + 1, load_corpus())
    if args.only is not None:
        cases = cases[args.only:]
    server, holders = launch("--workers", str(args.workers), "--keepalive", "0", admin=True)
    started = time.monotonic()
    try:
        failures = run_cases(cases, server.host, server.port, server.admin_port, args.parallel,
                             stop_at=started + args.minutes * 60)
        alive = server.proc.poll() is None
        log = server.output()
    finally:
        server.stop()
        for holder in holders:
            holder.close()
    elapsed = time.monotonic() - started
    found = tracebacks(log)
    print(f"{len(cases)} cases (seed {args.seed}) in {elapsed:.1f}s: {len(failures)} hangs, "
          f"{sum(found.values())} tracebacks ({len(found)} distinct); server log {server.log_path}")
    for case, problem in failures[:20]:
        print("hang:", describe(case, problem))
    for where, count in found.most_common():
        print(f"{count} x {where}")
    if not alive:
        print("the server died during the run")
    return 1 if failures or found or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
