"""A broadcast for the whole cluster in Redis mode: one ``POST /broadcast`` on any node reaches
every node's streams, and its answer sums every node's part and names the nodes that gave none.

Theory of operation
-------------------
The worker that takes the request (``routing.ClusterNode.broadcast``) does two things at once.
Its node's part goes through the mesh exactly as on a single node: every worker writes the event
to its streams and replies with what it wrote and what was refused. The other nodes' part goes to
the node's agent in one record (``CLUSTER_BCAST``): the agent (``Broadcasts`` below) asks every
other live node once (``nodes.Nodes.ask``: one Redis message per node, carrying the prefix and the
event's bytes, never one per device) and waits at most ``--broadcast-wait``. Each node's agent
hands the event to its workers as they hand it to each other (``BCAST``), sums their replies and
answers. The worker waits for both halves and answers the request (``Join``).

The event is encoded once, by the receiving worker, with one apns-id, and travels as bytes: a
device sees the same event whichever node holds its stream.

Back-pressure is each node's own, as on a single node: a stream that cannot take the event (its
reader too far behind, ``--stream-buffer``, or gone) is closed and counted as refused on its node;
a broadcast is never queued for later (it has no pending store) and never answered 503 for it.

The answer, beside ``apns_id``::

    "streams": written on every node that answered, "refused": likewise,
    "nodes": {"<id>": {"streams": n, "refused": n}, ...}  this node and each node that answered,
    "missing": ["<id>", ...], "reasons": {"<id>": "why", ...}
    "missing_workers": {"<id>": [worker, ...], ...}  only when some node's workers gave no count

A node named missing did not answer within the wait (it may still write the event), had lapsed,
could not be reached, or (Redis down) was not asked; ``*`` stands for nodes that cannot be named
(this node's agent is down, or Redis went down before any other node was seen).
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

import orjson

from rawsse.apns.routing import BroadcastAnswer, tally
from rawsse.cluster import records
from rawsse.cluster.nodes import EVERY_OTHER

if TYPE_CHECKING:
    from rawsse.cluster.agent_mesh import AgentMesh
    from rawsse.cluster.nodes import Nodes

TOPIC = b"broadcast"
AGENT_DOWN = "this node's Redis agent is not running: no other node was asked"

Document = dict[str, Any]


# -- the worker that took the request ------------------------------------------------------------

class Join:
    """Waits for this node's part and the other nodes' parts, then answers once."""

    __slots__ = ("node_id", "done", "here", "elsewhere", "waiting")

    def __init__(self, node_id: str, done: BroadcastAnswer) -> None:
        self.node_id = node_id
        self.done = done
        self.here: Document = {}
        self.elsewhere: Document | None = None
        self.waiting = 2

    def node_done(self, reached: Document) -> None:
        self.here = reached
        self._one_more()

    def others_done(self, others: Document | None) -> None:
        """The agent's reply (``{"nodes", "reasons"}``), or None when it could not be asked."""
        self.elsewhere = others
        self._one_more()

    def _one_more(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.done(cluster_answer(self.node_id, self.here, self.elsewhere))


def cluster_answer(node_id: str, here: Document, others: Document | None) -> Document:
    """The fields of the answer (module docstring) from this node's part and the others'."""
    if others is None:
        others = {"nodes": {}, "reasons": {EVERY_OTHER: AGENT_DOWN}}
    nodes = {node_id: here, **others["nodes"]}
    reasons: dict[str, str] = others["reasons"]
    answer = {"streams": sum(part["streams"] for part in nodes.values()),
              "refused": sum(part["refused"] for part in nodes.values()),
              "nodes": nodes, "missing": sorted(reasons), "reasons": reasons}
    late = {node: part["missing_workers"] for node, part in sorted(nodes.items())
            if part.get("missing_workers")}
    if late:
        answer["missing_workers"] = late
    return answer


# -- the agents ----------------------------------------------------------------------------------

class Broadcasts:
    """A node agent's part: asking the other nodes for a worker here, answering for this node."""

    def __init__(self, mesh: "AgentMesh", nodes: "Nodes", wait: float,
                 worker_wait: float) -> None:
        self.mesh = mesh
        self.nodes = nodes
        self.wait = wait  # --broadcast-wait: for the other nodes
        self.worker_wait = worker_wait  # --broadcast-worker-wait: for each worker here
        # BCAST sent to a worker: its (written, refused), or None when it could not take it
        self.waiting: dict[int, asyncio.Future[tuple[int, int] | None]] = {}
        # Ids start at random, as the workers' do (``Mesh``): a worker's reply to a request of
        # an agent that died must not match one of its replacement's.
        self._next_id = random.getrandbits(32)
        self._tasks: set[asyncio.Task[None]] = set()
        nodes.answer_with(TOPIC, self.answer)

    # a broadcast taken on this node: the other nodes' part

    def ask_others(self, sender: int, body: memoryview) -> None:
        """A worker's ``CLUSTER_BCAST``: ask every other node; reply ``CLUSTER_BCAST_DONE``."""
        rid, prefix, frame = records.parse_broadcast(body)
        task = asyncio.ensure_future(self._ask_others(sender, rid, prefix, frame))
        self._tasks.add(task)  # a reference until it is done (asyncio keeps weak ones)
        task.add_done_callback(self._tasks.discard)

    async def _ask_others(self, sender: int, rid: int, prefix: bytes, frame: bytes) -> None:
        outcome = await self.nodes.ask(TOPIC, _question(prefix, frame), self.wait)
        parts: dict[str, Document] = {}
        for node, reply in outcome.replies.items():
            try:
                parts[node] = tally(*orjson.loads(reply))
            except (ValueError, TypeError):
                outcome.missing[node] = f"a reply this node cannot read: {reply[:40]!r}"
        others = {"nodes": parts, "reasons": outcome.missing}
        self.mesh.send(sender, records.CLUSTER_BCAST_DONE,
                       records.request(rid, orjson.dumps(others)))

    # a broadcast another node took: this node's part

    async def answer(self, body: bytes) -> bytes:
        """Every worker here writes the event; the reply is ``[written, refused, missing]``,
        ``missing`` the workers that gave no count within ``--broadcast-worker-wait`` or were
        down (a late one may still write the event): the asking node's ``tally`` of it."""
        prefix, frame = _parse_question(body)
        loop = asyncio.get_running_loop()
        futures = []
        for worker in range(self.mesh.workers):
            self._next_id = rid = (self._next_id + 1) & 0xFFFFFFFF
            future = self.waiting[rid] = loop.create_future()
            futures.append((rid, future))
            self.mesh.send(worker, records.BCAST, records.broadcast(rid, prefix, frame))
        # As long as this node waits for its workers on a broadcast it takes itself; the node
        # that asked names us missing as a whole if that is longer than its --broadcast-wait.
        await asyncio.wait([future for _, future in futures], timeout=self.worker_wait)
        written = refused = 0
        missing = []
        for worker, (rid, future) in enumerate(futures):
            self.waiting.pop(rid, None)
            part = future.result() if future.done() else None
            if part is None:
                missing.append(worker)
            else:
                written += part[0]
                refused += part[1]
        return orjson.dumps([written, refused, missing])

    def on_done(self, body: memoryview) -> None:
        """A worker's ``BCAST_DONE``."""
        rid, written, refused = records.parse_broadcast_done(body)
        self._resolve(rid, (written, refused))

    def undeliverable(self, body: bytes) -> None:
        """A ``BCAST`` its worker could not take (dead, its replacement not listening yet, so
        ``agent_mesh`` could not send it again): its streams died with it, and the reply names
        it at once, as a single node names a worker that is down."""
        rid = records.parse_broadcast(memoryview(body))[0]
        self._resolve(rid, None)

    def _resolve(self, rid: int, value: tuple[int, int] | None) -> None:
        future = self.waiting.pop(rid, None)
        if future is not None and not future.done():
            future.set_result(value)


def _question(prefix: bytes, frame: bytes) -> bytes:
    return bytes([len(prefix)]) + prefix + frame


def _parse_question(body: bytes) -> tuple[bytes, bytes]:
    length = body[0]
    return body[1:1 + length], body[1 + length:]

