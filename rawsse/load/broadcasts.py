"""What the ``200`` answers of ``rawsse push --broadcast`` add up to.

Each ``POST /broadcast`` answer says how many streams took the event (``streams``) and how many
could not (``refused``: closed as slow readers, or gone); in Redis mode it also names the nodes
that gave no part (``missing``, with one ``reasons`` entry each: no answer within
``--broadcast-wait``, lapsed, not subscribed, Redis down; ``*`` when none could be named). A run
sums both counts and counts, per missing node, the broadcasts that named it, keeping the last
reason given: a node missing from every broadcast is down, one missing now and then is slow.
Likewise per worker named in ``missing_workers`` (no count within ``--broadcast-worker-wait``,
or down): a list of the node's worker indexes (``"3"``), in Redis mode a list per node
(``"nb/3"``: worker 3 of node nb).
"""

from __future__ import annotations

from typing import Any

import orjson


class BroadcastTally:
    __slots__ = ("streams", "refused", "missing", "reasons", "missing_workers")

    def __init__(self) -> None:
        self.streams = 0
        self.refused = 0
        self.missing: dict[str, int] = {}  # node id -> broadcasts that named it
        self.reasons: dict[str, str] = {}  # node id -> the last reason given
        # "3" (worker 3), "nb/3" (worker 3 of node nb) -> broadcasts that named it
        self.missing_workers: dict[str, int] = {}

    def add(self, body: bytes) -> None:
        """One ``200`` answer's body; fields that are absent (a single node) or malformed are
        skipped."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        self.streams += _count(doc.get("streams"))
        self.refused += _count(doc.get("refused"))
        workers = doc.get("missing_workers")
        if isinstance(workers, list):
            self._count_workers("", workers)
        elif isinstance(workers, dict):  # Redis mode: by node
            for node, indexes in workers.items():
                if isinstance(indexes, list):
                    self._count_workers(f"{node}/", indexes)
        missing, reasons = doc.get("missing"), doc.get("reasons")
        if not isinstance(missing, list):
            return
        for node in missing:
            if isinstance(node, str):
                self.missing[node] = self.missing.get(node, 0) + 1
                reason = reasons.get(node) if isinstance(reasons, dict) else None
                if isinstance(reason, str):
                    self.reasons[node] = reason

    def _count_workers(self, key_prefix: str, workers: list[Any]) -> None:
        for worker in workers:
            if isinstance(worker, int):
                key = f"{key_prefix}{worker}"
                self.missing_workers[key] = self.missing_workers.get(key, 0) + 1

    def progress_text(self) -> str:
        """`` streams 1200 refused 3 missing nb 2 missing workers 3:1``: for the progress line
        (a node, then how many broadcasts named it; a worker:how many)."""
        text = f" streams {self.streams} refused {self.refused}"
        if self.missing:
            text += " missing " + ", ".join(f"{node} {n}" for node, n in self.missing.items())
        if self.missing_workers:  # worker:broadcasts
            text += " missing workers " + ", ".join(
                f"{worker}:{n}" for worker, n in self.missing_workers.items())
        return text

    def report(self) -> dict[str, Any]:
        return {"streams": self.streams, "refused": self.refused,
                "missing": dict(sorted(self.missing.items())),
                "missing_reasons": dict(sorted(self.reasons.items())),
                "missing_workers": dict(sorted(self.missing_workers.items(), key=_by_node_and_worker))}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _by_node_and_worker(item: tuple[str, int]) -> tuple[str, int]:
    """``"3"`` and ``"nb/3"`` in node order, then by worker index (so 10 comes after 9)."""
    node, _, worker = item[0].rpartition("/")
    return node, int(worker)
