"""``rawsse devices``: N simulated devices holding SSE streams, as Fleet's apnsmock client does.

Theory of operation
-------------------
The parent process plans the run and forks P children; each child owns a contiguous slice of the
device tokens and 1/P of the connect ramp, and runs one ``rawsse.server.loop.Loop`` with one small
``Device`` object per device (no task, no coroutine, no per-device buffer while idle). Children
send counter snapshots to the parent over a pipe (JSON lines, every ``SNAPSHOT_SECONDS``); the
parent prints the progress line, and merges the final snapshots (counters, latency histograms,
timelines) into the report. Everything stops by itself at ``--duration``.

Rules (each from Fleet's client, fleetdm/fleet ``pkg/mdm/apnsmock/client.go``)
------------------------------------------------------------------------------
- Request ``GET {base}/events?token={lowercase hex}`` with ``Accept: text/event-stream``; any
  status but 200 is an error and is retried.
- Parser: lines split on ``\\n`` with one trailing ``\\r`` dropped; blank line ends an event (one is
  delivered only if it had ``data:``); ``:`` comment, ``event:``, ``id:``, ``retry:`` are ignored
  by Fleet (``id:`` is read here for the latency stamp); any other line, or a line of 8192 bytes or
  more (Go's ``bufio.Scanner`` with a max buffer of 8192), drops the stream: counted in errors.
  A read of whole events of the shape rawsse writes is counted without the line parser, with
  the same result (``Device.feed``): the devices share the server's cores in every bench.
- Reconnect after every stream end, clean or not: sleep ``backoff + uniform[0, backoff/2]``, then
  ``backoff = min(2 × backoff, max)``; a *healthy* stream (≥ 1 event, or up ≥ max backoff) resets
  the backoff to the minimum first. So 300k devices cut at once come back spread over 1–1.5 s.
- The first connect waits for its ramp slot (``--ramp`` per second, shared by the children) and
  then ``uniform[0, --jitter)`` (Fleet's ``WithInitialJitter``).

Tokens and source addresses: see ``rawsse.load.loadgen`` (Fleet mdmtest's ``hex("token" + serial)``
with a 12-digit decimal serial; 127.0.0.x sources bound with ``IP_BIND_ADDRESS_NO_PORT`` so no
(source, destination, port) tuple runs out of ephemeral ports; ip(7), IP_BIND_ADDRESS_NO_PORT).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

from rawsse.load import loadgen, progress, summary
from rawsse.limits import raise_nofile_limit
from rawsse.config import ConfigError
from rawsse.load.device import Device
from rawsse.load.stamp import LatencyHistogram
from rawsse.server.loop import Loop

EPILOG = """\
examples:
  rawsse devices --url http://127.0.0.1:8378 --count 1000 --duration 30 --report devices.json
  rawsse devices --url http://127.0.0.1:8378 --count 300000 --ramp 5000 --duration 900
  rawsse push --url http://127.0.0.1:8378 --tokens fleet:0-999     # reaches the 1000 above

report (JSON): count, processes, connected (at end), peak_connected, events, duplicates,
  latency_ms {count,p50,p90,p99,max,mean} (push's apns-id stamp → receipt), reconnects,
  errors {kind: n}, duration_s, connect_rate_per_s; also unstamped (events whose id is not a
  rawsse stamp), attempts, connects, latency_histogram (mergeable), and timeline {bin_s,
  attempts, connects, drops} (counts per time bin since the start, --timeline-bin, at most
  100,000 bins: a longer run gets wider ones; devices connected at a bin's end = the running sum
  of connects - drops, what `rawsse report` draws), and ended (done, expected_events, gave_up,
  SIGINT or SIGTERM).
progress line (stderr, each second): connected/--count (peak), events (/s), reconnects, errors
  by kind, "ramp 0:05" until the last first connect is due (its --ramp slot + --jitter; "ramp ?"
  after that while some device never got a stream), and the ETA: the --duration left (or the
  --expect-events left at the last 5 s's rate, when sooner). At the end a summary table (not
  under --quiet): connected, peak, reconnects, events received, latency p50/p99 when measured,
  errors by kind.
exit codes:
  0  the run ended and enough devices were connected (see --fail-under); also after SIGINT or
     SIGTERM, the way a harness ends a run early (the report and a summary line are written)
  1  too few devices: under --fail-under at the end or, without it, none ever connected; or a
     child process failed
  2  a flag cannot be used (one line names it; --report is checked before the run)
  3  not one device got a stream from --url within --give-up-after seconds: gave up
"""

FD_MARGIN = 100  # fds a child keeps for epoll, its wakeup pair, the pipe, stdio, imports
SNAPSHOT_SECONDS = 0.25
MAX_TIMELINE_BINS = 100_000

# -- one process's devices ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Plan:
    """What every child needs, decided once by the parent."""

    host: str
    port: int
    base_path: str
    scheme: str
    token_start: int
    token_seed: int
    count: int
    processes: int
    sources: tuple[str, ...]
    ramp: float  # connections per second, all processes together; 0 = no pacing
    jitter: float
    duration: float
    connect_timeout: float
    backoff_min: float
    backoff_max: float
    timeline_bin: float
    start: float  # time.monotonic() of the run's start, shared by every child


class DeviceGroup:
    """The devices of one process, its ramp, and its counters."""

    def __init__(self, loop: Loop, plan: Plan, first: int, count: int) -> None:
        self.loop = loop
        self.plan = plan
        self.address = (plan.host, plan.port)
        host = loadgen.host_header(plan.host, plan.port)
        self.request_prefix = f"GET {plan.base_path}/events?token=".encode()
        self.request_suffix = (f" HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
                               .encode())
        self.connect_timeout = plan.connect_timeout
        self.backoff_min, self.backoff_max = plan.backoff_min, plan.backoff_max
        self.stopping = False
        tokens = loadgen.tokens_for(plan.scheme, plan.token_start + first, count, plan.token_seed)
        sources = plan.sources
        self.devices = [Device(self, token.encode(), sources[(first + k) % len(sources)]
                               if sources else None) for k, token in enumerate(tokens)]
        self.released = 0
        # counters
        self.connected = self.peak_connected = self.connects = self.first_connects = 0
        self.attempts = self.reconnects = 0
        self.events = self.duplicates = self.unstamped = 0
        self.last_first_connect = 0.0
        self.errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        # The last event id seen and its stamp (None: not a stamp), for the next device's event
        # of the same broadcast: one regex and two int parses less per event.
        self.last_id = b""
        self.last_stamp: float | None = None
        bins = min(MAX_TIMELINE_BINS, int(plan.duration / plan.timeline_bin) + 2)
        self.timeline = {"attempts": [0] * bins, "connects": [0] * bins, "drops": [0] * bins}

    def _bin(self) -> int:
        index = int((self.loop.now - self.plan.start) / self.plan.timeline_bin)
        return min(max(index, 0), len(self.timeline["attempts"]) - 1)

    def on_attempt(self, device: Device) -> None:
        self.attempts += 1
        if device.attempts:
            self.reconnects += 1
        self.timeline["attempts"][self._bin()] += 1

    def on_stream_start(self, device: Device) -> None:
        self.connected += 1
        self.connects += 1
        if self.connected > self.peak_connected:
            self.peak_connected = self.connected
        if device.attempts == 1:
            self.first_connects += 1
            self.last_first_connect = self.loop.now - self.plan.start
        self.timeline["connects"][self._bin()] += 1

    def on_stream_end(self) -> None:
        self.connected -= 1
        if not self.stopping:  # our own closes at the end are not drops
            self.timeline["drops"][self._bin()] += 1

    def release_due(self) -> None:
        """Start the devices whose ramp slot has come; re-arm until all are released."""
        plan, devices = self.plan, self.devices
        if self.stopping:
            return
        rate = plan.ramp / plan.processes
        due = len(devices) if rate <= 0 else min(
            len(devices), int((self.loop.now - plan.start) * rate) + 1)
        for device in devices[self.released:due]:
            if plan.jitter > 0:
                device.timer = self.loop.call_later(random.uniform(0, plan.jitter), device.connect)
            else:
                device.connect()
        self.released = max(self.released, due)
        if self.released < len(devices):
            self.loop.call_later(max(0.005, 1.0 / rate), self.release_due)

    def stop(self) -> None:
        self.stopping = True
        for device in self.devices:
            device.stop()

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        snap: dict[str, Any] = {
            "connected": self.connected, "peak_connected": self.peak_connected,
            "events": self.events, "duplicates": self.duplicates, "unstamped": self.unstamped,
            "attempts": self.attempts, "reconnects": self.reconnects, "connects": self.connects,
            "first_connects": self.first_connects, "last_first_connect": self.last_first_connect,
            "errors": self.errors, "final": final,
        }
        if final:
            snap["latency"] = self.latency.to_dict()
            snap["timeline"] = self.timeline
        return snap


# -- child process ------------------------------------------------------------------------------

def run_child(plan: Plan, first: int, count: int, write_fd: int, parent: int) -> int:
    """One child: its slice of devices on its own loop until the duration ends or SIGTERM/SIGINT;
    a snapshot line every ``SNAPSHOT_SECONDS``, then the final one."""
    loop = Loop()
    group = DeviceGroup(loop, plan, first, count)
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.append(signum)  # only a flag: the loop's wakeup hook acts on it

    def finish() -> None:
        if group.stopping:
            return
        connected_at_end = group.connected
        group.stop()
        snap = group.snapshot(final=True)
        snap["connected"] = connected_at_end
        loadgen.send_line(write_fd, snap)
        loop.stop()

    def tick() -> None:
        if group.stopping:
            return
        if stop_requested or os.getppid() != parent or loop.now >= plan.start + plan.duration:
            finish()
            return
        loadgen.send_line(write_fd, group.snapshot())
        loop.call_later(SNAPSHOT_SECONDS, tick)

    loop.on_wakeup = lambda: finish() if stop_requested else None
    signal.set_wakeup_fd(loop.wakeup_fd())
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    loop.call_soon(group.release_due)
    loop.call_soon(tick)
    loop.run()
    return 0


# -- parent: plan, fork, collect, report --------------------------------------------------------

def default_processes(count: int) -> int:
    """Enough children that none holds more sockets than its open-file limit allows."""
    per_process = max(1, raise_nofile_limit() - FD_MARGIN)
    return max(1, math.ceil(count / per_process))


class Collector:
    """The parent's view: the latest snapshot of each child, the progress line, the report."""

    def __init__(self, plan: Plan, quiet: bool, expect_events: int = 0) -> None:
        self.plan = plan
        self.expect_events = expect_events
        self.pace = progress.RateMeter()  # events received per second, for the ETA
        self.latest: dict[int, dict[str, Any]] = {}
        self.peak_connected = 0
        self.progress_line = loadgen.ProgressLine(quiet)
        self._last_events = 0
        self._last_print = time.monotonic()

    def add(self, child: int, snap: dict[str, Any]) -> None:
        self.latest[child] = snap
        if not snap.get("final"):
            self.peak_connected = max(self.peak_connected, self.total("connected"))

    def total(self, key: str) -> int:
        return sum(snap.get(key, 0) for snap in self.latest.values())

    def errors(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for snap in self.latest.values():
            loadgen.merge_counts(merged, snap.get("errors", {}))
        return dict(sorted(merged.items()))

    def progress(self, final: bool = False) -> None:
        now = time.monotonic()
        events = self.total("events")
        rate = (events - self._last_events) / max(now - self._last_print, 1e-6)
        self._last_events, self._last_print = events, now
        self.pace.sample(now - self.plan.start, events)
        errors = loadgen.count_summary(self.errors())
        eta = progress.eta_text(0.0) if final else self.ramp_left(now) + self.eta(now)
        self.progress_line.show(
            f"devices t={now - self.plan.start:5.1f}s connected {self.total('connected')}"
            f"/{self.plan.count} (peak {self.peak_connected}) events {events} ({rate:.0f}/s) "
            f"reconnects {self.total('reconnects')} errors {errors} {eta}")

    def eta(self, now: float) -> str:
        """The run ends at ``--duration`` (exact), or sooner once ``--expect-events`` events
        came, at the rate they came over the last seconds."""
        time_left = max(0.0, self.plan.start + self.plan.duration - now)
        work_left = self.expect_events - self.total("events") if self.expect_events else None
        return progress.eta_text(time_left, work_left, self.pace.rate)

    def ramp_left(self, now: float) -> str:
        """``"ramp 0:05 "`` until the last first connect is due (its ``--ramp`` slot plus at
        most ``--jitter``); ``"ramp ? "`` once it is due and some device never got a stream;
        nothing once every device had one."""
        plan = self.plan
        if self.total("first_connects") >= plan.count:
            return ""
        last_slot = (plan.count - plan.processes) / plan.ramp if plan.ramp > 0 else 0.0
        due_in = plan.start + last_slot + plan.jitter - now
        return f"ramp {progress.clock(due_in)} " if due_in > 0 else "ramp ? "

    def report(self, ended: float, failed_children: int) -> dict[str, Any]:
        latency = LatencyHistogram()
        timeline: dict[str, list[int]] = {}
        for snap in self.latest.values():
            if "latency" in snap:
                latency.merge(LatencyHistogram.from_dict(snap["latency"]))
            for name, counts in snap.get("timeline", {}).items():
                timeline[name] = [a + b for a, b in zip(timeline[name], counts)] \
                    if name in timeline else list(counts)
        errors = self.errors()
        if failed_children:
            errors["child_failed"] = failed_children
        first = self.total("first_connects")
        last_first = max((s.get("last_first_connect", 0.0) for s in self.latest.values()),
                         default=0.0)
        return {
            "count": self.plan.count, "processes": self.plan.processes,
            "connected": self.total("connected"),
            # at least what any one child held at once: a stream shorter than a snapshot counts
            "peak_connected": max(self.peak_connected, self.total("connected"),
                                  *(s.get("peak_connected", 0) for s in self.latest.values())),
            "events": self.total("events"), "duplicates": self.total("duplicates"),
            "latency_ms": latency.summary(),
            "reconnects": self.total("reconnects"), "errors": errors,
            "duration_s": round(ended - self.plan.start, 3),
            "connect_rate_per_s": round(first / last_first, 1) if last_first > 0 else 0.0,
            "unstamped": self.total("unstamped"), "attempts": self.total("attempts"),
            "connects": self.total("connects"), "first_connects": first,
            "sources": len(self.plan.sources),
            "latency_histogram": latency.to_dict(),
            "timeline": {"bin_s": self.plan.timeline_bin, **_trimmed(timeline)},
        }


def _trimmed(timeline: dict[str, list[int]]) -> dict[str, list[int]]:
    """Drop the all-zero bins at the end (a run stopped early, or a day-long one)."""
    used = max((i + 1 for counts in timeline.values() for i, n in enumerate(counts) if n),
               default=0)
    return {name: counts[:used] for name, counts in timeline.items()}


# -- CLI ----------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8378", help="server base URL")
    parser.add_argument("--count", type=int, default=100, help="devices (default 100)")
    parser.add_argument("--processes", type=int, default=0,
                        help="child processes (default: enough to keep each under its open-file "
                             "limit, after raising the soft limit to the hard one)")
    parser.add_argument("--source-addresses", default="auto", metavar="SPEC",
                        help="source IPs to spread connections over: auto (enough 127.0.0.x for "
                             "the ephemeral port range), none, N, A-B or a,b,c (default auto)")
    parser.add_argument("--ramp", type=float, default=2000.0, metavar="PER_SECOND",
                        help="first connects per second, all processes together; 0 = at once "
                             "(default 2000)")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS",
                        help="extra delay uniform in [0, SECONDS) before each first connect")
    parser.add_argument("--token-scheme", default="fleet", metavar="SCHEME",
                        help="fleet (hex('token'+f'{i:012d}'), like Fleet's mdmtest), random "
                             "(32-byte, from --token-seed) or file:PATH (default fleet)")
    parser.add_argument("--token-start", type=int, default=0, metavar="I",
                        help="first token index (default 0)")
    parser.add_argument("--token-seed", type=int, default=0, metavar="N",
                        help="seed of the random scheme (default 0)")
    parser.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                        help="stop after this long (default 60)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="connect + response head deadline (default 10)")
    parser.add_argument("--backoff-min", type=float, default=1.0, metavar="SECONDS",
                        help="first reconnect delay, before jitter (default 1, Fleet's)")
    parser.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS",
                        help="reconnect delay cap (default 30, Fleet's)")
    parser.add_argument("--expect-events", type=int, default=0, metavar="K",
                        help="stop early once K events were received in all (for tests)")
    parser.add_argument("--timeline-bin", type=float, default=1.0, metavar="SECONDS",
                        help="bin width of the report's timeline (default 1)")
    loadgen.add_exit_arguments(
        parser, share_of="the share of --count devices connected at the end",
        default_verdict="exit 1 only when no device ever connected",
        give_up="end the run (exit 3) when not one device connected this long after the start "
                "(after --jitter)")
    parser.add_argument("--report", metavar="PATH", help="write the JSON report here (default: "
                                                          "stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def make_plan(args: argparse.Namespace) -> Plan:
    if args.count < 1:
        raise ConfigError("--count", "must be at least 1")
    if args.duration <= 0 or args.timeline_bin <= 0:
        raise ConfigError("--duration", "--duration and --timeline-bin must be positive")
    if not 0 < args.backoff_min <= args.backoff_max:
        raise ConfigError("--backoff-min", "needs 0 < --backoff-min <= --backoff-max")
    loadgen.check_exit_arguments(args)
    host, port, base = loadgen.parse_url(args.url)
    processes = args.processes or default_processes(args.count)
    raise_nofile_limit()
    loadgen.tokens_for(args.token_scheme, args.token_start + args.count - 1, 1,
                       args.token_seed)  # a bad scheme or short file fails here, once
    return Plan(host=host, port=port, base_path=base, scheme=args.token_scheme,
                token_start=args.token_start, token_seed=args.token_seed, count=args.count,
                processes=max(1, min(processes, args.count)),
                sources=tuple(loadgen.parse_sources(args.source_addresses, args.count, host)),
                ramp=max(0.0, args.ramp), jitter=max(0.0, args.jitter), duration=args.duration,
                connect_timeout=args.connect_timeout, backoff_min=args.backoff_min,
                backoff_max=args.backoff_max,
                timeline_bin=max(args.timeline_bin, args.duration / MAX_TIMELINE_BINS),
                start=time.monotonic())


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    collector = Collector(plan, args.quiet, args.expect_events)
    base, extra = divmod(plan.count, plan.processes)
    sizes = [base + (1 if k < extra else 0) for k in range(plan.processes)]
    slices = [(sum(sizes[:k]), sizes[k]) for k in range(plan.processes)]
    parent = os.getpid()
    children = loadgen.fork_workers(
        slices, lambda first, count, fd: run_child(plan, first, count, fd, parent))
    stops = loadgen.StopSignals().install()
    ended = ["done"]

    def should_stop() -> bool:
        if args.expect_events and collector.total("events") >= args.expect_events:
            ended[0] = "expected_events"
            return True
        if never_connected(collector, plan, args.give_up_after):
            ended[0] = "gave_up"
            return True
        return False

    try:
        failed = loadgen.collect_lines(children, collector.add, collector.progress, should_stop,
                                       plan.start + plan.duration + 15.0, stops)
    finally:
        stops.restore()
    if stops.name is not None:
        ended[0] = stops.name
    report = collector.report(time.monotonic(), failed)
    report["ended"] = ended[0]
    collector.progress(final=True)
    collector.progress_line.done()
    loadgen.write_report(report, args.report)
    summary.show(summary.title("devices", report), summary.devices_rows(report), args.quiet)
    return verdict(report, args, failed)


def never_connected(collector: Collector, plan: Plan, give_up_after: float) -> bool:
    """``--give-up-after`` passed since the start (and the jitter) and no device connected."""
    return (give_up_after > 0 and collector.total("connects") == 0
            and time.monotonic() - plan.start >= plan.jitter + give_up_after)


def verdict(report: dict[str, Any], args: argparse.Namespace, failed_children: int) -> int:
    """The exit code (see EPILOG), with one closing line when it is not 0 or a signal ended it."""
    where = f"report in {args.report}" if args.report else "report on stdout"
    tally = (f"connected {report['connected']} of {report['count']} (peak "
             f"{report['peak_connected']}), events {report['events']}, errors "
             f"{loadgen.count_summary(report['errors'])}")
    if report["ended"] == "gave_up":
        loadgen.closing_line("devices", f"not one device got a stream from {args.url} within "
                                        f"{args.give_up_after:g} s (--give-up-after), gave up: "
                                        f"{tally}")
        return loadgen.EXIT_UNREACHABLE
    if report["ended"] in ("SIGINT", "SIGTERM"):
        loadgen.closing_line("devices", f"stopped by {report['ended']} after "
                                        f"{report['duration_s']:.1f} s: {tally}; {where}")
    if failed_children:
        loadgen.closing_line("devices", f"{failed_children} of {report['processes']} child "
                                        f"processes failed (see above): {tally}")
        return loadgen.EXIT_FAILED
    if args.fail_under is None:  # without the flag: did any device ever connect
        return loadgen.share_verdict("devices", report["peak_connected"], report["count"], None,
                                     "devices ever connected", tally)
    return loadgen.share_verdict("devices", report["connected"], report["count"],
                                 args.fail_under, "devices connected at the end", tally)
