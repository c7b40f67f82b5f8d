"""What the load tools say about a run and what ``rawsse report`` draws from it: the ETA on the
progress lines, the summary table they end with, the per-second series in the push report, and
the PNGs (one colour per variant across plots, axes from 0, target lines).

One server and one set of real runs for the module: devices ``a`` (20 streams), push ``a``
(rate-paced, over a token file with one bad token) and push ``b`` (unpaced, ``--quiet``), and a
second, ramped devices run for the ramp's ETA."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from conftest import ROOT, launch
from loadtools import ENV, Devices, rawsse, wait_streams
from rawsse.cli import main
from rawsse.load import progress, report
from rawsse.load.loadgen import fleet_token

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rawsse.load import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEVICES = 20
A_PUSHES, A_BAD = 150, 7  # --rate 100 --duration 1.5 over 21 tokens: every 21st is the bad one
B_PUSHES = 200


@dataclass
class Runs:
    dir: Any
    a_push: str
    a_push_stderr: str
    b_push: str
    b_push_stderr: str
    a_devices: str
    a_devices_output: str
    ramp_output: str


def push(url: str, path: Any, *flags: str) -> str:
    done = subprocess.run(rawsse("push", "--url", url, "--report", str(path), *flags), env=ENV,
                          capture_output=True, text=True, timeout=30, start_new_session=True)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Runs]:
    out = tmp_path_factory.mktemp("runs")
    server, holders = launch("--keepalive", "0")
    devices = ramped = None
    try:
        tokens = out / "tokens.txt"
        tokens.write_text("\n".join([fleet_token(i) for i in range(DEVICES)] + ["abc"]) + "\n")
        devices = Devices(server.url, out, "--ramp", "0", "--expect-events",
                          str(A_PUSHES - A_BAD + B_PUSHES), count=DEVICES, duration=8)
        assert wait_streams(server.admin_url, DEVICES) == DEVICES, devices.output()
        ramped = Devices(server.url, out, "--ramp", "10", "--token-start", "100",
                         count=DEVICES, duration=1.5)
        a_stderr = push(server.url, out / "a-push.json", f"--tokens=file:{tokens}",
                        "--rate", "100", "--duration", "1.5", "--fail-under", "0")
        b_stderr = push(server.url, out / "b-push.json", "--tokens", f"fleet:0-{DEVICES - 1}",
                        "--count", str(B_PUSHES), "--pipeline", "4", "--quiet")
        devices.wait()
        ramped.wait()
        a_devices = out / "a-devices.json"
        shutil.copy(devices.report_path, a_devices)
        yield Runs(out, str(out / "a-push.json"), a_stderr, str(out / "b-push.json"), b_stderr,
                   str(a_devices), devices.output(), ramped.output())
    finally:
        for run in (devices, ramped):
            if run is not None:
                run.kill()
        server.stop()
        for holder in holders:
            holder.close()


def read(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def table_after(output: str, title: str) -> list[str]:
    lines = output.splitlines()
    start = lines.index(title)
    return lines[start:]


def assert_aligned(rows: list[str]) -> None:
    """Figures start in one column; values end in one column, units after them."""
    ends = {len(re.sub(r" (ms|s)$", "", row)) for row in rows}
    assert len(ends) == 1, rows
    assert all(row.startswith("  ") and not row.startswith("   ") for row in rows), rows


# -- the load tools' own output -----------------------------------------------------------------

def test_push_progress_has_an_eta_and_ends_with_the_table(runs) -> None:
    progress_lines = [x for x in runs.a_push_stderr.splitlines() if x.startswith("push t=")]
    assert len(progress_lines) >= 2, runs.a_push_stderr
    assert progress_lines[0].endswith(" ETA 0:01"), progress_lines  # 1.5 s --duration, t≈1
    assert progress_lines[-1].endswith(" ETA 0:00"), progress_lines
    table = table_after(runs.a_push_stderr, "push summary")
    rows = dict(re.match(r"^  (.+?)\s{2,}(\S.*)$", row).groups() for row in table[1:])
    assert rows["sent"] == str(A_PUSHES)
    assert rows["200"] == str(A_PUSHES - A_BAD)
    assert rows["400 BadDeviceToken"] == str(A_BAD)
    assert rows["errors"] == "0"
    assert float(rows["pushes/s (200s)"]) > 0
    for q in ("p50", "p90", "p99", "max"):
        assert rows[f"latency {q}"].endswith(" ms")
    assert list(rows)[:3] == ["sent", "200", "400 BadDeviceToken"]
    assert_aligned(table[1:])
    assert runs.b_push_stderr == ""  # --quiet: no progress line, no table


def test_push_report_has_its_per_second_series(runs) -> None:
    result = read(runs.a_push)
    series = result["series"]
    assert sum(series["accepted"]) == result["accepted"] == A_PUSHES - A_BAD
    assert sum(series["rejected"]) == A_BAD and sum(series["errors"]) == 0
    assert len(series["t_s"]) == len(series["accepted"]) >= 2
    assert series["t_s"] == sorted(series["t_s"]) and series["t_s"][0] == pytest.approx(1, abs=0.3)
    assert result["latency_histogram"]["count"] == A_PUSHES


def test_devices_progress_has_an_eta_and_ends_with_the_table(runs) -> None:
    output = runs.a_devices_output
    lines = [x for x in output.splitlines() if x.startswith("devices t=")]
    assert lines and all(re.search(r" ETA ≤?\d:\d\d$", x) for x in lines), output
    assert lines[-1].endswith(" ETA 0:00")
    table = table_after(output, "devices summary (ended: expected_events)")
    rows = dict(re.match(r"^  (.+?)\s{2,}(\S.*)$", row).groups() for row in table[1:])
    events = A_PUSHES - A_BAD + B_PUSHES
    assert rows["connected at end"] == f"{DEVICES} / {DEVICES}"
    assert rows["peak connected"] == str(DEVICES)
    assert rows["reconnects"] == "0" and rows["events received"] == str(events)
    assert rows["latency p50"].endswith(" ms") and rows["latency p99"].endswith(" ms")
    assert rows["errors"] == "0"
    assert_aligned(table[1:])


def test_devices_progress_says_when_the_ramp_is_done(runs) -> None:
    """20 devices at --ramp 10: the last first connect is due at 1.9 s."""
    lines = [x for x in runs.ramp_output.splitlines() if x.startswith("devices t=")]
    assert " ramp 0:01 ETA 0:01" in lines[0], lines  # --duration 1.5, t≈1
    assert "ramp" not in lines[-1], lines


# -- rawsse report ------------------------------------------------------------------------------

def test_report_writes_one_png_per_plot(runs, tmp_path) -> None:
    done = subprocess.run(rawsse("report", runs.a_push, runs.b_push, runs.a_devices, "--out",
                                 str(tmp_path / "png"), "--target-latency-ms", "50",
                                 "--target-rate", "500"),
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = done.stdout.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == sorted(report.NAMES.values())
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, path


def figures_of(charts: report.Charts) -> dict[str, Any]:
    colours = report.variant_colours(charts.variants)
    return {name: plots.draw(plt, name, chart, colours)
            for name, chart in charts.drawable().items()}


def test_each_variant_keeps_its_colour_and_axes_start_at_0(runs) -> None:
    files = [(path, variant, *report.read_report(path))
             for path, variant in report.labelled([runs.a_push, runs.b_push, runs.a_devices], [])]
    assert [(variant, kind) for _, variant, kind, _ in files] == [
        ("a", "push"), ("b", "push"), ("a", "devices")]
    charts = report.charts_for(files, {"latency_p99_ms": 50.0})
    figures = figures_of(charts)
    try:
        assert set(figures) == {"latency", "rate", "connected"}
        colours: dict[str, set[str]] = {"a": set(), "b": set()}
        plots_of: dict[str, set[str]] = {"a": set(), "b": set()}
        for name, figure in figures.items():
            ax = figure.axes[0]
            assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0, name
            for line in ax.get_lines():
                variant = line.get_label().split(":")[0]
                if variant in colours:
                    colours[variant].add(matplotlib.colors.to_hex(line.get_color()))
                    plots_of[variant].add(name)
        assert plots_of == {"a": {"latency", "rate", "connected"}, "b": {"latency", "rate"}}
        assert len(colours["a"]) == 1 and len(colours["b"]) == 1, colours
        assert colours["a"] != colours["b"]
        latency_marks = [line for line in figures["latency"].axes[0].get_lines()
                         if line.get_label() == "target p99 ≤ 50 ms"]
        assert [list(line.get_xdata()) for line in latency_marks] == [[50, 50]]
    finally:
        for figure in figures.values():
            plt.close(figure)


def test_report_reads_a_bench_result_with_its_targets(tmp_path) -> None:
    result = read(f"{ROOT}/bench/results/final-18k.json")
    result["targets"] = {"latency_p99_ms": 75}
    path = tmp_path / "final-18k.json"
    path.write_text(json.dumps(result))
    kind, data = report.read_report(str(path))
    assert kind == "bench"
    charts = report.charts_for([(str(path), "final-18k", kind, data)], {})
    assert charts.variants == list(result["variants"])
    assert len(charts.latency.curves) == len(charts.connected.curves) == len(result["variants"])
    assert [(m.value, m.variant) for m in charts.latency.marks] == [(75.0, None)]
    assert charts.connected.curves[0].ys[-1] == result["variants"]["rawsse-1w"]["memory"][
        "devices_report"]["connected"]


def test_report_without_matplotlib_says_how_to_get_it(runs) -> None:
    hide = ("import sys; sys.modules['matplotlib'] = None; from rawsse.cli import main; "
            f"sys.exit(main(['report', {runs.a_push!r}]))")
    done = subprocess.run([sys.executable, "-c", hide], env=ENV, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"rawsse report: {report.INSTALL_HINT}"]
    assert "pip install 'rawsse[report]'" in done.stderr


def test_report_refuses_a_file_it_cannot_read(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    done = subprocess.run(rawsse("report", str(path), "--out", str(tmp_path)), env=ENV,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"rawsse report: {path}: not a rawsse push report, "
                                        f"devices report or bench result"]
    assert not list(tmp_path.glob("*.png"))
    path.write_text("not json")
    with pytest.raises(report.ConfigError, match=f"^{path}: not JSON"):
        report.read_report(str(path))
    with pytest.raises(report.ConfigError, match=f"^{tmp_path}/none.json: cannot read it"):
        report.read_report(str(tmp_path / "none.json"))


def test_report_with_nothing_to_draw_exits_1(runs, tmp_path, capsys) -> None:
    """A push report from before the series (or a run that never got an answer): no curve."""
    old = read(runs.b_push)
    for key in ("series", "latency_histogram"):
        del old[key]
    old["latency_ms"] = {"count": 0}
    path = tmp_path / "old-push.json"
    path.write_text(json.dumps(old))
    assert main(["report", str(path), "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"rawsse report: nothing to draw in {path}")
    assert not list(tmp_path.glob("*.png"))


def test_report_labels_must_match_the_files(runs) -> None:
    with pytest.raises(report.ConfigError, match="^--label: 1 labels for 2 files"):
        report.labelled([runs.a_push, runs.b_push], ["x"])
    files = [(p, "same", *report.read_report(p)) for p in (runs.a_push, runs.b_push)]
    with pytest.raises(report.ConfigError, match="both push reports of variant 'same'"):
        report.charts_for(files, {})


# -- the ETA and series rules, in-process ---------------------------------------------------------

def test_eta_is_never_a_wrong_number() -> None:
    assert progress.eta_text(None) == "ETA ?"  # no bound known
    assert progress.eta_text(41.2) == "ETA 0:42"  # --duration: exact, rounded up
    assert progress.eta_text(None, 100, None) == "ETA ?"  # --count, nothing done yet
    assert progress.eta_text(None, 100, 50.0) == "ETA 0:02"
    assert progress.eta_text(30.0, 1000, 10.0) == "ETA 0:30"  # the sooner bound
    assert progress.eta_text(30.0, 100, None) == "ETA ≤0:30"
    assert progress.eta_text(5.0, 0, None) == "ETA 0:00"
    assert progress.eta_text(0.0, 10, None) == "ETA 0:00"  # the --duration is over
    assert progress.clock(3723) == "1:02:03" and progress.clock(0.01) == "0:01"


def test_series_stays_bounded_and_keeps_its_totals(monkeypatch) -> None:
    monkeypatch.setattr(progress, "MAX_SERIES_SAMPLES", 4)
    series = progress.Series(("n",))
    for t in range(1, 6):
        series.sample(float(t), (10 * t,))
    assert series.to_dict() == {"t_s": [2.0, 4.0, 5.0], "n": [20, 20, 10]}
    series.close(5.1, (55,))  # under MIN_LAST_INTERVAL: folded into the last sample
    assert series.to_dict() == {"t_s": [2.0, 4.0, 5.1], "n": [20, 20, 15]}
    meter = progress.RateMeter()
    assert meter.rate is None
    meter.sample(1.0, 0)
    assert meter.rate is None  # nothing done yet is not a rate of 0
    meter.sample(2.0, 30)
    assert meter.rate == 15.0
