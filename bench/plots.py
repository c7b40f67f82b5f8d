"""PNG plot of a bench result: memory vs connections with the fitted slope. The latency CDF and
devices connected over time are ``rawsse report``'s (``rawsse.load.report``), drawn from the same
result by ``report.write_plots``.

Imported only after matplotlib was found (``report.write_plots``), so the bench runs without it.
"""

from __future__ import annotations

import os
from typing import Any

MB = 1024 * 1024


def draw(plt: Any, result: dict[str, Any], out_dir: str, stem: str) -> dict[str, str]:
    paths = {}
    variants = result.get("variants", {})
    if any(v.get("memory", {}).get("samples") for v in variants.values()):
        paths["memory_png"] = memory_plot(plt, variants, os.path.join(out_dir, stem + "-memory.png"))
    return paths


def memory_plot(plt: Any, variants: dict[str, Any], path: str) -> str:
    """One row per scale (18k variants and 300k variants would squash each other on one axis);
    left: server anonymous PSS (sum over processes) vs streams held, with the fitted line; right:
    kernel socket caches vs TCP sockets allocated system-wide (see memory.py for why)."""
    rows = scale_groups(variants)
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.5 * len(rows)), squeeze=False)
    for (user_ax, kernel_ax), names in zip(axes, rows):
        for name in names:
            draw_memory_variant(user_ax, kernel_ax, name, variants[name]["memory"])
        user_ax.set(title="Server user memory (anonymous PSS, all processes)",
                    xlabel="streams held", ylabel="MiB")
        kernel_ax.set(title="Kernel socket caches vs TCP sockets (system-wide)",
                      xlabel="TCP sockets allocated since the first level (both ends)",
                      ylabel="MiB")
        for ax in (user_ax, kernel_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_groups(variants: dict[str, Any]) -> list[list[str]]:
    """Variant names with memory samples, grouped by top level: a new group whenever the top
    level is over 5x the previous group's."""
    measured = sorted((v["memory"]["levels"][-1], name) for name, v in variants.items()
                      if v.get("memory", {}).get("samples"))
    groups: list[list[str]] = []
    group_top = 0
    for top, name in measured:
        if not groups or top > 5 * group_top:
            groups.append([])
            group_top = top
        groups[-1].append(name)
    return groups


def draw_memory_variant(user_ax: Any, kernel_ax: Any, name: str, memory: dict[str, Any]) -> None:
    samples = memory["samples"]
    xs = [s["connections"] for s in samples]
    user = [s["process"]["anon_pss"] / MB for s in samples]
    user_fit = memory["slopes"]["anon_pss"]
    line = user_ax.plot(xs, user, "o")[0]
    user_ax.plot(xs, [(user_fit["intercept_bytes"] + user_fit["bytes_per_conn"] * x) / MB
                      for x in xs], "-", color=line.get_color(),
                 label=f"{name}: {user_fit['bytes_per_conn']:,.0f} B/stream")
    first = samples[0]["kernel"]
    sockets = [s["kernel"]["tcp_alloc"] - first["tcp_alloc"] for s in samples]
    kernel = [sum(s["kernel"]["caches"].values()) - sum(first["caches"].values())
              for s in samples]
    kernel_ax.plot(sockets, [k / MB for k in kernel], "o-", color=line.get_color(),
                   label=f"{name}: {memory['slopes']['socket_caches_total']:,.0f} B/socket")
