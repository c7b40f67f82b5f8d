"""The table ``rawsse push`` and ``rawsse devices`` end with on stderr: what came out of the run,
in aligned columns (figure, value, unit), read from the same JSON report the run writes, so the
table and the report never disagree.

It is printed after the last progress line and before the closing line a failed run ends with
(``rawsse push: ...``), and not at all under ``--quiet``. No row starts with ``rawsse``: scripts
take the one line that does as the verdict.
"""

from __future__ import annotations

import sys
from typing import Any

Row = tuple[str, str, str]  # (figure, value, unit)


def render(title: str, rows: list[Row]) -> str:
    """``title`` then one line per row: figures left-aligned, values right-aligned."""
    label_width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines = [title]
    for label, value, unit in rows:
        lines.append(f"  {label:<{label_width}}  {value:>{value_width}}"
                     + (f" {unit}" if unit else ""))
    return "\n".join(lines)


def show(title: str, rows: list[Row], quiet: bool) -> None:
    if not quiet:
        print(render(title, rows), file=sys.stderr, flush=True)


def count(n: int) -> str:
    return f"{n:,}"


def error_rows(errors: dict[str, int]) -> list[Row]:
    """One row per error kind, most frequent first; one ``errors 0`` row when there were none."""
    if not errors:
        return [("errors", "0", "")]
    kinds = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(f"error {kind}", count(n), "") for kind, n in kinds]


def latency_rows(latency: dict[str, Any], quantiles: tuple[str, ...]) -> list[Row]:
    if not latency.get("count"):
        return [("latency", "not measured", "")]
    return [(f"latency {q}", f"{latency[q]:,.2f}", "ms") for q in quantiles]


def push_rows(report: dict[str, Any]) -> list[Row]:
    """sent, 200s, each other status and reason, errors by kind, pushes/s, latency."""
    statuses: dict[str, int] = report["statuses"]
    rows: list[Row] = [("sent", count(report["sent"]), ""),
                       ("200", count(statuses.get("200", 0)), "")]
    others = sorted(((key, n) for key, n in statuses.items() if key != "200"),
                    key=lambda kv: (-kv[1], kv[0]))
    rows += [(key, count(n), "") for key, n in others]
    rows += error_rows(report["errors"])
    if report.get("unsent"):
        rows.append(("unsent", count(report["unsent"]), ""))
    rows.append(("pushes/s (200s)", f"{report['per_second']:,.1f}", ""))
    rows += broadcast_rows(report)
    rows += latency_rows(report["latency_ms"], ("p50", "p90", "p99", "max"))
    rows.append(("duration", f"{report['duration_s']:,.1f}", "s"))
    return rows


def broadcast_rows(report: dict[str, Any]) -> list[Row]:
    """--broadcast: streams written and refused over the run, each node missing from its
    answers (Redis mode) and each worker its answers named in ``missing_workers`` (``3``, in
    Redis mode ``nb/3``: worker 3 of node nb), with how many broadcasts named it."""
    if report.get("mode") != "broadcast":
        return []
    rows: list[Row] = [("streams written", count(report["streams"]), ""),
                       ("streams refused", count(report["refused"]), "")]
    rows += [(f"node {node} missing", count(n), "broadcasts")
             for node, n in report["missing"].items()]
    rows += [(f"worker {worker} missing", count(n), "broadcasts")
             for worker, n in report["missing_workers"].items()]
    return rows


def devices_rows(report: dict[str, Any]) -> list[Row]:
    """connected (of --count), peak, reconnects, events, latency if measured, errors by kind."""
    rows: list[Row] = [
        ("connected at end", f"{count(report['connected'])} / {count(report['count'])}", ""),
        ("peak connected", count(report["peak_connected"]), ""),
        ("reconnects", count(report["reconnects"]), ""),
        ("events received", count(report["events"]), ""),
    ]
    if report.get("duplicates"):
        rows.append(("duplicates", count(report["duplicates"]), ""))
    if report["latency_ms"].get("count"):
        rows += latency_rows(report["latency_ms"], ("p50", "p99"))
    rows += error_rows(report["errors"])
    rows.append(("duration", f"{report['duration_s']:,.1f}", "s"))
    return rows


def title(tool: str, report: dict[str, Any]) -> str:
    ended = report.get("ended", "done")
    return f"{tool} summary" + ("" if ended == "done" else f" (ended: {ended})")
