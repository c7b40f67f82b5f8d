"""Drawing ``rawsse report``'s charts with matplotlib (imported by ``rawsse.load.report`` only
once matplotlib was found, on the Agg backend).

Every axis starts at 0 (a rate or a latency drawn from an offset exaggerates its swings); each
variant has its colour in every plot; target lines are dotted: black for a target of all
(``--target-*``, a bench result's ``targets``), in the variant's colour for its own (``--rate``,
``--count``).
"""

from __future__ import annotations

from typing import Any

from matplotlib.ticker import StrMethodFormatter

from rawsse.load.report import Chart

TARGET_COLOUR = "black"
# name → (title, x label, y label, how the curves step: "post" for a CDF's buckets, "pre" for
# a count over the interval ending at x, None for a level sampled at x)
LAYOUT: dict[str, tuple[str, str, str, str | None]] = {
    "latency": ("Latency CDF", "latency (ms)", "fraction of pushes at or below", "post"),
    "rate": ("Pushes per second (rawsse push)", "seconds since the start", "pushes/s", "pre"),
    "connected": ("Devices connected (rawsse devices)", "seconds since the start",
                  "devices connected", None),
}


def draw(plt: Any, name: str, chart: Chart, colours: dict[str, str]) -> Any:
    """The figure of chart ``name`` (one of ``LAYOUT``), not yet saved."""
    title, xlabel, ylabel, where = LAYOUT[name]
    fig, ax = plt.subplots(figsize=(8, 5))
    for curve in chart.curves:
        colour = colours[curve.variant]
        if where is None:
            ax.plot(curve.xs, curve.ys, curve.style, color=colour, label=curve.label)
        else:
            ax.step(curve.xs, curve.ys, curve.style, where=where, color=colour,
                    label=curve.label)
    for mark in chart.marks:
        colour = TARGET_COLOUR if mark.variant is None else colours[mark.variant]
        line = ax.axvline if name == "latency" else ax.axhline
        line(mark.value, color=colour, linestyle=":", linewidth=1.5, label=mark.label)
    if name == "latency":
        ax.axhline(0.99, color="grey", linewidth=0.5)  # where a p99 target is read
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if name != "latency":
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 12,000 pushes/s
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0, top=1.01 if name == "latency" else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if name == "latency" else "best")
    fig.tight_layout()
    return fig


def save(plt: Any, figure: Any, path: str) -> None:
    figure.savefig(path, dpi=110)
    plt.close(figure)
