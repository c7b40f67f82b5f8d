"""Per-worker counters: plain ints on one ``__slots__`` object, a counter per close reason (bjoern).

Counters only go up (Prometheus ``_total`` semantics); gauges (connections, pending, delayed) are
read from the live structures when a snapshot is taken. ``snapshot()`` is what a worker reports
and what ``/stats`` and ``/metrics`` render (``metrics.py``).
"""

from __future__ import annotations

import os
import resource

from rawsse.server.procinfo import process_memory

COUNTERS = (
    "connections_accepted",
    "pushes_received",
    "delivered_live",
    "delivered_on_connect",
    "stored",
    "coalesced",
    "expired",
    "discarded",
    "requeued",
    "rejected",
    "faulted",
    "queue_full",
    "owner_unavailable",
    "broadcasts",
    "broadcast_events",
    "keepalives",
    "slow_reader_closes",
    "takeovers",
    "http_requests",
    "bad_requests",
    "forwarded",
    "handoffs",
    "handoff_failures",
)

DISCONNECT_REASONS = ("client", "takeover", "slow_reader", "timeout", "shutdown", "error",
                      "rejected")


class Stats:
    __slots__ = COUNTERS + ("rejections", "disconnects", "accept_errors")

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        # (status, reason) -> count
        self.rejections: dict[tuple[int, str], int] = {}
        self.disconnects: dict[str, int] = dict.fromkeys(DISCONNECT_REASONS, 0)
        # errno name -> count
        self.accept_errors: dict[str, int] = {}

    def reject(self, status: int, reason: str) -> None:
        self.rejected += 1
        key = (status, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


def snapshot(stats: Stats, *, worker: int, streams: int, http: int, pending: int,
             delayed: int) -> dict[str, object]:
    """Everything one worker reports: counters, gauges, process memory and fds."""
    rss, uss = process_memory()
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    connections = streams + http
    return {
        "worker": worker,
        "pid": os.getpid(),
        "connections": connections,
        "streams": streams,
        "http_connections": http,
        "pending": pending,
        "delayed": delayed,
        **stats.counters(),
        "rejections": {f"{status} {reason}": n for (status, reason), n in
                       sorted(stats.rejections.items())},
        "disconnects": dict(stats.disconnects),
        "accept_errors": dict(stats.accept_errors),
        "rss_bytes": rss,
        "uss_bytes": uss,
        "open_fds": count_open_fds(),
        "max_fds": soft,
    }


def count_open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
