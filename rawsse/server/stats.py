"""Per-worker counters: plain ints on one ``__slots__`` object, a counter per close reason (bjoern).

Counters only go up (Prometheus ``_total`` semantics); gauges (connections, pending, delayed) are
read from the live structures when a snapshot is taken. ``snapshot()`` is what a worker reports
and what ``/stats`` and ``/metrics`` render (``metrics.py``).

The ``Stats`` fields are the one list of counters: each names the Prometheus family ``/metrics``
shows it as, so a counter added here is in ``/stats`` and ``/metrics`` at once.
"""

from __future__ import annotations

import os
import time
import resource
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from rawsse.server import latency
from rawsse.server.procinfo import process_memory


class Metric(NamedTuple):
    """A Prometheus family: its name and ``# HELP`` text."""

    name: str
    help: str


# The four outcomes of a push share one family, told apart by an ``outcome`` label (the field name).
PUSHES_METRIC = Metric("rawsse_pushes_total", "Accepted or refused pushes by outcome.")


def _counter(name: str, help_text: str) -> int:
    """A counter with its own family ``name``."""
    return field(default=0, metadata={"metric": Metric(name, help_text)})


def _outcome() -> int:
    """A counter shown as ``rawsse_pushes_total{outcome="<field>"}``."""
    return field(default=0, metadata={"metric": PUSHES_METRIC})


DISCONNECT_REASONS = ("client", "takeover", "slow_reader", "timeout", "shutdown", "error",
                      "rejected")


@dataclass(slots=True, eq=False)
class Stats:
    connections_accepted: int = _counter("rawsse_connections_accepted_total",
                                         "Connections accepted.")
    pushes_received: int = _counter("rawsse_pushes_received_total", "Push requests on /3/device/.")
    pushes_ok: int = _counter("rawsse_pushes_ok_total", "Pushes answered 200.")
    delivered_live: int = _outcome()
    delivered_on_connect: int = _counter(
        "rawsse_delivered_on_connect_total",
        "Pending pushes written to a stream when its device connected.")
    stored: int = _outcome()
    coalesced: int = _counter("rawsse_coalesced_total",
                              "Pending pushes replaced by a newer one (APNs coalescing).")
    expired: int = _counter("rawsse_expired_total",
                            "Pending pushes dropped at their apns-expiration.")
    discarded: int = _outcome()
    requeued: int = _counter("rawsse_requeued_total",
                             "Pushes taken back from a stream that ended before writing them.")
    rejected: int = _outcome()
    faulted: int = _counter("rawsse_faulted_total", "Pushes answered by a fault rule.")
    queue_full: int = _counter("rawsse_queue_full_total",
                               "Pushes answered 503 because a bounded queue was full.")
    owner_unavailable: int = _counter(
        "rawsse_owner_unavailable_total",
        "Pushes answered 503 because the worker, node or Redis owning the token could not be "
        "reached.")
    broadcasts: int = _counter("rawsse_broadcasts_total", "Broadcasts handled.")
    broadcast_events: int = _counter("rawsse_broadcast_events_total",
                                     "Broadcast events written to streams.")
    broadcast_write_us: int = _counter(
        "rawsse_broadcast_write_microseconds_total",
        "Time this worker spent writing broadcast events to its streams (the write loop).")
    broadcast_deferred: int = _counter(
        "rawsse_broadcast_deferred_total",
        "Broadcast events a stream's socket did not take whole at once (its buffer was full): "
        "the rest is written when the socket is writable.")
    keepalives: int = _counter("rawsse_keepalives_total", "Keepalive comments written.")
    slow_reader_closes: int = _counter("rawsse_slow_reader_closes_total",
                                       "Streams closed over their output buffer.")
    streams_opened: int = _counter("rawsse_streams_opened_total",
                                   "Device streams opened (first connects and reconnects).")
    takeovers: int = _counter("rawsse_takeovers_total",
                              "Streams replaced by a newer one for the same token.")
    http_requests: int = _counter("rawsse_http_requests_total", "HTTP requests parsed.")
    bad_requests: int = _counter("rawsse_bad_requests_total",
                                 "Malformed HTTP requests answered 4xx and closed.")
    forwarded: int = _counter("rawsse_forwarded_pushes_total",
                              "Pushes forwarded to the worker owning the token.")
    forwarded_promised: int = _counter(
        "rawsse_forwarded_promised_total",
        "Forwarded pushes answered 200 within the owner's credit, without waiting for its "
        "answer (the rest of rawsse_forwarded_pushes_total waited for it).")
    promised_over_limit: int = _counter(
        "rawsse_promised_over_limit_total",
        "Forwarded pushes already answered 200 that met a full queue here and were held anyway.")
    handoffs: int = _counter("rawsse_stream_handoffs_total",
                             "Device sockets handed to the worker owning the token.")
    handoff_failures: int = _counter("rawsse_stream_handoff_failures_total",
                                     "Devices answered 503 because the owning worker was down.")
    senders_handed_over: int = _counter(
        "rawsse_sender_handoffs_total",
        "Push senders' connections handed, after their first read, to the worker holding the "
        "fewest (--balance-senders).")
    senders_adopted: int = _counter("rawsse_senders_adopted_total",
                                    "Push senders' connections taken over from another worker.")
    sender_handoff_failures: int = _counter(
        "rawsse_sender_handoff_failures_total",
        "Push senders' connections served here because their hand-off could not leave (the "
        "other worker gone or its mesh socket busy).")
    # (status, reason) -> count
    rejections: dict[tuple[int, str], int] = field(default_factory=dict)
    disconnects: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DISCONNECT_REASONS, 0))
    # errno name -> count
    accept_errors: dict[str, int] = field(default_factory=dict)
    # pushes written live, by delivery latency bucket (latency.py)
    latency: list[int] = field(default_factory=latency.new_counts)

    def reject(self, status: int, reason: str) -> None:
        self.rejected += 1
        key = (status, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


# counter field -> its family, in field order (the order of /stats and /metrics)
COUNTERS: dict[str, Metric] = {f.name: f.metadata["metric"] for f in fields(Stats)
                               if "metric" in f.metadata}


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
        "delivery_latency": latency.as_document(stats.latency),
        "rss_bytes": rss,
        "uss_bytes": uss,
        "open_fds": count_open_fds(),
        "max_fds": soft,
    }


_fd_cache = [0.0, -1]  # [monotonic time of the count, count]
FD_COUNT_SECONDS = 1.0


def count_open_fds() -> int:
    """Open fds, counted at most once a second: listing /proc/self/fd costs a dentry walk per
    fd, and every /stats or /metrics asks every worker (a flood of them must stay cheap)."""
    now = time.monotonic()
    if now - _fd_cache[0] >= FD_COUNT_SECONDS or _fd_cache[1] < 0:
        try:
            _fd_cache[1] = len(os.listdir("/proc/self/fd"))
        except OSError:
            _fd_cache[1] = -1
        _fd_cache[0] = now
    return int(_fd_cache[1])
