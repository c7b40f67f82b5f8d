"""``rawsse report FILE.json…``: the JSON reports of ``rawsse push`` and ``rawsse devices``, and
bench results (``bench/run.py``), drawn as PNGs: a latency CDF, pushes/s over time and devices
connected over time.

Each file's kind is recognised by its fields; each file is one *variant* (its stem without a
trailing ``-push``/``-devices``, so ``a-push.json`` and ``a-devices.json`` are both ``a``, or its
``--label``), and a bench result adds one variant per variant it measured. Every variant keeps
one colour in every plot (``variant_colours``), so a run reads the same across the three.

This module turns files into ``Chart`` data (curves and target lines, no matplotlib);
``rawsse.load.plots`` draws them, imported only once matplotlib was found (the ``[report]``
extra), so every other command runs without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson

from rawsse.config import ConfigError
from rawsse.load.stamp import LatencyHistogram

EPILOG = """\
files (recognised by their fields):
  push report      `rawsse push --report`: latency CDF (answers, solid), pushes/s over time
                   (200s solid, other statuses dashed), --rate as a target line
  devices report   `rawsse devices --report`: latency CDF (push stamp to device, dashed), devices
                   connected over time, --count as a target line
  bench result     `bench/run.py`'s JSON: each variant's broadcast fan-out CDF and the devices
                   connected during its memory ramp; its `targets` {latency_p99_ms, per_second,
                   connected} as target lines
variants: a file's stem without a trailing -push or -devices (a-push.json and a-devices.json are
  both variant "a"), or its --label; a bench result's variants by their bench names. One colour
  per variant in every plot (20 colours, then they repeat); every axis starts at 0.
written (in --out, those with something to draw; their paths on stdout):
  latency.png, pushes-per-second.png, connected-devices.png
examples:
  rawsse report base-push.json base-devices.json tuned-push.json tuned-devices.json --out plots
  rawsse report run1.json run2.json --label before --label after --target-latency-ms 50
  rawsse report bench/results/final-18k.json
exit codes:
  0  the PNGs were written
  1  nothing to draw in those files (no answers, no series)
  2  a flag or a file cannot be used (one line names it), or matplotlib is not installed
"""

NAMES = {"latency": "latency.png", "rate": "pushes-per-second.png",
         "connected": "connected-devices.png"}
VARIANT_SUFFIXES = ("-push", "-devices", "_push", "_devices", ".push", ".devices")
INSTALL_HINT = ("matplotlib is not installed: pip install 'rawsse[report]' "
                "(from a checkout: pip install -e '.[report]')")


@dataclass
class Curve:
    """One line: ``variant`` picks its colour, ``style`` what it measured (solid, dashed)."""

    variant: str
    label: str
    xs: list[float]
    ys: list[float]
    style: str = "-"


@dataclass
class Mark:
    """A target line at ``value``: in the variant's colour, or black for a target of all."""

    value: float
    label: str
    variant: str | None = None


@dataclass
class Chart:
    curves: list[Curve] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)


@dataclass
class Charts:
    """What the three plots hold, and the variants in the order their colours are given."""

    variants: list[str] = field(default_factory=list)
    latency: Chart = field(default_factory=Chart)
    rate: Chart = field(default_factory=Chart)
    connected: Chart = field(default_factory=Chart)

    def note(self, variant: str) -> None:
        if variant not in self.variants:
            self.variants.append(variant)

    def drawable(self) -> dict[str, Chart]:
        return {name: chart for name, chart in (("latency", self.latency), ("rate", self.rate),
                                                ("connected", self.connected)) if chart.curves}


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf",  # matplotlib's tab10, then tab20's light shades
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
           "#c7c7c7", "#dbdb8d", "#9edae5")


def variant_colours(variants: list[str]) -> dict[str, str]:
    return {name: PALETTE[k % len(PALETTE)] for k, name in enumerate(variants)}


# -- files → kinds and variants -----------------------------------------------------------------

def kind_of(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("variants"), dict):
        return "bench"
    if {"sent", "statuses", "latency_ms"} <= data.keys():
        return "push"
    if {"count", "peak_connected", "timeline"} <= data.keys():
        return "devices"
    return None


def read_report(path: str) -> tuple[str, dict[str, Any]]:
    """(kind, data), or a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except OSError as exc:
        raise ConfigError(path, f"cannot read it: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(path, f"not JSON ({exc})") from None
    kind = kind_of(data)
    if kind is None:
        raise ConfigError(path, "not a rawsse push report, devices report or bench result")
    return kind, data


def default_variant(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in VARIANT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return stem


def labelled(paths: list[str], labels: list[str]) -> list[tuple[str, str]]:
    """(path, variant) for each file: ``--label`` in order, else the stem."""
    if labels and len(labels) != len(paths):
        raise ConfigError("--label", f"{len(labels)} labels for {len(paths)} files: give one "
                                     f"per file, in the files' order")
    return [(path, labels[k] if labels else default_variant(path))
            for k, path in enumerate(paths)]


def charts_for(files: list[tuple[str, str, str, dict[str, Any]]],
               targets: dict[str, float], prefix_bench: bool = False) -> Charts:
    """``files`` as (path, variant, kind, data) → the charts; ``targets`` from the flags.
    ``prefix_bench`` names a bench result's variants ``variant/name`` (several bench files)."""
    charts = Charts()
    seen: dict[tuple[str, str], str] = {}
    for path, variant, kind, data in files:
        if kind == "bench":
            add_bench(charts, data, variant + "/" if prefix_bench else "")
            continue
        if (variant, kind) in seen:
            raise ConfigError("--label", f"{seen[variant, kind]} and {path} are both {kind} "
                                         f"reports of variant {variant!r}: give each its --label")
        seen[variant, kind] = path
        (add_push if kind == "push" else add_devices)(charts, variant, data)
    add_targets(charts, targets)
    return charts


def add_targets(charts: Charts, targets: dict[str, Any]) -> None:
    """``latency_p99_ms``, ``per_second``, ``connected``: one black line each, once."""
    drawn = {(mark.label, mark.value) for chart in (charts.latency, charts.rate, charts.connected)
             for mark in chart.marks}
    for key, chart, label in (("latency_p99_ms", charts.latency, "target p99 ≤ {:g} ms"),
                              ("per_second", charts.rate, "target {:,g} pushes/s"),
                              ("connected", charts.connected, "target {:,g} devices")):
        value = targets.get(key)
        if isinstance(value, (int, float)) and value > 0 and \
                (label.format(value), value) not in drawn:
            chart.marks.append(Mark(float(value), label.format(value)))


# -- one kind each --------------------------------------------------------------------------------

def latency_curve(variant: str, what: str, latency: dict[str, Any], histogram: Any,
                  style: str) -> Curve | None:
    """The CDF from the histogram when the report has one, else from its percentiles alone."""
    if isinstance(histogram, dict) and histogram.get("buckets"):
        points = LatencyHistogram.from_dict(histogram).cdf()
    elif latency.get("count"):
        points = [(0.0, 0.0)] + [(latency[k], q) for k, q in
                                 (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
                                 if k in latency]
    else:
        return None
    label = f"{variant}: {what}"
    if latency.get("count"):
        label += f" (p50 {latency['p50']:g}, p99 {latency['p99']:g}, max {latency['max']:g} ms)"
    return Curve(variant, label, [p[0] for p in points], [p[1] for p in points], style)


def add_run(charts: Charts, variant: str, report: dict[str, Any], what: str,
            style: str) -> None:
    """A push or devices report's variant and its latency CDF (from its histogram)."""
    charts.note(variant)
    curve = latency_curve(variant, what, report.get("latency_ms") or {},
                          report.get("latency_histogram"), style)
    if curve:
        charts.latency.curves.append(curve)


def rate_curves(variant: str, series: dict[str, Any]) -> list[Curve]:
    """Pushes/s in each interval of the push report's ``series``: 200s, and other statuses
    (dashed) when there were any."""
    t_s = series.get("t_s") or []
    if not t_s:
        return []
    edges, curves = [0.0] + list(t_s), []
    for column, style, what in (("accepted", "-", "200"), ("rejected", "--", "other statuses")):
        counts = series.get(column) or []
        if column == "accepted" or any(counts):
            rates = [n / max(b - a, 1e-9) for n, a, b in zip(counts, edges, edges[1:])]
            curves.append(Curve(variant, f"{variant}: {what}", edges, rates[:1] + rates, style))
    return curves


def add_push(charts: Charts, variant: str, report: dict[str, Any]) -> None:
    add_run(charts, variant, report, "push answers", "-")
    charts.rate.curves += rate_curves(variant, report.get("series") or {})
    if report.get("rate"):
        charts.rate.marks.append(Mark(float(report["rate"]),
                                      f"{variant}: --rate {report['rate']:,g}/s", variant))


def connected_curve(variant: str, report: dict[str, Any], what: str) -> Curve | None:
    """Devices connected at each timeline bin's end: the running sum of connects - drops (the
    devices' own closes at the end are not drops), held to the run's end."""
    timeline = report.get("timeline") or {}
    width = timeline.get("bin_s") or 0
    connects, drops = timeline.get("connects") or [], timeline.get("drops") or []
    if not width or not connects:
        return None
    xs, ys, held = [0.0], [0.0], 0
    for k, (up, down) in enumerate(zip(connects, drops)):
        held += up - down
        xs.append((k + 1) * width)
        ys.append(float(held))
    end = float(report.get("duration_s") or 0)
    if end > xs[-1]:
        xs.append(end)
        ys.append(ys[-1])
    return Curve(variant, f"{variant}: {what}", xs, ys)


def add_devices(charts: Charts, variant: str, report: dict[str, Any]) -> None:
    add_run(charts, variant, report, "push to device", "--")
    connected = connected_curve(variant, report, "connected")
    if connected:
        charts.connected.curves.append(connected)
        charts.connected.marks.append(Mark(float(report["count"]),
                                           f"{variant}: --count {report['count']:,}", variant))


def add_bench(charts: Charts, result: dict[str, Any], prefix: str) -> None:
    for name, variant in result["variants"].items():
        if not isinstance(variant, dict):
            continue
        label = prefix + name
        charts.note(label)
        fanout = variant.get("fanout") or {}
        curve = latency_curve(label, f"broadcast to {fanout.get('streams', 0):,} streams",
                              fanout.get("latency_ms") or {}, fanout.get("histogram"), "--")
        if curve:
            charts.latency.curves.append(curve)
        devices = (variant.get("memory") or {}).get("devices_report") or {}
        connected = connected_curve(label, devices, "connected (memory ramp)")
        if connected:
            charts.connected.curves.append(connected)
    add_targets(charts, result.get("targets") or {})


# -- drawing and the command --------------------------------------------------------------------

def load_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_pngs(plt: Any, charts: Charts, out_dir: str, prefix: str = "") -> dict[str, str]:
    """One PNG per chart with something to draw: ``{chart name: path}``."""
    from rawsse.load import plots
    os.makedirs(out_dir, exist_ok=True)
    colours = variant_colours(charts.variants)
    paths = {}
    for name, chart in charts.drawable().items():
        figure = plots.draw(plt, name, chart, colours)
        paths[name] = os.path.join(out_dir, prefix + NAMES[name])
        plots.save(plt, figure, paths[name])
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE.json",
                        help="push reports, devices reports, bench results")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="directory for the PNGs (made if missing; default: here)")
    parser.add_argument("--label", action="append", default=[], metavar="NAME",
                        help="the variant of each file, in order (repeat once per file; "
                             "default: the file's stem without -push/-devices)")
    parser.add_argument("--target-latency-ms", type=float, metavar="X",
                        help="a target line at X ms on the latency CDF (read where each curve "
                             "crosses 0.99)")
    parser.add_argument("--target-rate", type=float, metavar="R",
                        help="a target line at R pushes/s on the pushes/s plot")


def flag_targets(args: argparse.Namespace) -> dict[str, float]:
    targets = {}
    for flag, key, value in (("--target-latency-ms", "latency_p99_ms", args.target_latency_ms),
                             ("--target-rate", "per_second", args.target_rate)):
        if value is not None:
            if not value > 0:
                raise ConfigError(flag, f"{value:g} is not a positive number")
            targets[key] = value
    return targets


def run(args: argparse.Namespace) -> int:
    targets = flag_targets(args)
    files = [(path, variant, *read_report(path))
             for path, variant in labelled(args.files, args.label)]
    benches = sum(1 for _, _, kind, _ in files if kind == "bench")
    charts = charts_for(files, targets, prefix_bench=benches > 1 or bool(args.label))
    if not charts.drawable():
        print(f"rawsse report: nothing to draw in {', '.join(args.files)} (no answers, no "
              f"series)", file=sys.stderr)
        return 1
    plt = load_pyplot()
    if plt is None:
        print(f"rawsse report: {INSTALL_HINT}", file=sys.stderr)
        return 2
    for path in write_pngs(plt, charts, args.out).values():
        print(path)
    return 0
