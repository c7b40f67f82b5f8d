"""Deliveries queries across nodes: the Redis agent's part of ``/admin/deliveries``.

Theory of operation
-------------------
A push's outcomes are in the delivery logs of the workers that handled it, on whichever nodes
(``rawsse/apns/deliverylog.py``): the one that took it, the one whose device got it. A worker
answering ``/admin/deliveries`` asks its own node's workers over the mesh and this agent for
the others (``FIND``), which asks them through Redis pub/sub, a bounded, timed fan-out:

- the query is published on ``P deliveries``, which every node's agent subscribes to, with this
  node's id and a query number; ``PUBLISH`` answers how many agents received it, so we know how
  many answers to wait for (every agent but ourselves);
- an agent receiving another node's query asks one of its workers (``ASK``), which collects its
  node's answers over the mesh (``ANSWER``); the agent publishes them on the asker's own reply
  channel ``P deliveries:<node>``;
- for a query by token the asking agent also reads the device's pending push in Redis (``MGET``
  of its pending keys), in the same batch as the ``PUBLISH``;
- the worker is answered (``FOUND``) once every agent answered, or after ``WAIT_SECONDS``, with
  the nodes that did not answer in time named (those of ``P nodes``, the live nodes' heartbeat
  set, read in the same batch): a query never waits on a stopped or partitioned node, and
  nothing blocks a loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from rawsse.apns.deliverylog import waiting_entry
from rawsse.cluster import records, scripts

if TYPE_CHECKING:
    from rawsse.cluster.agent import Agent

log = logging.getLogger(__name__)

WAIT_SECONDS = 1.0  # the longest a query waits for the other nodes
ANSWER_SECONDS = 5.0  # a question to our worker not answered by then is forgotten


class Query:
    """One of our workers' queries, waiting for the other nodes."""

    __slots__ = ("worker", "rid", "expected", "answers", "redis_waiting", "pending_read", "timer",
                 "live")

    def __init__(self, worker: int, rid: int) -> None:
        self.worker = worker
        self.rid = rid
        self.expected: int | None = None  # agents that received it, ourselves excluded
        self.answers: dict[str, bytes] = {}  # node id -> its answers (JSON)
        self.redis_waiting: list[dict[str, Any]] = []
        self.pending_read = False
        self.timer: asyncio.TimerHandle | None = None
        self.live: set[str] = set()  # the nodes of ``P nodes`` when it was asked

    def complete(self) -> bool:
        return (self.pending_read and self.expected is not None
                and len(self.answers) >= self.expected)


class DeliveryQueries:
    """The agent's queries to other nodes, and its answers to theirs (module docstring)."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        keys = agent.keys
        self.node = agent.config.node_id
        self.request_channel = keys.prefix + b"deliveries"
        self.reply_prefix = keys.prefix + b"deliveries:"
        self.reply_channel = self.reply_prefix + keys.node
        self.channels = (self.request_channel, self.reply_channel)
        self.asking: dict[int, Query] = {}
        self.answering: dict[int, tuple[str, int, float]] = {}  # rid -> (node, qid, deadline)
        self._ids = itertools.count(1)

    # -- records from our workers -------------------------------------------------------------

    def on_record(self, sender: int, kind: int, body: memoryview) -> None:
        rid, payload = records.parse_request(body)
        if kind == records.FIND:
            self.find(sender, rid, payload)
        elif kind == records.ANSWER:
            self.answered(rid, payload)

    def find(self, worker: int, rid: int, payload: bytes) -> None:
        """Ask every other node (module docstring); FOUND to ``worker`` when done."""
        qid = next(self._ids)
        query = Query(worker, rid)
        self.asking[qid] = query
        query.timer = asyncio.get_running_loop().call_later(WAIT_SECONDS, self.finish, qid)
        if not self.agent.up:
            self.finish(qid)
            return
        message = b'{"node":%s,"qid":%d,"query":%s}' % (orjson.dumps(self.node), qid, payload)
        self.agent.pipeline.call(("ZRANGE", self.agent.keys.prefix + b"nodes", 0, -1),
                                 lambda names: self._live(query, names))
        self.agent.pipeline.call(("PUBLISH", self.request_channel, message),
                                 lambda reply: self._published(qid, reply))
        tokens = [bytes.fromhex(t) for t in orjson.loads(payload).get("tokens") or ()]
        if not tokens:
            query.pending_read = True
            return
        keys = self.agent.keys
        self.agent.pipeline.call(("MGET", *[keys.pending(t) for t in tokens]),
                                 lambda reply: self._pending_read(qid, tokens, reply))

    @staticmethod
    def _live(query: Query, names: Any) -> None:
        if isinstance(names, list):
            query.live = {name.decode(errors="replace") for name in names}

    def _published(self, qid: int, reply: Any) -> None:
        query = self.asking.get(qid)
        if query is None:
            return
        if not isinstance(reply, int):
            self.agent.failed(reply)
            self.finish(qid)
            return
        query.expected = max(0, reply - 1)  # every subscriber but ourselves
        self._finish_if_complete(qid)

    def _pending_read(self, qid: int, tokens: list[bytes], values: Any) -> None:
        query = self.asking.get(qid)
        if query is None:
            return
        query.pending_read = True
        if isinstance(values, list):
            for token, value in zip(tokens, values):
                if value:
                    expires, frame = scripts.decode_value(value)
                    query.redis_waiting.append({**waiting_entry(token, frame, expires, "redis"),
                                                "node": None, "worker": None})
        self._finish_if_complete(qid)

    def _finish_if_complete(self, qid: int) -> None:
        query = self.asking.get(qid)
        if query is not None and query.complete():
            self.finish(qid)

    def finish(self, qid: int) -> None:
        """FOUND: the answers in, and the live nodes that did not answer named."""
        query = self.asking.pop(qid, None)
        if query is None:
            return
        if query.timer is not None:
            query.timer.cancel()
        late = sorted(query.live - set(query.answers) - {self.node})
        unnamed = (query.expected or 0) - len(query.answers) - len(late)
        if unnamed > 0:  # subscribed, but not in P nodes yet (just started)
            late.append(f"({unnamed} more, not yet in {self.agent.keys.prefix.decode()}nodes)")
        if query.expected is None:
            late = late or ["(other nodes: Redis is unreachable)"]
        nodes = b",".join(b"%s:%s" % (orjson.dumps(name), answers)
                          for name, answers in query.answers.items())
        body = b'{"nodes":{%s},"late":%s,"redis_waiting":%s}' % (
            nodes, orjson.dumps(late), orjson.dumps(query.redis_waiting))
        self.agent.mesh.send(query.worker, records.FOUND, records.request(query.rid, body))

    # -- messages from other nodes ------------------------------------------------------------

    def on_message(self, channel: bytes, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            node, qid = message["node"], int(message["qid"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bad message on %s: %s", channel.decode(errors="replace"), exc)
            return
        if channel == self.request_channel:
            if node != self.node:
                self.ask_worker(node, qid, orjson.dumps(message.get("query") or {}))
            return
        query = self.asking.get(qid)
        if query is not None:
            query.answers[str(node)] = orjson.dumps(message.get("answers") or [])
            self._finish_if_complete(qid)

    def ask_worker(self, node: str, qid: int, query: bytes) -> None:
        """Another node's query: one of our workers collects this node's answers."""
        now = time.monotonic()
        for rid in [rid for rid, entry in self.answering.items() if entry[2] < now]:
            del self.answering[rid]  # that worker never answered (it was being respawned)
        rid = next(self._ids)
        self.answering[rid] = (node, qid, now + ANSWER_SECONDS)
        self.agent.mesh.send(rid % self.agent.workers, records.ASK, records.request(rid, query))

    def answered(self, rid: int, answers: bytes) -> None:
        entry = self.answering.pop(rid, None)
        if entry is None or not self.agent.up:
            return
        node, qid, _deadline = entry
        message = b'{"node":%s,"qid":%d,"answers":%s}' % (orjson.dumps(self.node), qid, answers)
        self.agent.pipeline.call(("PUBLISH", self.reply_prefix + node.encode(), message),
                                 self.agent.check)
