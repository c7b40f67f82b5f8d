"""The bench's quick plan, end to end: servers, devices and sender really run, the table and the
JSON come out with every variant and plausible counts. Figures are printed, never asserted as
timings (this machine is shared; timings are the bench's business, not the test's)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from conftest import ROOT

QUICK_VARIANTS = ("rawsse-1w", "rawsse-2w", "baseline-1w")
QUICK_TOP = 3_000
HOST_ROW = "Host: CPU stolen / machine busy, per phase"
HOST_PHASES = {"memory": "memory ramp", "fanout": "broadcast fan-out", "connect": "connect rate",
               "targeted": "targeted pushes"}


def test_quick_bench_end_to_end(tmp_path) -> None:
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick",
                          "--out", str(tmp_path), "--name", "quick", "--logs", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=150, cwd=ROOT)
    print(run.stdout)
    print(run.stderr, file=sys.stderr)
    assert run.returncode == 0, run.stderr[-3000:]

    result = json.loads((tmp_path / "quick.json").read_text())
    assert list(result["variants"]) == list(QUICK_VARIANTS)
    for name, variant in result["variants"].items():
        memory = variant["memory"]
        assert memory["top_connections"] >= QUICK_TOP * 0.98, name
        assert len(memory["levels"]) >= 3, name
        assert memory["slopes"]["uss"]["bytes_per_conn"] > 0, name
        if os.access("/proc/slabinfo", os.R_OK):
            assert memory["slopes"]["socket_caches_total"] > 0, name
        fanout = variant["fanout"]
        assert fanout["streams"] >= QUICK_TOP * 0.98, name
        assert fanout["expected_events"] == fanout["broadcasts"] * fanout["streams"], name
        assert fanout["server_reported_writes"] == fanout["expected_events"], name
        assert fanout["events"] == fanout["expected_events"], name
        assert fanout["latency_ms"]["count"] == fanout["events"], name
        targeted = variant["targeted"]
        for mode in ("keepalive", "pipelined"):
            assert targeted[mode]["accepted"] > 0, (name, mode)
            assert targeted[mode]["cpu_us_per_push"] > 0, (name, mode)
        assert targeted["events"] == targeted["accepted"], name
        assert targeted["connect_rate_per_s"] > 0, name
        assert set(variant["host_cpu"]) == set(HOST_PHASES), name
        for phase, shares in variant["host_cpu"].items():
            assert 0 <= shares["steal_pct"] <= shares["busy_pct"] <= 100, (name, phase, shares)
            assert shares["busy_pct"] > 0, (name, phase, shares)  # the phase's own load ran
            assert shares["wall_s"] > 0, (name, phase)
            stolen = shares["steal_pct"] > 5
            warned = f"warning: {name}, {HOST_PHASES[phase]} phase: the hypervisor stole"
            assert (warned in run.stdout) == stolen, (name, phase, shares)

    table = (tmp_path / "quick.md").read_text()
    assert "| Figure | rawsse-1w | rawsse-2w | baseline-1w |" in table
    for row in ("User memory / stream, RSS slope", "Broadcast fan-out p50 / p99 / max",
                "Server CPU / push, 5 keep-alive senders", "Connect rate (unpaced)", HOST_ROW):
        assert row in table and row in run.stdout
    host_row = next(line for line in table.splitlines() if line.startswith(f"| {HOST_ROW} |"))
    assert host_row.count("mem ") == host_row.count("push ") == len(QUICK_VARIANTS), host_row
    missing = [line for line in table.splitlines() if line.startswith("| ") and "| — " in line]
    assert not missing, f"figures missing from the table: {missing}"
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "quick-memory.png").stat().st_size > 0
        assert (tmp_path / "quick-latency.png").stat().st_size > 0


def test_only_names_a_rawsse_variant_with_any_worker_count() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.run import pick_variants, plan_quick

    plan, _ = plan_quick()
    picked = pick_variants(plan, ["rawsse-1w", "rawsse-16w", "rawsse-1w", "nosuch-3w"])
    assert [(v.name, v.kind, v.workers) for v in picked] == \
        [("rawsse-1w", "rawsse", 1), ("rawsse-16w", "rawsse", 16)]
    assert picked[1].levels == plan[0].levels


def test_workers_bench_prices_a_forwarded_push_from_the_owner_split(tmp_path) -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.workers import split, token_file
    from rawsse.node.routing import owner_of

    path = tmp_path / "tokens.txt"
    token_file(str(path), 50, 1)
    tokens = path.read_text().split()
    assert len(tokens) == 50 and {owner_of(bytes.fromhex(t), 2) for t in tokens} == {1}
    # worker 0 received 100 pushes (all forwarded) in 0.01 s; worker 1 took 100 local ones and
    # the 100 forwarded in 0.015 s; a local push costs 100 us: forwarded = 100 + 50 us
    got = split({"cpu_us_per_push": 100.0},
                {"worker_pushes": {0: 100, 1: 100}, "worker_cpu_s": {0: 0.01, 1: 0.015}})
    assert (got["receiver_us"], got["owner_us"], got["ratio"]) == (100.0, 50.0, 1.5)


def test_host_cpu_shares_from_two_reads_of_proc_stat() -> None:
    """Around a busy loop of ours, the machine's busy share is at least our own CPU's (ticks are
    10 ms: some slack), and is the busy columns (proc(5): user nice system irq softirq steal; not
    idle, iowait or guest, which user already counts) over wall time × CPUs online; every column
    of the ``cpu`` line sums to that capacity."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench import hostcpu

    start, cpu_start = hostcpu.mark(), time.process_time()
    while time.process_time() - cpu_start < 0.3:
        pass
    ours = time.process_time() - cpu_start
    end = hostcpu.mark()
    shares = hostcpu.since(start, end)
    online = os.sysconf("SC_NPROCESSORS_ONLN")
    assert shares["cpus"] == online and shares["wall_s"] >= ours / online
    capacity = shares["wall_s"] * shares["cpus"]
    assert 0 <= shares["steal_pct"] <= shares["busy_pct"] <= 100, shares
    assert shares["busy_pct"] / 100 * capacity >= ours - 0.05, (shares, ours)
    busy = sum(end.ticks[c] - start.ticks[c] for c in (0, 1, 2, 5, 6, 7)) / hostcpu.TICKS_PER_S
    assert abs(shares["busy_pct"] - min(100.0, busy / capacity * 100)) < 0.5, (shares, busy)
    steal = (end.ticks[7] - start.ticks[7]) / hostcpu.TICKS_PER_S
    assert abs(shares["steal_pct"] - steal / capacity * 100) < 0.5, (shares, steal)
    every_column = sum(b - a for a, b in zip(start.ticks[:8], end.ticks[:8]))
    assert abs(every_column / hostcpu.TICKS_PER_S - capacity) <= 0.1 * capacity + 0.05 * end.cpus


def test_steal_over_five_percent_is_a_warning_naming_variant_and_phase() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.report import fmt_host_cpu, steal_warnings

    host = {"memory": {"steal_pct": 0.31, "busy_pct": 71.2},
            "fanout": {"steal_pct": 12.5, "busy_pct": 99.0},
            "connect": {"steal_pct": 5.0, "busy_pct": 90.0}}
    assert fmt_host_cpu(host) == "mem 0.3 % / 71 %, bcast 12.5 % / 99 %, connect 5.0 % / 90 %"
    assert steal_warnings({"variants": {"rawsse-17w": {"host_cpu": host}}}) == [
        "warning: rawsse-17w, broadcast fan-out phase: the hypervisor stole 12.5 % of the CPUs' "
        "time (machine busy 99 %): read that phase's figures with care"]
