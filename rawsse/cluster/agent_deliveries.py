"""Deliveries queries across nodes: the Redis agent's part of ``/admin/deliveries``.

Theory of operation
-------------------
A push's outcomes are in the delivery logs of the workers that handled it, on whichever nodes
(``rawsse/apns/deliverylog.py``): the one that took it, the one whose device got it. A worker
answering ``/admin/deliveries`` asks its own node's workers over the mesh and this agent for
the others (``FIND``). The agent asks every other live node once, with the bounded question a
cluster broadcast uses (``nodes.Nodes.ask``: one message on each node's own channel, at most
``WAIT_SECONDS``, every node that gave no answer named), and for a query by token reads the
device's pending push in Redis meanwhile (``MGET`` of its pending keys). An agent asked by
another node hands the query to one of its workers (``ASK``), which collects its node's answers
over the mesh (``ANSWER``): that is its reply. The worker gets ``FOUND``: the other nodes'
answers, the nodes that gave none (``late``) and what waits in Redis. Nothing blocks a loop and
no query waits on a stopped or partitioned node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

import orjson

from rawsse.apns.deliverylog import waiting_entry
from rawsse.cluster import records, scripts

if TYPE_CHECKING:
    from rawsse.cluster.agent import Agent

log = logging.getLogger(__name__)

TOPIC = b"deliveries"
WAIT_SECONDS = 1.0  # the longest a query waits for the other nodes and for Redis
# The longest one of our workers may take to answer another node's query: a little less than
# the asking node waits, so a late answer is not sent for nothing.
ANSWER_SECONDS = 0.9


class DeliveryQueries:
    """The agent's queries to other nodes, and its answers to theirs (module docstring)."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.answers: dict[int, asyncio.Future[bytes]] = {}  # ASKs sent to our workers
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        agent.nodes.answer_with(TOPIC, self.answer)

    def on_record(self, sender: int, kind: int, body: memoryview) -> None:
        rid, payload = records.parse_request(body)
        if kind == records.FIND:
            task = asyncio.ensure_future(self.find(sender, rid, bytes(payload)))
            self._tasks.add(task)  # a reference until it is done (asyncio keeps weak ones)
            task.add_done_callback(self._tasks.discard)
        elif kind == records.ANSWER:
            future = self.answers.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(bytes(payload))

    # -- a query one of our workers asks ------------------------------------------------------

    async def find(self, worker: int, rid: int, payload: bytes) -> None:
        """Ask every other node (module docstring); FOUND to ``worker`` when done."""
        tokens = [bytes.fromhex(t) for t in orjson.loads(payload).get("tokens") or ()]
        in_redis = asyncio.ensure_future(self._waiting_in_redis(tokens))
        outcome = await self.agent.nodes.ask(TOPIC, payload, WAIT_SECONDS)
        nodes: dict[str, Any] = {}
        for node, reply in outcome.replies.items():
            try:
                nodes[node] = orjson.loads(reply)
            except ValueError:
                outcome.missing[node] = f"a reply this node cannot read: {reply[:40]!r}"
        found = {"nodes": nodes, "late": sorted(outcome.missing),
                 "redis_waiting": await in_redis}
        self.agent.mesh.send(worker, records.FOUND, records.request(rid, orjson.dumps(found)))

    async def _waiting_in_redis(self, tokens: list[bytes]) -> list[dict[str, Any]]:
        """The pushes stored in Redis for ``tokens`` (devices offline on every node)."""
        if not tokens or not self.agent.up:
            return []
        keys = self.agent.keys
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                values = await self.agent.pipeline.ask("MGET", *[keys.pending(t) for t in tokens])
        except Exception as exc:  # Redis went away or did not answer in time
            self.agent.failed(exc)
            return []
        waiting = []
        for token, value in zip(tokens, values):
            if value:
                expires, frame = scripts.decode_value(value)
                waiting.append({**waiting_entry(token, frame, expires, "redis"),
                                "node": None, "worker": None})
        return waiting

    # -- a query another node asks ------------------------------------------------------------

    async def answer(self, query: bytes) -> bytes:
        """One of our workers collects this node's answers (``ASK``, answered ``ANSWER``)."""
        rid = next(self._ids)
        future = self.answers[rid] = asyncio.get_running_loop().create_future()
        self.agent.mesh.send(rid % self.agent.workers, records.ASK, records.request(rid, query))
        try:
            return await asyncio.wait_for(future, ANSWER_SECONDS)
        finally:
            self.answers.pop(rid, None)
