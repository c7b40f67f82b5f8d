"""``/metrics`` in the Prometheus text format (version 0.0.4) from a node's stats document.

Conventions (Prometheus, "Metric and label naming", prometheus.io/docs/practices/naming): prefix
``rawsse_``, counters end in ``_total``, base units (``_bytes``, ``_seconds``), a ``worker`` label
per process so ``sum()`` gives the node, and never a token in a label (unbounded cardinality).
"""

from __future__ import annotations

from typing import Any, Iterator

from rawsse.apns.auth import COUNTERS as AUTH_COUNTERS
from rawsse.server.stats import COUNTERS, PUSHES_METRIC

_GAUGES = {
    "pending": ("rawsse_pending_pushes", "Offline devices' pending pushes held."),
    "delayed": ("rawsse_delayed_pushes", "Pushes waiting out their delivery delay."),
    "rss_bytes": ("process_resident_memory_bytes", "Resident set size."),
    "uss_bytes": ("rawsse_unique_memory_bytes", "Memory private to the process (USS)."),
    "open_fds": ("process_open_fds", "Open file descriptors."),
    "max_fds": ("process_max_fds", "Open file descriptor limit."),
}


def render_metrics(document: dict[str, Any]) -> bytes:
    """The node document (``node`` totals, ``workers`` snapshots, optional ``master``) as text."""
    return ("\n".join(_lines(document)) + "\n").encode()


def _lines(document: dict[str, Any]) -> Iterator[str]:
    workers = document.get("workers", [])
    yield from _family("rawsse_connections", "gauge", "Open connections by kind.",
                       ((w, {"kind": "stream"}, w["streams"]) for w in workers),
                       ((w, {"kind": "http"}, w["http_connections"]) for w in workers))
    outcomes = [field for field, metric in COUNTERS.items() if metric is PUSHES_METRIC]
    yield from _family(PUSHES_METRIC.name, "counter", PUSHES_METRIC.help,
                       ((w, {"outcome": field}, w[field]) for w in workers for field in outcomes))
    for field, metric in COUNTERS.items():
        if metric is not PUSHES_METRIC:
            yield from _family(metric.name, "counter", metric.help,
                               ((w, {}, w[field]) for w in workers))
    yield from _family("rawsse_rejections_total", "counter", "Pushes refused, by status and reason.",
                       ((w, dict(zip(("status", "reason"), key.split(" ", 1))), n)
                        for w in workers for key, n in w["rejections"].items()))
    yield from _family("rawsse_disconnects_total", "counter", "Connections ended, by reason.",
                       ((w, {"reason": reason}, n) for w in workers
                        for reason, n in w["disconnects"].items()))
    yield from _family("rawsse_accept_errors_total", "counter", "accept() failures by errno.",
                       ((w, {"errno": name}, n) for w in workers
                        for name, n in w["accept_errors"].items()))
    for field, (name, help_text) in _GAUGES.items():
        yield from _family(name, "gauge", help_text, ((w, {}, w[field]) for w in workers))
    node = document.get("node", {})
    per_connection = node.get("user_bytes_per_connection")
    if per_connection is not None:
        yield from _family("rawsse_user_bytes_per_connection", "gauge",
                           "Node user-space memory growth since start divided by connections.",
                           iter([(None, {}, per_connection)]))
    master = document.get("master")
    if master:
        yield from _family("rawsse_workers", "gauge", "Workers serving.",
                           iter([(None, {}, master["workers_up"])]))
        yield from _family("rawsse_worker_restarts_total", "counter", "Workers respawned after dying.",
                           iter([(None, {}, master["worker_restarts"])]))
        yield from _family("rawsse_crash_lost_streams_total", "counter",
                           "Streams that died with a killed worker (their devices reconnect).",
                           iter([(None, {}, master["lost_streams"])]))
        yield from _family("rawsse_crash_lost_pending_total", "counter",
                           "Pending pushes that died with a killed worker.",
                           iter([(None, {}, master["lost_pending"])]))
    yield from _family("rawsse_sender_connections", "gauge",
                       "Push senders' connections held (--balance-senders spreads them).",
                       ((w, {}, w["sender_connections"]) for w in workers
                        if "sender_connections" in w))
    yield from _auth_lines(workers)
    yield from _redis_lines(document)
    for name, value in document.get("extra_gauges", {}).items():
        yield from _family(name, "gauge", "", iter([(None, {}, value)]))


def _auth_lines(workers: list[dict[str, Any]]) -> Iterator[str]:
    """--auth token|cert|any only (``rawsse.apns.auth``)."""
    workers = [w for w in workers if "auth" in w]
    for field, (name, help_text) in AUTH_COUNTERS.items():
        yield from _family(name, "counter", help_text, ((w, {}, w["auth"][field]) for w in workers))
    yield from _family("rawsse_auth_refusals_total", "counter",
                       "Pushes refused by provider authentication, by reason.",
                       ((w, {"reason": reason}, n) for w in workers
                        for reason, n in w["auth_refusals"].items()))


def _redis_lines(document: dict[str, Any]) -> Iterator[str]:
    """Redis mode only (``rawsse.cluster``): the agent's link to Redis and cross-node routing."""
    redis = document.get("redis")
    if redis is None:
        return
    yield from _family("rawsse_redis_up", "gauge", "1 while the node's Redis agent is connected to Redis.",
                       iter([(None, {}, redis.get("up", 0))]))
    yield from _family("rawsse_redis_errors_total", "counter",
                       "Redis operations that failed (unreachable, lost mid-batch, error reply) "
                       "and failed connection attempts.", iter([(None, {}, redis.get("errors", 0))]))
    yield from _family("rawsse_cluster_nodes", "gauge", "Nodes reporting to the cluster in Redis.",
                       iter([(None, {}, document.get("nodes", 1))]))
    # Questions to every other node (a cluster broadcast, a deliveries query: nodes.py) and the
    # nodes that gave no answer within the wait, as the answer's "missing" names them.
    yield from _family("rawsse_cluster_questions_total", "counter",
                       "Questions this node asked every other node (out) or answered (in): "
                       "cluster broadcasts and deliveries queries.",
                       iter([(None, {"direction": "out"}, redis.get("questions_out", 0)),
                             (None, {"direction": "in"}, redis.get("questions_in", 0))]))
    yield from _family("rawsse_cluster_unanswered_total", "counter",
                       "Nodes named missing in the answer to a cluster question: no answer "
                       "within the wait, lapsed, not subscribed, or Redis unreachable.",
                       iter([(None, {}, redis.get("unanswered", 0))]))
    workers = [w for w in document.get("workers", []) if "redis_routing" in w]
    yield from _family("rawsse_routed_pushes_total", "counter",
                       "Pushes routed through Redis to the node holding the device (out) or "
                       "from another node to this one (in).",
                       ((w, {"direction": "out"}, w["redis_routing"]["routed_out"]) for w in workers),
                       ((w, {"direction": "in"}, w["redis_routing"]["routed_in"]) for w in workers))


def _family(name: str, kind: str, help_text: str, *sources: Any) -> Iterator[str]:
    samples = [sample for source in sources for sample in source]
    if not samples:
        return
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {kind}"
    for worker, labels, value in samples:
        all_labels = dict(labels)
        if worker is not None:
            all_labels["worker"] = str(worker["worker"])
        yield f"{name}{_format_labels(all_labels)} {value}"


def _format_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
