"""The delivery latency histogram's arithmetic, in-process."""

from __future__ import annotations

import pytest

from rawsse.server import latency


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
