"""One server variant through the bench's three phases, each bounded in count and time.

1. Memory: one ``rawsse devices`` run ramps up to the top level at a fixed rate; each time the
   server holds the next level, the devices are paused (SIGSTOP) so nothing is in flight, the
   server and kernel are sampled, and the devices resume. Slopes are fitted over the levels.
2. Fan-out: with the top level still connected, ``broadcasts`` stamped ``POST /broadcast`` requests
   (apns-id from ``rawsse.load.stamp``, so devices measure send→receipt); then the devices stop and
   their report gives the latency percentiles and the events received. Nothing else is sent to
   these devices, so their latency figures are the broadcast's alone.
3. Targeted: a second devices run connects unpaced (the connect rate), then ``rawsse push`` sends
   targeted pushes with 5 keep-alive senders and then pipelined; server CPU per push is the
   server processes' user+system CPU delta divided by the pushes accepted.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
import urllib.request
from typing import Any

from . import hostcpu, load, memory, procs

PUSH_BODY = b'{"mdm":"bench"}'
# Events per second the devices read in all, low side (18k events took ~0.2 s with one device
# process here): broadcasts are spaced so the devices have read one before the next is sent,
# otherwise the second broadcast's latency would include the first one's backlog.
DEVICE_READ_RATE = 30_000


@dataclasses.dataclass
class VariantSpec:
    """What to run: a server kind and worker count, its memory levels, and which phases."""

    name: str
    kind: str  # "rawsse" | "baseline"
    workers: int
    levels: list[int]
    fanout: bool = True
    targeted: bool = True
    root: str = procs.ROOT  # the checkout whose rawsse (server, devices, sender) runs


@dataclasses.dataclass
class PhaseSettings:
    """Sizes and pacing shared by every variant of a plan."""

    ramp: float  # connections per second while stepping through memory levels
    broadcasts: int
    broadcast_gap: float  # seconds between broadcasts (devices drain the previous one)
    targeted_devices: int
    targeted_pushes: int
    pipeline: int
    senders: int = 5


def run_variant(spec: VariantSpec, settings: PhaseSettings, log_dir: str) -> dict[str, Any]:
    """Start the server, run the phases, stop everything this started. Errors are recorded in the
    result (and the phases after them skipped) so one broken variant does not lose the others."""
    host: dict[str, Any] = {}  # per phase, the whole machine's stolen and busy CPU shares
    result: dict[str, Any] = {"kind": spec.kind, "workers": spec.workers, "host_cpu": host}
    holder, port = procs.reserve_port()
    # Keepalive comments off: they are not push cost, and 18k of them landing inside a push run
    # would add ~2 µs to every push's CPU figure. Memory per stream does not depend on them.
    extra = ["--keepalive", "0"]
    if spec.kind == "rawsse":
        # rawsse answers 503 past --max-connections (default 300,000, counted over all
        # connections): room for the bench's own broadcast and stats requests at the top level.
        extra += ["--max-connections", str(spec.levels[-1] + max(1000, spec.levels[-1] // 10))]
    server = procs.Server(spec.kind, spec.workers, "127.0.0.1", port, log_dir, extra=extra,
                          root=spec.root)
    started = time.monotonic()
    try:
        server.wait_ready()
        with hostcpu.phase(host, "memory"):
            result["memory"], devices = memory_phase(server, spec, settings, log_dir)
        try:
            if spec.fanout:
                tree = procs.process_tree(devices.pid)
                with hostcpu.phase(host, "fanout"):
                    result["fanout"] = fanout_phase(server, settings,
                                                    result["memory"]["top_connections"], tree)
        finally:
            result["memory"]["devices_report"] = stop_devices(devices)
        if spec.fanout:
            attach_device_report(result["fanout"], result["memory"]["devices_report"])
        if spec.targeted:
            result["targeted"] = targeted_phase(server, spec, settings, log_dir, host)
    except Exception as exc:  # recorded, shown under the table; the other variants still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["server_log_tail"] = server.output_tail(1500)
    finally:
        server.stop()
        holder.close()
    result["duration_s"] = round(time.monotonic() - started, 2)
    return result


# ---- phase 1: memory levels ----

def memory_phase(server: procs.Server, spec: VariantSpec, settings: PhaseSettings,
                 log_dir: str) -> tuple[dict[str, Any], procs.Child]:
    time.sleep(0.3)  # workers finish importing before the idle baseline is read
    base_fds = memory.open_fds(server.pids)
    idle = memory.sample(server.pids, 0)
    top = spec.levels[-1]
    ramp_seconds = top / settings.ramp
    report = f"{log_dir}/{spec.name}-memory-devices.json"
    # A bound, not a schedule: the bench stops these devices (SIGINT) after the fan-out phase.
    fanout_seconds = settings.broadcasts * (max(settings.broadcast_gap, top / DEVICE_READ_RATE) + 5)
    duration = ramp_seconds * 3 + fanout_seconds + 120
    devices = procs.Child(f"{spec.name}-memory-devices",
                          load.devices_argv(server.url, top, report, duration, ramp=settings.ramp),
                          log_dir, report_path=report, root=spec.root)
    samples = []
    try:
        for level in spec.levels:
            held = load.wait_for_connections(server.pids, base_fds, level,
                                             timeout=ramp_seconds * 2 + 30, alive=devices.running)
            devices.pause()
            try:
                held = load.wait_settled(server.pids, base_fds, quiet=0.2)
                samples.append(memory.sample(server.pids, held))
            finally:
                devices.resume()
            if held < level * 0.98:  # stalled: the fit would extrapolate beyond what was held
                break
        if len(samples) < 2 or samples[-1].connections == 0:
            raise RuntimeError(f"devices reached {held} of {spec.levels[0]}+ streams "
                               f"(exit code {devices.proc.poll()}):\n{devices.output_tail(1500)}")
        held = load.wait_settled(server.pids, base_fds, quiet=1.0, timeout=10.0)
        settled = memory.kernel_memory()  # every device has read its preamble by now
    except BaseException:
        stop_devices(devices)
        raise
    return {"levels": [s.connections for s in samples], "top_connections": held,
            "idle": idle.as_dict(), "idle_fds": base_fds, "samples": [s.as_dict() for s in samples],
            "slopes": memory.slopes(samples),
            "sockstat_mem_per_stream_idle": per_stream(settled.sockstat_mem,
                                                       idle.kernel.sockstat_mem, held),
            "sockstat_resolution_per_stream": per_stream(memory.sockstat_resolution(), 0, held),
            "server_stats": server_stats(server)}, devices


def per_stream(value: int, baseline: int, streams: int) -> float | None:
    return (value - baseline) / streams if streams else None


def stop_devices(devices: procs.Child) -> dict[str, Any]:
    """SIGINT ends a devices run early; it writes its report on the way out."""
    devices.stop(signal.SIGINT, timeout=30)
    return devices.report()


# ---- phase 2: broadcast fan-out ----

def fanout_phase(server: procs.Server, settings: PhaseSettings, streams: int,
                 device_pids: list[int]) -> dict[str, Any]:
    """Stamped broadcasts, ``broadcast_gap`` apart. Right after each answer the kernel's TCP memory
    is read: every stream then holds one unread event, charged about a 4 KB page in ``tcp_mem``
    accounting (tcp(7), tcp_mem) even for a small event. The server's and the devices' CPU over
    the phase (gaps included: the devices read their backlog in them) price a stream written and
    an event read; rawsse's ``/stats`` adds each worker's own write time."""
    from rawsse.load.stamp import new_stamped_id
    before = memory.kernel_memory().sockstat_mem
    stats_before = server_stats(server)
    server_cpu, devices_cpu = memory.cpu_seconds(server.pids), memory.cpu_seconds(device_pids)
    answers: list[dict[str, Any]] = []
    peak = before
    for _ in range(settings.broadcasts):
        apns_id = new_stamped_id()
        started = time.perf_counter()
        request = urllib.request.Request(server.url + "/broadcast", data=PUSH_BODY, method="POST",
                                         headers={"apns-id": apns_id})
        with urllib.request.urlopen(request, timeout=180) as resp:
            body = json.loads(resp.read())
        answer_ms = (time.perf_counter() - started) * 1000
        peak = max(peak, memory.kernel_memory().sockstat_mem)
        answers.append({"apns_id": apns_id, "streams": int(body.get("streams", 0)),
                        "refused": body.get("refused"),
                        "missing_workers": body.get("missing_workers", []),
                        "answer_ms": answer_ms})
        time.sleep(max(settings.broadcast_gap, streams / DEVICE_READ_RATE))
    server_cpu = memory.cpu_seconds(server.pids) - server_cpu
    devices_cpu = memory.cpu_seconds(device_pids) - devices_cpu
    written = sum(a["streams"] for a in answers)
    return {"streams": streams, "broadcasts": len(answers), "answers": answers,
            "server_reported_writes": written,
            "answer_ms_mean": sum(a["answer_ms"] for a in answers) / max(1, len(answers)),
            "sockstat_mem_per_stream_peak": per_stream(peak, before, streams),
            "server_cpu_s": round(server_cpu, 4), "devices_cpu_s": round(devices_cpu, 4),
            "server_cpu_us_per_stream_written": server_cpu / written * 1e6 if written else None,
            "workers": worker_write_figures(stats_before, server_stats(server), len(answers))}


def worker_write_figures(before: dict[str, Any] | None, after: dict[str, Any] | None,
                         broadcasts: int) -> dict[str, Any] | None:
    """Per worker and broadcast: the ms its write loop took and the streams whose socket took
    only part of the event (the rest written once writable), from rawsse's ``/stats`` counters
    ``broadcast_write_us`` and ``broadcast_deferred``; None for a server without them."""
    def workers(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
        doc = doc or {}
        return doc.get("workers") or [doc]  # the baseline: one process, one document

    workers_before = {w.get("worker"): w for w in workers(before)}
    figures = []
    for doc in workers(after):
        if "broadcast_write_us" not in doc or not broadcasts:
            return None
        was = workers_before.get(doc.get("worker"), {})
        figures.append({
            "worker": doc.get("worker"), "streams": doc.get("streams"),
            "write_ms": (doc["broadcast_write_us"] - was.get("broadcast_write_us", 0))
            / 1000 / broadcasts,
            "deferred": (doc.get("broadcast_deferred", 0) - was.get("broadcast_deferred", 0))
            / broadcasts})
    if not figures:
        return None
    times = [f["write_ms"] for f in figures]
    return {"write_ms_max": max(times), "write_ms_mean": sum(times) / len(times),
            "write_ms_sum": sum(times),
            "deferred_per_broadcast": sum(f["deferred"] for f in figures), "per_worker": figures}


def attach_device_report(fanout: dict[str, Any], report: dict[str, Any]) -> None:
    """The devices' view: events and latency; and the streams the broadcasts should have reached,
    counted by the devices (the server's fd count may include a few fds of its own: rawsse's
    workers open their links to each other lazily)."""
    latency = report.get("latency_ms") or {}
    if report.get("connected"):
        fanout["streams"] = report["connected"]
    fanout["expected_events"] = fanout["broadcasts"] * fanout["streams"]
    fanout["events"] = report.get("events")
    if fanout.get("events"):
        fanout["devices_cpu_us_per_event"] = fanout["devices_cpu_s"] / fanout["events"] * 1e6
    fanout["duplicates"] = report.get("duplicates")
    fanout["latency_ms"] = {k: latency[k] for k in ("count", "p50", "p90", "p99", "max")
                            if k in latency}
    hist = latency.get("histogram") or report.get("latency_histogram")
    if hist:
        fanout["histogram"] = hist


# ---- phase 3: targeted pushes ----

def targeted_phase(server: procs.Server, spec: VariantSpec, settings: PhaseSettings,
                   log_dir: str, host: dict[str, Any]) -> dict[str, Any]:
    """The connect rate, then the push runs; ``host`` gets the host's CPU shares over each
    (``connect``, ``targeted``)."""
    count = min(settings.targeted_devices, spec.levels[-1])
    base_fds = load.wait_fds_steady(server.pids)
    report = f"{log_dir}/{spec.name}-targeted-devices.json"
    pushes_time = 2 * (settings.targeted_pushes / 1000 + 30)
    devices = procs.Child(f"{spec.name}-targeted-devices",
                          load.devices_argv(server.url, count, report, duration=pushes_time + 120),
                          log_dir, report_path=report, root=spec.root)
    result: dict[str, Any] = {"devices": count}
    try:
        with hostcpu.phase(host, "connect"):
            started = time.monotonic()
            held = load.wait_for_connections(server.pids, base_fds, count, timeout=120,
                                             alive=devices.running)
            result["connected"] = held
            result["connect_rate_per_s_server"] = held / max(1e-6, time.monotonic() - started)
        load.wait_settled(server.pids, base_fds)
        with hostcpu.phase(host, "targeted"):
            result["keepalive"] = push_run(server, spec, settings, count, 1, log_dir)
            result["pipelined"] = push_run(server, spec, settings, count, settings.pipeline,
                                           log_dir)
        time.sleep(1.0)  # the last events reach the devices before they stop
    finally:
        device_report = stop_devices(devices)
    result["devices_report"] = device_report
    result["events"] = device_report.get("events")
    result["accepted"] = sum((result.get(m) or {}).get("accepted") or 0
                             for m in ("keepalive", "pipelined"))
    result["connect_rate_per_s"] = device_report.get("connect_rate_per_s",
                                                     result["connect_rate_per_s_server"])
    return result


def push_run(server: procs.Server, spec: VariantSpec, settings: PhaseSettings, tokens: int,
             pipeline: int, log_dir: str) -> dict[str, Any]:
    """One ``rawsse push`` run; CPU per push from the server's CPU time delta."""
    report = f"{log_dir}/{spec.name}-push-p{pipeline}.json"
    argv = load.push_argv(server.url, settings.targeted_pushes, tokens, report,
                          senders=settings.senders, pipeline=pipeline, max_time=60)
    cpu_before = memory.cpu_seconds(server.pids)
    code, output = procs.run_to_end(f"{spec.name}-push-p{pipeline}", argv, log_dir, timeout=90,
                                    root=spec.root)
    cpu = memory.cpu_seconds(server.pids) - cpu_before
    push_report = procs.read_report(report)
    accepted = push_report.get("accepted") or 0
    return {"exit_code": code, "senders": settings.senders, "pipeline": pipeline,
            "sent": push_report.get("sent"), "accepted": accepted,
            "per_second": push_report.get("per_second"), "statuses": push_report.get("statuses"),
            "response_latency_ms": push_report.get("latency_ms"),
            "server_cpu_s": round(cpu, 4),
            "cpu_us_per_push": cpu / accepted * 1e6 if accepted else None,
            **({} if push_report else {"output_tail": output[-1500:]})}


def server_stats(server: procs.Server) -> dict[str, Any] | None:
    try:
        return server.stats()
    except (OSError, ValueError):
        return None
