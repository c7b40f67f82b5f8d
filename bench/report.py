"""Turning a bench result into the one table, the JSON file and the PNG plots.

The table has one column per server variant and one row per figure; a figure a variant did not
measure shows "—". Plots need matplotlib (the ``[bench]`` extra); without it they are skipped with
one line saying so, and the table and JSON are still written.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

Result = dict[str, Any]

# The headline targets, written into every result as ``targets``: ``rawsse report`` draws
# ``latency_p99_ms`` (the broadcast fan-out p99 at 18k streams) on the latency CDF.
TARGETS = {"latency_p99_ms": 75, "rss_bytes_per_stream": 400, "cpu_us_per_push": 15}
# A variant's ``host_cpu`` keys (``hostcpu.phase``), in the order they run: (key, label, name).
HOST_PHASES = (("memory", "mem", "memory ramp"), ("fanout", "bcast", "broadcast fan-out"),
               ("connect", "connect", "connect rate"), ("targeted", "push", "targeted pushes"))
# Over this share of stolen CPU a phase's figures are the hypervisor's as much as ours.
STEAL_WARNING_PCT = 5.0


def dig(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...`` or None when any step is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt_bytes(value: Any) -> str:
    return "—" if value is None else f"{value:,.0f} B"


def fmt_bytes_within(value: Any, resolution: Any) -> str:
    """``350 B (± 700)``: a figure the kernel only reports to ``resolution`` bytes."""
    if value is None:
        return "—"
    return fmt_bytes(value) + (f" (± {resolution:,.0f})" if resolution else "")


def fmt_ms(value: Any) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


def fmt_rate(value: Any) -> str:
    return "—" if value is None else f"{value:,.0f}/s"


def fmt_us(value: Any) -> str:
    return "—" if value is None else f"{value:,.1f} µs"


def fmt_count(value: Any) -> str:
    return "—" if value is None else f"{value:,}"


def fmt_latency(latency: Any) -> str:
    if not isinstance(latency, dict) or not latency.get("count"):
        return "—"
    return f"{latency['p50']:.1f} / {latency['p99']:.1f} / {latency['max']:.1f} ms"


def fmt_delivery(got: Any, expected: Any) -> str:
    if got is None or expected is None:
        return "—"
    return f"{got:,} / {expected:,}"


def fmt_fanout_delivery(variant: Result) -> str:
    """Events the devices got / events due; adds what the server's answers summed when that
    differs (a server miscounting the streams it wrote is worth seeing in the table)."""
    text = fmt_delivery(dig(variant, "fanout", "events"), dig(variant, "fanout", "expected_events"))
    reported = dig(variant, "fanout", "server_reported_writes")
    if reported is not None and reported != dig(variant, "fanout", "expected_events"):
        text += f" (server answered {reported:,})"
    return text


def fmt_worker_writes(workers: Any) -> str:
    """``212.0 ms (61.3 ms)``: the longest write loop of one broadcast on any worker, and the mean
    over workers; with the streams a socket could not take whole at once, per broadcast."""
    if not isinstance(workers, dict):
        return "—"
    text = f"{workers['write_ms_max']:,.1f} ms ({workers['write_ms_mean']:,.1f} ms)"
    if workers.get("deferred_per_broadcast"):
        text += f", {workers['deferred_per_broadcast']:,.0f} deferred"
    return text


def fmt_host_cpu(host: Any) -> str:
    """``mem 0.3 % / 71 %, bcast 0.1 % / 95 %, ...``: per phase, the CPU time the hypervisor stole
    and the whole machine's busy time, each as % of the phase's wall time × CPUs."""
    if not isinstance(host, dict):
        return "—"
    return ", ".join(f"{label} {host[key]['steal_pct']:.1f} % / {host[key]['busy_pct']:.0f} %"
                     for key, label, _ in HOST_PHASES if key in host) or "—"


def steal_warnings(result: Result) -> list[str]:
    """One line per variant and phase whose stolen CPU share is over ``STEAL_WARNING_PCT``."""
    lines = []
    for variant_name, variant in result.get("variants", {}).items():
        for key, _, name in HOST_PHASES:
            shares = dig(variant, "host_cpu", key)
            if shares and shares["steal_pct"] > STEAL_WARNING_PCT:
                lines.append(f"warning: {variant_name}, {name} phase: the hypervisor stole "
                             f"{shares['steal_pct']:.1f} % of the CPUs' time (machine busy "
                             f"{shares['busy_pct']:.0f} %): read that phase's figures with care")
    return lines


def total_per_stream(variant: Result) -> float | None:
    user = dig(variant, "memory", "slopes", "anon_pss", "bytes_per_conn")
    kernel = dig(variant, "memory", "slopes", "socket_caches_total")
    return None if user is None or kernel is None else user + kernel


# (row label, how to render it from one variant's result)
ROWS: list[tuple[str, Callable[[Result], str]]] = [
    ("Streams held (top level)", lambda v: fmt_count(dig(v, "memory", "top_connections"))),
    ("Levels sampled", lambda v: ", ".join(f"{n:,}" for n in dig(v, "memory", "levels") or []) or "—"),
    ("User memory / stream, RSS slope",
     lambda v: fmt_bytes(dig(v, "memory", "slopes", "rss", "bytes_per_conn"))),
    ("User memory / stream, USS slope (sum over processes)",
     lambda v: fmt_bytes(dig(v, "memory", "slopes", "uss", "bytes_per_conn"))),
    ("User memory / stream, anonymous PSS slope (sum)",
     lambda v: fmt_bytes(dig(v, "memory", "slopes", "anon_pss", "bytes_per_conn"))),
    ("Kernel / server socket, slab socket caches",
     lambda v: fmt_bytes(dig(v, "memory", "slopes", "socket_caches_total"))),
    ("Kernel / server socket, /proc/meminfo Slab",
     lambda v: fmt_bytes(dig(v, "memory", "slopes", "slab_total", "bytes_per_conn"))),
    ("Kernel TCP mem / stream, idle (sockstat)",
     lambda v: fmt_bytes_within(dig(v, "memory", "sockstat_mem_per_stream_idle"),
                                dig(v, "memory", "sockstat_resolution_per_stream"))),
    ("Kernel TCP mem / stream, broadcast in flight",
     lambda v: fmt_bytes_within(dig(v, "fanout", "sockstat_mem_per_stream_peak"),
                                dig(v, "memory", "sockstat_resolution_per_stream"))),
    ("Total / stream (anon PSS + socket caches)", lambda v: fmt_bytes(total_per_stream(v))),
    ("Broadcast fan-out p50 / p99 / max", lambda v: fmt_latency(dig(v, "fanout", "latency_ms"))),
    ("Broadcast events received / broadcasts × streams", lambda v: fmt_fanout_delivery(v)),
    ("Broadcast: server answer time (mean)", lambda v: fmt_ms(dig(v, "fanout", "answer_ms_mean"))),
    ("Broadcast: slowest worker's write loop (mean of workers)",
     lambda v: fmt_worker_writes(dig(v, "fanout", "workers"))),
    ("Broadcast: server CPU / stream written",
     lambda v: fmt_us(dig(v, "fanout", "server_cpu_us_per_stream_written"))),
    ("Broadcast: devices' CPU / event read",
     lambda v: fmt_us(dig(v, "fanout", "devices_cpu_us_per_event"))),
    ("Targeted push, 5 keep-alive senders", lambda v: fmt_rate(dig(v, "targeted", "keepalive", "per_second"))),
    ("Server CPU / push, 5 keep-alive senders", lambda v: fmt_us(dig(v, "targeted", "keepalive", "cpu_us_per_push"))),
    ("Targeted push, pipelined", lambda v: fmt_rate(dig(v, "targeted", "pipelined", "per_second"))),
    ("Server CPU / push, pipelined", lambda v: fmt_us(dig(v, "targeted", "pipelined", "cpu_us_per_push"))),
    ("Targeted events received / accepted",
     lambda v: fmt_delivery(dig(v, "targeted", "events"), dig(v, "targeted", "accepted"))),
    ("Connect rate (unpaced)", lambda v: fmt_rate(dig(v, "targeted", "connect_rate_per_s"))),
    ("Host: CPU stolen / machine busy, per phase", lambda v: fmt_host_cpu(v.get("host_cpu"))),
]


def markdown_table(result: Result) -> str:
    variants: dict[str, Result] = result.get("variants", {})
    names = list(variants)
    lines = ["| Figure | " + " | ".join(names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for label, render in ROWS:
        lines.append(f"| {label} | " + " | ".join(render(variants[n]) for n in names) + " |")
    return "\n".join(lines)


def headline(result: Result) -> str:
    """The headline figures against their targets (RSS slope, broadcast p99, CPU per push), one
    line per 1-worker rawsse variant."""
    lines = []
    for name, variant in result.get("variants", {}).items():
        if variant.get("kind") != "rawsse" or variant.get("workers") != 1:
            continue
        levels = dig(variant, "memory", "levels") or []
        span = f"{levels[0]:,}–{levels[-1]:,}" if levels else "?"
        lines.append(f"{name}: RSS slope {span} streams = "
                     f"{fmt_bytes(dig(variant, 'memory', 'slopes', 'rss', 'bytes_per_conn'))}/stream "
                     f"(target ≤ {TARGETS['rss_bytes_per_stream']} B); broadcast to "
                     f"{fmt_count(dig(variant, 'fanout', 'streams'))} streams p99 = "
                     f"{fmt_ms(dig(variant, 'fanout', 'latency_ms', 'p99'))} "
                     f"(target ≤ {TARGETS['latency_p99_ms']} ms); CPU per targeted push, 5 "
                     f"keep-alive senders = "
                     f"{fmt_us(dig(variant, 'targeted', 'keepalive', 'cpu_us_per_push'))} "
                     f"(target ≤ {TARGETS['cpu_us_per_push']} µs)")
    return "\n".join(lines)


def write_outputs(result: Result, out_dir: str, stem: str) -> dict[str, str]:
    """JSON + markdown (+ PNGs when matplotlib is there). Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"),
             "markdown": os.path.join(out_dir, stem + ".md")}
    table = markdown_table(result)
    result["table_markdown"] = table
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(paths["markdown"], "w") as f:
        f.write(f"# rawsse bench: {stem}\n\n{describe_run(result)}\n\n{table}\n\n"
                f"{headline(result)}\n")
        f.writelines(f"\n{line}\n" for line in steal_warnings(result))
    paths.update(write_plots(result, out_dir, stem))
    return paths


def describe_run(result: Result) -> str:
    meta = result.get("meta", {})
    return (f"Plan `{meta.get('plan')}`, {meta.get('started')}, kernel {meta.get('kernel')}, "
            f"Python {meta.get('python')}, {meta.get('cpus')} CPUs, fd hard limit "
            f"{meta.get('fd_hard_limit')}. Command: `{meta.get('command')}`")


def write_plots(result: Result, out_dir: str, stem: str) -> dict[str, str]:
    """The memory plot (``plots``), and ``rawsse report``'s latency CDF and devices connected
    drawn from this result, as ``<stem>-latency.png`` and ``<stem>-connected-devices.png``."""
    from rawsse.load import report as rawsse_report
    plt = rawsse_report.load_pyplot()
    if plt is None:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return {}
    from . import plots
    paths = plots.draw(plt, result, out_dir, stem)
    charts = rawsse_report.charts_for([(stem, stem, "bench", result)], {})
    written = rawsse_report.write_pngs(plt, charts, out_dir, prefix=stem + "-")
    return {**paths, **{f"{name}_png": path for name, path in written.items()}}
