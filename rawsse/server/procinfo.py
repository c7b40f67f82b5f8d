"""This process's memory, read from /proc (no psutil on the serving path: psutil is for bench).

RSS double-counts pages shared with the master after fork; USS (private pages, from
``/proc/self/smaps_rollup``, proc(5)) is what each worker really adds.

Reading smaps_rollup walks every mapping of the process in the kernel, and every ``/stats`` or
``/metrics`` asks every worker for a snapshot: a flood of them made each worker re-read it for
each one (issue 12). The figures are kept for ``CACHE_SECONDS``: a scrape every few seconds
still sees fresh ones, a flood costs one read a second.
"""

from __future__ import annotations

import os
import resource
import time

CACHE_SECONDS = 1.0

_cached: tuple[int, int] = (0, 0)
_read_at = float("-inf")
_read_by = 0  # the pid that read them: a worker forked within the second reads its own


def process_memory() -> tuple[int, int]:
    """(RSS, USS) in bytes, at most ``CACHE_SECONDS`` old."""
    global _cached, _read_at, _read_by
    now, pid = time.monotonic(), os.getpid()
    if now - _read_at >= CACHE_SECONDS or pid != _read_by:
        _cached, _read_at, _read_by = _read_memory(), now, pid
    return _cached


def _read_memory() -> tuple[int, int]:
    """(RSS, USS) in bytes; USS falls back to RSS where smaps_rollup is missing."""
    rss = uss = 0
    try:
        with open("/proc/self/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    uss += int(line.split()[1]) * 1024
    except OSError:
        pass
    if not rss:
        try:
            with open("/proc/self/statm", "rb") as f:
                rss = int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            return 0, 0
    return rss, uss or rss
