"""What the whole host's CPUs did during a bench phase: time stolen by the hypervisor, time busy.

On a shared VM a phase can run while the hypervisor gives this guest's virtual CPUs to other
guests: its figures then look like a regression (a devices run spent 200 µs per event read where
runs minutes before and after spent 25-28 µs) with nothing of ours to blame. Every phase records
the host's share of stolen and busy time so that such a run can be told apart.

Source: the ``cpu`` line of ``/proc/stat`` (proc(5), "/proc/stat"): time summed over all CPUs, in
USER_HZ ticks (``sysconf(_SC_CLK_TCK)``), spent in user, nice, system, idle, iowait, irq, softirq,
steal ("stolen time, which is the time spent in other operating systems when running in a
virtualized environment", Linux 2.6.11), guest and guest_nice. guest and guest_nice are already
counted in user and nice (proc(5)), so busy is user + nice + system + irq + softirq + steal.
Each share is over the phase's wall time × the CPUs online (the ``cpuN`` lines).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterator

STAT = "/proc/stat"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Column positions after "cpu", proc(5): user nice system idle iowait irq softirq steal ...
USER, NICE, SYSTEM, IDLE, IOWAIT, IRQ, SOFTIRQ, STEAL = range(8)
BUSY_COLUMNS = (USER, NICE, SYSTEM, IRQ, SOFTIRQ, STEAL)


@dataclasses.dataclass(frozen=True)
class Mark:
    """One read of ``/proc/stat`` and when it was taken."""

    at: float  # time.monotonic()
    ticks: tuple[int, ...]  # the ``cpu`` line's columns
    cpus: int  # ``cpuN`` lines: CPUs online


def mark(path: str = STAT) -> Mark:
    with open(path) as f:
        lines = f.read().splitlines()
    at = time.monotonic()
    total = next(line for line in lines if line.startswith("cpu "))
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return Mark(at, tuple(int(n) for n in total.split()[1:]), cpus)


def since(start: Mark, end: Mark | None = None) -> dict[str, float]:
    """Stolen and busy time between two marks as % of wall time × CPUs (``end``: now), with the
    seconds they are shares of. Each column advances in whole ticks, so over a short window a
    share can round past 100 %: capped there."""
    end = end or mark()
    wall = max(end.at - start.at, 1e-9)
    capacity = wall * end.cpus * TICKS_PER_S
    delta = [after - before for before, after in zip(start.ticks, end.ticks)]
    steal = delta[STEAL] if len(delta) > STEAL else 0  # proc(5): absent before Linux 2.6.11

    def share(ticks: int) -> float:
        return round(min(100.0, max(0.0, ticks / capacity * 100)), 2)

    return {"steal_pct": share(steal),
            "busy_pct": share(sum(delta[c] for c in BUSY_COLUMNS if c < len(delta))),
            "wall_s": round(wall, 3), "cpus": end.cpus}


@contextlib.contextmanager
def phase(into: dict[str, Any], name: str) -> Iterator[None]:
    """``into[name]`` = the host's shares over the ``with`` block, recorded even when the block
    raises: a phase that failed (a ramp that stalled) is where a reader most needs them."""
    start = mark()
    try:
        yield
    finally:
        into[name] = since(start)
