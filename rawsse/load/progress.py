"""What a load run's once-a-second tick knows about time: how long is left (the ETA on the
progress line of ``rawsse push`` and ``rawsse devices``) and the per-second series a push report
carries for ``rawsse report``'s plots over time.

Nothing here runs per push or per event: the tick samples totals the run counts anyway.

ETA rules (a wrong number is worse than none):
- a run bounded by time (``--duration``) has ``time_left``, known exactly;
- a run bounded by work (``--count`` pushes, ``--expect-events``) has ``work_left`` at the rate of
  the last ``RATE_WINDOW`` seconds; no rate yet (nothing done so far) is unknown;
- bounded by both, the sooner one; work at an unknown rate under a time bound shows the time
  bound as a ceiling (``ETA ≤0:42``); nothing known shows ``ETA ?``.
"""

from __future__ import annotations

import collections
import math
from typing import Any

RATE_WINDOW = 5  # seconds of samples "the current rate" is measured over
# One sample a second for a day. A longer run merges neighbouring samples in pairs when the cap
# is reached (the interval doubles), so a soak of any length keeps its whole shape in bounded
# memory: at most MAX_SERIES_SAMPLES samples of a few counters.
MAX_SERIES_SAMPLES = 86_400
# A run's last, partial interval shorter than this is folded into the one before: a rate over a
# few milliseconds would be a spike of noise on the plot.
MIN_LAST_INTERVAL = 0.2


def clock(seconds: float) -> str:
    """``42.1`` → ``"0:43"``, ``3723`` → ``"1:02:03"``: whole seconds rounded up, so a run with
    time left never shows ``0:00``."""
    whole = max(0, math.ceil(seconds - 1e-9))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_text(time_left: float | None, work_left: float | None = None,
             rate: float | None = None) -> str:
    """``"ETA 0:42"``, ``"ETA ≤0:42"`` or ``"ETA ?"`` (see the module docstring)."""
    if work_left is None:
        return "ETA ?" if time_left is None else f"ETA {clock(time_left)}"
    if work_left <= 0 or (time_left is not None and time_left <= 0):
        return "ETA 0:00"
    if rate:
        by_work = work_left / rate
        return f"ETA {clock(by_work if time_left is None else min(by_work, time_left))}"
    return "ETA ?" if time_left is None else f"ETA ≤{clock(time_left)}"


class RateMeter:
    """The rate a total grows at over the last ``RATE_WINDOW`` samples (from the start at first)."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, float]] = collections.deque(
            [(0.0, 0.0)], maxlen=RATE_WINDOW + 1)

    def sample(self, elapsed: float, total: float) -> None:
        self.samples.append((elapsed, total))

    @property
    def rate(self) -> float | None:
        """Per second; None until it can be told (no sample yet, or nothing grew)."""
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        if t1 <= t0 or n1 <= n0:
            return None
        return (n1 - n0) / (t1 - t0)


class Series:
    """Counters sampled by a run's tick: ``t_s`` (seconds since the start, the end of each
    interval) and, per counter, what it grew by in the interval ending there. The rate in an
    interval is its count over its length; the counts add up to the run's totals once
    ``close`` took the last sample."""

    __slots__ = ("names", "t_s", "columns", "last")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.t_s: list[float] = []
        self.columns: list[list[int]] = [[] for _ in names]
        self.last = [0] * len(names)

    def sample(self, elapsed: float, totals: tuple[int, ...]) -> None:
        for column, total, before in zip(self.columns, totals, self.last):
            column.append(total - before)
        self.t_s.append(round(elapsed, 3))
        self.last = list(totals)
        if len(self.t_s) > MAX_SERIES_SAMPLES:
            self._halve()

    def close(self, elapsed: float, totals: tuple[int, ...]) -> None:
        """The last, partial interval: a sample of its own, or folded into the one before when
        it is shorter than ``MIN_LAST_INTERVAL``."""
        if self.t_s and elapsed - self.t_s[-1] < MIN_LAST_INTERVAL:
            for column, total, before in zip(self.columns, totals, self.last):
                column[-1] += total - before
            self.t_s[-1] = round(elapsed, 3)
            self.last = list(totals)
        elif not self.t_s or elapsed > self.t_s[-1]:
            self.sample(elapsed, totals)

    def _halve(self) -> None:
        """Merge neighbouring samples in pairs (an odd last one stays as it is)."""
        keep = len(self.t_s) % 2
        tail_t = self.t_s[-keep:] if keep else []
        self.t_s = self.t_s[1::2] + tail_t
        for k, column in enumerate(self.columns):
            tail = column[-keep:] if keep else []
            self.columns[k] = [a + b for a, b in zip(column[::2], column[1::2])] + tail

    def to_dict(self) -> dict[str, Any]:
        return {"t_s": list(self.t_s),
                **{name: list(column) for name, column in zip(self.names, self.columns)}}
