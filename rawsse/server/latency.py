"""Delivery latency: a fixed log-scale histogram, one bucket count per push written live.

What is measured: from the loop turn in which the worker that received the push (any worker of
the node) parsed it, to the loop turn in which the owning worker writes its event on the
device's stream: the hop through the mesh, the owner's queue and any ``--delivery-delay``
included. Both ends read their loop's ``now`` (``time.monotonic()`` when the turn began: one
``CLOCK_MONOTONIC`` for every process of a host, and an attribute read instead of a call per
push), so a push received and written in the same turn counts 0 and the precision is one turn. Pushes that waited for an
offline device (delivered on connect) are not latency and are not counted; in Redis mode a push
routed from another node counts from its arrival here (two hosts share no monotonic clock).

Cost: the histogram is a list of ints on the worker's ``Stats``; a delivery adds one
``bisect_right`` over ``BOUNDS`` and one increment (``Registry.deliver``): 142 ns a push
(``python -m timeit``), 1.7 % of the instructions of a pipelined push through one worker
(``bench/push_probe.py`` under callgrind: 93,882 per push with it, 92,323 without).
Workers' counts are summed like every other ``/stats`` figure (``documents.sum_totals``); the
quantiles are estimated from the summed counts (``quantile``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

# Upper bounds in seconds: 1-2-5 steps from 10 us to 100 s; one more bucket holds the rest.
BOUNDS: tuple[float, ...] = (
    0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
    0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
)
# The bucket names in ``/stats`` (a dict sums across workers): Prometheus' ``le`` values.
LABELS: tuple[str, ...] = tuple(f"{bound:g}" for bound in BOUNDS) + ("+Inf",)


def new_counts() -> list[int]:
    """An empty histogram: one count per bucket of ``BOUNDS``, and one for beyond them."""
    return [0] * (len(BOUNDS) + 1)


def as_document(counts: Sequence[int]) -> dict[str, int]:
    """The counts by bucket label, for ``/stats``."""
    return dict(zip(LABELS, counts))


def quantile(counts: Mapping[str, int], q: float) -> float | None:
    """The ``q`` quantile (0 < q < 1) of a ``/stats`` histogram, in seconds; None when empty.

    Interpolated linearly inside the bucket that holds it, as Prometheus' ``histogram_quantile``
    does (prometheus.io/docs/prometheus/latest/querying/functions); beyond the last bound it is
    that bound. The bucket is the precision: 1-2-5 steps, so within a factor of 2.5."""
    values = [int(counts.get(label, 0)) for label in LABELS]
    total = sum(values)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(values):
        if count and seen + count >= rank:
            if index == len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[index - 1] if index else 0.0
            return lower + (BOUNDS[index] - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]
