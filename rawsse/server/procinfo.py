"""This process's memory, read from /proc (no psutil on the serving path: psutil is for bench).

RSS double-counts pages shared with the master after fork; USS (private pages, from
``/proc/self/smaps_rollup``, proc(5)) is what each worker really adds.
"""

from __future__ import annotations


def process_memory() -> tuple[int, int]:
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
                import resource
                rss = int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            return 0, 0
    return rss, uss or rss
