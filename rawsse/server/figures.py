"""The live view's figures: successive ``/stats`` documents turned into what a person watches.

``/stats`` holds counters that only go up; a dashboard wants rates. ``Figures.update`` takes the
node's document once a second (``statsevents.py``) and gives one small JSON-ready dict: gauges
(streams, pending, memory), rates over the interval since the previous document (pushes/s by
answer status, deliveries/s, reconnects/s), the delivery latency's p50/p99 over that interval
(``latency.py``), a row per worker and, in Redis mode, per node, and the most recent errors
(every error counter that grew, with how much). No I/O; ``tests/test_units.py`` feeds it
documents.

A worker respawned since the previous document (another pid) has counters that started again
from zero: its rates are left out of that one interval rather than shown negative.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterator

from rawsse.server import latency

Document = dict[str, Any]

RECENT_ERRORS = 20
# Close reasons that mean trouble (a device leaving, a takeover or a drain do not).
TROUBLE_CLOSES = ("slow_reader", "timeout", "error", "rejected")
# Counters that only grow when something went wrong, beside rejections and accept errors.
TROUBLE_COUNTERS = {"handoff_failures": "device hand-offs failed (owner worker down)",
                    "owner_unavailable": "pushes 503: owner unreachable",
                    "bad_requests": "malformed HTTP requests"}
MASTER_TROUBLE = {"worker_restarts": "workers died and were respawned",
                  "lost_streams": "streams lost with a killed worker",
                  "lost_pending": "pending pushes lost with a killed worker"}
# Another node's totals reach us every 2 s (``rawsse.cluster.agent.STATS_SECONDS``): a count
# unchanged for longer than this means the node is idle, not that its totals are late.
NODE_RATE_HOLD_SECONDS = 3.0


class Figures:
    __slots__ = ("previous", "previous_at", "errors", "seq", "node_marks")

    def __init__(self) -> None:
        self.previous: Document | None = None
        self.previous_at = 0.0
        self.errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.seq = 0
        # node id -> (pushes_received, monotonic time it last changed, its rate then)
        self.node_marks: dict[str, tuple[float, float, float]] = {}

    def reset(self) -> None:
        """Nobody watches: the next rates start afresh rather than span the gap."""
        self.previous = None
        self.node_marks.clear()

    def update(self, doc: Document, now: float | None = None) -> Document:
        """The figures for ``doc``, collected at monotonic time ``now``."""
        now = time.monotonic() if now is None else now
        previous, elapsed = self.previous, now - self.previous_at
        if previous is not None and elapsed <= 0:
            previous = None
        self.previous, self.previous_at = doc, now
        self.seq += 1
        node = doc.get("node", {})
        workers = doc.get("workers", [])
        streams = node.get("streams", 0)
        figures: Document = {
            "seq": self.seq,
            "time": time.time(),
            "node_id": doc.get("node_id"),
            "streams": streams,
            "connections": node.get("connections", 0),
            "http_connections": node.get("http_connections", 0),
            "pending": node.get("pending", 0),
            "delayed": node.get("delayed", 0),
            "workers_up": doc.get("master", {}).get("workers_up", len(workers)),
            "memory": {"uss_bytes": node.get("uss_bytes", 0), "rss_bytes": node.get("rss_bytes", 0),
                       "uss_per_stream": round(node.get("uss_bytes", 0) / streams)
                       if streams else None},
            "rates": None,
            "latency": None,
            "workers": [_worker_row(w) for w in workers],
            "nodes": [],
            "redis": doc.get("redis"),
        }
        if previous is not None:
            deltas = _worker_deltas(workers, previous.get("workers", []))
            figures["rates"] = _rates(deltas, elapsed)
            figures["latency"] = _latency(deltas)
            for row, delta in zip(figures["workers"], _per_worker(workers, previous)):
                row["received_per_s"] = _per_s(delta, "pushes_received", elapsed)
                row["ok_per_s"] = _per_s(delta, "pushes_ok", elapsed)
            self._note_errors(deltas, doc, previous)
        figures["nodes"] = self._node_rows(doc, now)
        figures["errors"] = list(self.errors)
        return figures

    def _note_errors(self, deltas: Document, doc: Document, previous: Document) -> None:
        stamp = time.time()
        found = list(_trouble(deltas))
        master, before = doc.get("master", {}), previous.get("master", {})
        for key, what in MASTER_TROUBLE.items():
            grew = master.get(key, 0) - before.get(key, 0)
            if grew > 0:
                found.append((what, grew))
        redis, redis_before = doc.get("redis") or {}, previous.get("redis") or {}
        grew = redis.get("errors", 0) - redis_before.get("errors", 0)
        if grew > 0:
            found.append((f"Redis errors: {redis.get('last_error') or 'unknown'}", grew))
        for what, count in found:
            self.errors.appendleft({"time": stamp, "what": what, "count": count})

    def _node_rows(self, doc: Document, now: float) -> list[Document]:
        """Redis mode: a row per node of the cluster, ours live, the others' as last stored."""
        nodes = doc.get("cluster_nodes")
        if not nodes:
            return []
        rows = []
        for name in sorted(nodes):
            totals = nodes[name]
            received = totals.get("pushes_received", 0)
            mark = self.node_marks.get(name)
            rate = 0.0
            if mark is not None and received != mark[0] and now > mark[1]:
                rate = max(0.0, (received - mark[0]) / (now - mark[1]))
            elif mark is not None and now - mark[1] <= NODE_RATE_HOLD_SECONDS:
                rate = mark[2]
            if mark is None or received != mark[0]:
                self.node_marks[name] = (received, now, rate)
            rows.append({"node": name, "here": name == doc.get("node_id"),
                         "streams": totals.get("streams", 0),
                         "connections": totals.get("connections", 0),
                         "pending": totals.get("pending", 0),
                         "uss_bytes": totals.get("uss_bytes", 0),
                         "received_per_s": round(rate, 1)})
        return rows


def _worker_row(worker: Document) -> Document:
    return {"worker": worker.get("worker"), "pid": worker.get("pid"),
            "streams": worker.get("streams", 0),
            "http_connections": worker.get("http_connections", 0),
            "pending": worker.get("pending", 0), "uss_bytes": worker.get("uss_bytes", 0),
            "received_per_s": None, "ok_per_s": None}


def _delta(now: Any, before: Any) -> Any:
    """``now - before`` for numbers, key by key for dicts of numbers (one level down)."""
    if isinstance(now, dict):
        before = before if isinstance(before, dict) else {}
        return {k: v - before.get(k, 0) for k, v in now.items() if isinstance(v, (int, float))}
    if isinstance(now, (int, float)) and not isinstance(now, bool):
        return now - (before if isinstance(before, (int, float)) else 0)
    return None


def _per_worker(workers: list[Document], previous: Document) -> Iterator[Document | None]:
    """Each worker's counter deltas, or None for one new or respawned since ``previous``."""
    before = {w.get("worker"): w for w in previous.get("workers", [])}
    for worker in workers:
        old = before.get(worker.get("worker"))
        if old is None or old.get("pid") != worker.get("pid"):
            yield None
            continue
        yield {key: _delta(value, old.get(key)) for key, value in worker.items()}


def _worker_deltas(workers: list[Document], previous_workers: list[Document]) -> Document:
    """The node's counter deltas: the sum of every comparable worker's."""
    total: Document = {}
    for delta in _per_worker(workers, {"workers": previous_workers}):
        for key, value in (delta or {}).items():
            if isinstance(value, dict):
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            elif value is not None:
                total[key] = total.get(key, 0) + value
    return total


def _per_s(delta: Document | None, key: str, elapsed: float) -> float | None:
    if delta is None:
        return None
    return round(max(0, delta.get(key, 0)) / elapsed, 1)


def _rates(deltas: Document, elapsed: float) -> Document:
    by_status: dict[str, float] = {"200": _per_s(deltas, "pushes_ok", elapsed) or 0.0}
    for key, count in deltas.get("rejections", {}).items():
        status = key.split(" ", 1)[0]
        by_status[status] = by_status.get(status, 0.0) + max(0, count) / elapsed
    return {
        "received": _per_s(deltas, "pushes_received", elapsed),
        "by_status": {status: round(rate, 1) for status, rate in sorted(by_status.items())},
        "delivered": round(max(0, deltas.get("delivered_live", 0)
                               + deltas.get("delivered_on_connect", 0)) / elapsed, 1),
        "reconnects": _per_s(deltas, "streams_opened", elapsed),
        "elapsed": round(elapsed, 3),
    }


def _latency(deltas: Document) -> Document | None:
    counts = deltas.get("delivery_latency", {})
    deliveries = sum(max(0, n) for n in counts.values())
    if not deliveries:
        return None
    return {"p50": latency.quantile(counts, 0.5), "p99": latency.quantile(counts, 0.99),
            "deliveries": deliveries}


def _trouble(deltas: Document) -> Iterator[tuple[str, int]]:
    """(what, how many) for every error counter that grew over the interval."""
    for key, count in sorted(deltas.get("rejections", {}).items()):
        if count > 0:
            yield f"push answered {key}", count
    for key, count in sorted(deltas.get("accept_errors", {}).items()):
        if count > 0:
            yield f"accept() failed: {key}", count
    closes = deltas.get("disconnects", {})
    for reason in TROUBLE_CLOSES:
        if closes.get(reason, 0) > 0:
            yield f"connections closed: {reason}", closes[reason]
    for key, what in TROUBLE_COUNTERS.items():
        if deltas.get(key, 0) > 0:
            yield what, deltas[key]
