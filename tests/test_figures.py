"""The live view's arithmetic, in-process: latency quantiles from bucket counts, rates from
successive ``/stats`` documents (a respawned worker left out), recent errors, per-node rows."""

from __future__ import annotations

import pytest

from rawsse.node.routing import owner_of
from rawsse.server import latency
from rawsse.server.figures import Figures
from rawsse.server.statsevents import VIEWER_TOKEN


def _histogram(**by_label: int) -> dict[str, int]:
    counts = dict.fromkeys(latency.LABELS, 0)
    counts.update({label.replace("_", "."): n for label, n in by_label.items()})
    return counts


def test_quantiles_interpolate_inside_the_bucket_that_holds_them():
    counts = _histogram(**{"0_001": 50, "0_002": 50})  # 50 in (0.5, 1] ms, 50 in (1, 2] ms
    assert latency.quantile(counts, 0.5) == pytest.approx(0.001)
    assert latency.quantile(counts, 0.99) == pytest.approx(0.001 + 0.001 * 49 / 50)
    assert latency.quantile(_histogram(), 0.5) is None
    assert latency.quantile(_histogram(**{"+Inf": 3}), 0.99) == latency.BOUNDS[-1]


def test_the_viewer_token_is_owned_by_worker_0_whatever_the_worker_count():
    assert all(owner_of(VIEWER_TOKEN, workers) == 0 for workers in range(1, 65))


def _worker(index: int, pid: int, **fields: object) -> dict:
    doc: dict = {"worker": index, "pid": pid, "streams": 0, "pushes_received": 0, "pushes_ok": 0,
                 "rejections": {}, "disconnects": {}, "accept_errors": {},
                 "delivery_latency": _histogram()}
    doc.update(fields)
    return doc


def _document(*workers: dict) -> dict:
    return {"node": {"streams": sum(w["streams"] for w in workers)}, "workers": list(workers)}


def test_rates_come_from_successive_documents_and_skip_a_respawned_worker():
    figures = Figures()
    first = figures.update(_document(_worker(0, 10, pushes_received=100, pushes_ok=100),
                                     _worker(1, 11, pushes_received=50)), now=1.0)
    assert first["rates"] is None and first["latency"] is None
    later = figures.update(_document(
        _worker(0, 10, pushes_received=300, pushes_ok=290,
                rejections={"503 ServiceUnavailable": 10},
                delivery_latency=_histogram(**{"0_001": 10})),
        _worker(1, 12, pushes_received=5)),  # respawned: another pid, counting from 0
        now=3.0)
    rates = later["rates"]
    assert rates["received"] == 100.0 and rates["by_status"] == {"200": 95.0, "503": 5.0}
    assert later["latency"] == {"p50": pytest.approx(0.00075), "p99": pytest.approx(0.000995),
                                "deliveries": 10}
    assert [w["received_per_s"] for w in later["workers"]] == [100.0, None]
    assert later["errors"][0]["what"] == "push answered 503 ServiceUnavailable"
    assert later["errors"][0]["count"] == 10


def test_other_nodes_rates_hold_between_their_two_second_refreshes():
    figures = Figures()
    doc = {"node_id": "a", "node": {}, "workers": [],
           "cluster_nodes": {"a": {"pushes_received": 0}, "b": {"pushes_received": 0}}}
    figures.update(doc, now=0.0)
    doc["cluster_nodes"]["b"] = {"pushes_received": 400, "streams": 7}
    rows = figures.update(doc, now=2.0)["nodes"]
    assert [(r["node"], r["here"], r["received_per_s"]) for r in rows] == \
        [("a", True, 0.0), ("b", False, 200.0)]
    assert figures.update(doc, now=3.0)["nodes"][1]["received_per_s"] == 200.0  # not refreshed
    assert figures.update(doc, now=6.0)["nodes"][1]["received_per_s"] == 0.0  # idle
