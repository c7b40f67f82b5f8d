"""``/stats`` documents: a node's totals summed over its workers, a cluster's over its nodes."""

from __future__ import annotations

from typing import Any

# Per-process identities, not quantities: never summed.
_NOT_SUMMED = frozenset({"worker", "pid"})


def sum_totals(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise sum of numbers, and of dicts of numbers one level down; the node's user
    bytes per connection recomputed from the sums."""
    total: dict[str, Any] = {}
    for doc in documents:
        for key, value in doc.items():
            if key in _NOT_SUMMED or isinstance(value, bool) or value is None:
                continue
            if isinstance(value, dict):
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, (int, float)):
                        merged[k] = merged.get(k, 0) + v
            elif isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    connections = total.get("connections", 0)
    total["user_bytes_per_connection"] = (
        round(total.get("uss_bytes", 0) / connections) if connections else None)
    return total


def node_document(workers: list[dict[str, Any]],
                  master: dict[str, Any] | None = None) -> dict[str, Any]:
    """``/stats`` for a node: totals over workers, each worker's own figures, and what the
    master knows (workers up, restarts, what died with a killed worker)."""
    document: dict[str, Any] = {"node": sum_totals(workers), "workers": workers}
    if master:
        document["master"] = {k: v for k, v in master.items() if k != "type"}
    return document
