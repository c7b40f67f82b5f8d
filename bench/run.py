"""The one bench command: ``python bench/run.py [--quick | --full]``.

Runs every server variant of a plan through the phases in ``variant.py`` and prints one table
(``report.py``), writing ``bench/results/<plan>-<time>.json``, ``.md`` and PNG plots.

Plans (every load bounded in count and time):
- ``--quick``: 500 → 3,000 streams; rawsse 1 and 2 workers, baseline. Under a minute.
- default (``--standard``): 2,000 → 18,000 streams, one worker each: the headline figures (RSS slope
  between 2k and 18k streams, broadcast to 18k p99, CPU per targeted push with 5 keep-alive
  senders), plus rawsse with 2 workers. A few minutes.
- ``--full``: the standard plan plus rawsse and the baseline with as many workers as 300,000 streams
  need under the open-file limit, stepped 20k → 300k. Needs a VM with ~8 GB free and the sysctls
  that ``preflight`` names; the baseline's many-worker variant is measured for memory only
  (its workers do not route pushes to each other).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
from typing import Any

if __package__ in (None, ""):  # ``python bench/run.py``: make ``bench`` and ``rawsse`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench import load, procs, report  # noqa: E402
from bench.variant import PhaseSettings, VariantSpec, run_variant  # noqa: E402

RESULTS_DIR = os.path.join(procs.ROOT, "bench", "results")
HEADLINE_LEVELS = [2_000, 6_000, 10_000, 14_000, 18_000]
FULL_LEVELS = [20_000, 60_000, 100_000, 150_000, 200_000, 250_000, 300_000]


def plan_quick() -> tuple[list[VariantSpec], PhaseSettings]:
    levels = [500, 1_000, 2_000, 3_000]
    return ([VariantSpec("rawsse-1w", "rawsse", 1, levels),
             VariantSpec("rawsse-2w", "rawsse", 2, levels),
             VariantSpec("baseline-1w", "baseline", 1, levels)],
            PhaseSettings(ramp=3_000, broadcasts=3, broadcast_gap=0.3, targeted_devices=1_000,
                          targeted_pushes=3_000, pipeline=16))


def plan_standard() -> tuple[list[VariantSpec], PhaseSettings]:
    return ([VariantSpec("rawsse-1w", "rawsse", 1, HEADLINE_LEVELS),
             VariantSpec("rawsse-2w", "rawsse", 2, HEADLINE_LEVELS),
             VariantSpec("baseline-1w", "baseline", 1, HEADLINE_LEVELS)],
            PhaseSettings(ramp=4_000, broadcasts=5, broadcast_gap=1.0, targeted_devices=18_000,
                          targeted_pushes=50_000, pipeline=16))


def plan_full() -> tuple[list[VariantSpec], PhaseSettings]:
    variants, settings = plan_standard()
    workers = load.workers_for(FULL_LEVELS[-1])
    variants += [VariantSpec(f"rawsse-{workers}w", "rawsse", workers, FULL_LEVELS),
                 VariantSpec(f"baseline-{workers}w", "baseline", workers, FULL_LEVELS,
                             fanout=False, targeted=False)]
    return variants, settings


PLANS = {"quick": plan_quick, "standard": plan_standard, "full": plan_full}
WORKERS_VARIANT = re.compile(r"rawsse-(\d+)w")


def pick_variants(plan: list[VariantSpec], names: list[str]) -> list[VariantSpec]:
    """The plan's variants named in ``names``, in their order; a ``rawsse-Nw`` the plan lacks is
    rawsse with N workers at the plan's first variant's levels (``--only rawsse-1w --only
    rawsse-16w``: what the workers themselves cost, for the same load)."""
    known = {v.name: v for v in plan}
    picked = []
    for name in dict.fromkeys(names):
        if name in known:
            picked.append(known[name])
        elif match := WORKERS_VARIANT.fullmatch(name):
            picked.append(VariantSpec(name, "rawsse", int(match[1]), plan[0].levels))
    return picked


def preflight(top: int) -> tuple[list[str], list[str]]:
    """(problems, warnings) between this machine and ``top`` streams. A problem stops a run above
    20k streams (unless --force); a warning is printed and recorded."""
    problems, warnings = [], []
    if not os.access("/proc/slabinfo", os.R_OK):
        warnings.append("/proc/slabinfo is not readable (run as root): no kernel slab figures")
    ports = load.ephemeral_ports()
    sources = len(load.source_addresses_for(top))
    if sources > 250:
        problems.append(f"{top} streams need {sources} source addresses at {ports} ephemeral "
                        f"ports each: widen net.ipv4.ip_local_port_range")
    tracked = read_int("/proc/sys/net/netfilter/nf_conntrack_count")
    limit = read_int("/proc/sys/net/netfilter/nf_conntrack_max")
    if tracked and limit and limit < top * 1.2:
        problems.append(f"conntrack is tracking connections and nf_conntrack_max={limit} < "
                        f"{top} streams: sysctl -w net.netfilter.nf_conntrack_max={int(top * 1.5)}")
    file_max = read_int("/proc/sys/fs/file-max")
    if file_max and file_max < top * 2.2:
        problems.append(f"fs.file-max={file_max} < both ends of {top} connections: "
                        f"sysctl -w fs.file-max={top * 4}")
    available = read_meminfo_kb("MemAvailable") * 1024
    need = top * 12_000  # both sockets' kernel objects + server and devices user memory, 2x margin
    if available and available < need:
        problems.append(f"{available >> 20} MiB available, {need >> 20} MiB wanted for {top} streams")
    somaxconn = read_int("/proc/sys/net/core/somaxconn")
    if top > 50_000 and somaxconn and somaxconn < 65535:
        warnings.append(f"net.core.somaxconn={somaxconn}: a worker's accept queue may overflow in "
                        f"a connect burst (SYN retried after 1 s, slowing the ramp); "
                        f"sysctl -w net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535")
    return problems, warnings


def read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def read_meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_meta(plan: str, settings: PhaseSettings) -> dict[str, Any]:
    return {"plan": plan, "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.relpath(sys.argv[0], procs.ROOT), *sys.argv[1:]]),
            "kernel": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "fd_hard_limit": load.fd_limit(),
            "ephemeral_ports": load.ephemeral_ports(),
            "somaxconn": read_int("/proc/sys/net/core/somaxconn"),
            "tcp_max_syn_backlog": read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            "netdev_max_backlog": read_int("/proc/sys/net/core/netdev_max_backlog"),
            "tcp_mem_pages": open("/proc/sys/net/ipv4/tcp_mem").read().split(),
            "load_average": os.getloadavg(), "settings": settings.__dict__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="rawsse bench: memory per connection, fan-out, "
                                                 "push throughput; rawsse beside an asyncio + uvloop "
                                                 "baseline. Prints one table.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="plan", action="store_const", const="quick",
                      help="500 → 3,000 streams, under a minute")
    size.add_argument("--standard", dest="plan", action="store_const", const="standard",
                      help="2k → 18k streams per variant (the default; the headline figures)")
    size.add_argument("--full", dest="plan", action="store_const", const="full",
                      help="standard plus 20k → 300k streams with as many workers as needed")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="run only this variant (repeatable), e.g. rawsse-1w, baseline-1w; "
                             "rawsse-Nw for any N runs rawsse with N workers at the plan's levels")
    parser.add_argument("--levels", type=parse_levels, metavar="N,N,...",
                        help="stream counts to step through instead of the plan's, e.g. "
                             "20000,60000 with --only rawsse-4w: the many-worker fan-out without "
                             "the 300k run")
    parser.add_argument("--skip-targeted", action="store_true",
                        help="memory and fan-out phases only (no targeted pushes)")
    parser.add_argument("--root", metavar="TREE",
                        help="run rawsse (server, devices, sender) from this checkout, e.g. a "
                             "git worktree of the commit before a change (default: this one); "
                             "the baseline server stays this tree's, driven by that checkout's "
                             "devices and sender")
    parser.add_argument("--out", default=RESULTS_DIR, help="results directory (default %(default)s)")
    parser.add_argument("--name", help="file name stem (default: PLAN-YYYYmmdd-HHMMSS)")
    parser.add_argument("--logs", help="directory for child logs and device/push reports "
                                       "(default: a new temporary directory)")
    parser.add_argument("--force", action="store_true", help="run even when preflight complains")
    args = parser.parse_args(argv)
    args.plan = args.plan or "standard"
    return args


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part.replace("_", "")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give stream counts as N,N,... (20000,60000)")
    if len(levels) < 2 or any(n < 100 for n in levels) or levels != sorted(set(levels)):
        raise argparse.ArgumentTypeError(f"{text!r}: at least two increasing counts of 100 or more "
                                         f"(the memory slopes are fitted between them)")
    return levels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants, settings = PLANS[args.plan]()
    if args.only:
        variants = pick_variants(variants, args.only)
        if not variants:
            print(f"no variant named {args.only}; plan {args.plan} has "
                  f"{[v.name for v in PLANS[args.plan]()[0]]}", file=sys.stderr)
            return 2
    for spec in variants:
        spec.levels = args.levels or spec.levels
        spec.targeted = spec.targeted and not args.skip_targeted
        if args.root:  # the baseline server is this tree's, driven by that tree's tools
            spec.root = os.path.abspath(args.root)
    top = max(v.levels[-1] for v in variants)
    problems, warnings = preflight(top)
    for line in problems + warnings:
        print(f"preflight: {line}", file=sys.stderr)
    if problems and top > 20_000 and not args.force:
        print("preflight failed; fix the above or pass --force", file=sys.stderr)
        return 2
    log_dir = args.logs or procs.make_log_dir()
    os.makedirs(log_dir, exist_ok=True)
    result: dict[str, Any] = {"meta": run_meta(args.plan, settings), "variants": {},
                              "targets": report.TARGETS,
                              "preflight": problems + warnings, "log_dir": log_dir}
    result["meta"]["rawsse_root"] = os.path.abspath(args.root or procs.ROOT)
    for spec in variants:
        print(f"[bench] {spec.name}: {spec.levels[0]:,} → {spec.levels[-1]:,} streams ...",
              flush=True)
        result["variants"][spec.name] = run_variant(spec, settings, log_dir)
        if "error" in result["variants"][spec.name]:
            print(f"[bench] {spec.name} failed: {result['variants'][spec.name]['error']}",
                  file=sys.stderr)
    stem = args.name or f"{args.plan}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    paths = report.write_outputs(result, args.out, stem)
    print()
    print(report.markdown_table(result))
    print()
    print(report.headline(result))
    for line in report.steal_warnings(result):
        print(line)
    print("\nwritten: " + ", ".join(paths.values()) + f"\nlogs: {log_dir}")
    return 1 if any("error" in v for v in result["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
