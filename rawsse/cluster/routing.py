"""A worker of a node in Redis mode: several rawsse nodes cooperating as one push service.

``join_cluster(process)`` adds the cluster's parts to a prefork worker (``rawsse.node.process``)
by composition: a ``ClusterOwner`` in its router (what the owning worker does with a push), a
``RedisPending`` store in its registry (where a push waits), a stream class with one more slot,
a tick hook, a snapshot hook, a gate on accepting, the cluster view in ``/stats``, and
broadcasts that reach every node (``broadcast.py``).

Theory of operation
-------------------
Each node is a master, its workers (each owning a hash shard of tokens, ``rawsse.node.routing``) and one
Redis agent (``agent.py``), the only process holding Redis connections. This module is the
workers' side: it decides what needs Redis and talks to the agent in mesh records
(``records.py``), never blocking its epoll loop. What lives in Redis and the scripts that
change it are in ``scripts.py``.

Ownership. A device that connects here is attached at once (head written, newest stream on this
node wins as before) and claimed in Redis: the CLAIM script takes a cluster-wide sequence number
(``INCR``), records this node as the token's owner, tells the previous owner node (on its channel
only) that its stream is superseded by connect ``seq``, and hands back the pending push stored for
the device, which follows the head. A node told so closes its stream only if that stream's own
connect number is lower, so a late message cannot evict a newer stream; a message that arrives
while our own claim is still in flight is kept until the claim's number is known. When a stream
ends, RELEASE deletes the owner key if it still names this node.

Pushes. A push reaches the worker owning its token on the receiving node (as before). If that
worker holds the device's stream, the push is written there: no Redis work at all. Otherwise one
ROUTE script (one pipelined round trip, shared with whatever else the agent is sending) publishes
it to the owner node's channel only, or, with no live owner, stores it as the device's pending
push with its TTL (``apns-expiration`` past or 0: discarded, never stored). The push is answered
200 once that happened, 503 if Redis could not be reached: never a 200 that is then lost.

Giving back. A push must never be lost or duplicated once answered 200, so every push this worker
holds but cannot write goes back through ROUTE: a routed push arriving after its stream ended (the
device moved on: it is routed to the new owner or stored), a stream's unsent push (``requeue``),
a claimed pending push whose stream ended meanwhile. If Redis cannot take it, it stays in this
worker's own pending store (``Registry.pending``, the state file at stop) and is given back when
Redis returns, or delivered here if the device connects here first.

Exactly once. Each decision is one atomic script, and a node's claims, routes and releases for a
token come from one worker in order over one agent connection, so Redis runs them in that order:
a push and a connect on different nodes are ordered by Redis (stored then claimed, or published to
the claimer), and a push is at any time in exactly one place (in flight to one node, in one
stream, or one pending key that ``GETDEL`` hands to one claimer).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import orjson

from rawsse.apns import deliverylog
from rawsse.apns.registry import Push
from rawsse.apns.routing import (
    HELD, UNREACHABLE, Accepted, BroadcastAnswer, push_answer,
)
from rawsse.cluster import records
from rawsse.cluster import scripts
from rawsse.cluster.broadcast import Join
from rawsse.node.mesh import REQUEST_TIMEOUT
from rawsse.server.documents import sum_totals
from rawsse.server.stream import Stream

if TYPE_CHECKING:
    from rawsse.node.process import NodeProcess

log = logging.getLogger(__name__)

BOOT_REDIS_WAIT = 5.0  # longest a booting worker waits for the agent's first Redis state
REDIS_GATE = "redis"

STATS_SECONDS = 2.0
RESYNC_SLICE = 2000  # re-claims per loop turn: a resync of 150k streams must not stall the loop
OUTBOX_SLICE = 2000  # locally kept pushes given back to Redis per tick
DRAIN_WAIT_SECONDS = 2.0

# What each ROUTE outcome means for the push, in the delivery log (FAILED: not taken, so the
# route answers 503, or the push is kept here and logged as stored).
_ROUTE_EVENTS = {scripts.ROUTED: deliverylog.ROUTED, scripts.STORED: deliverylog.STORED_IN_REDIS,
                 scripts.COALESCED: deliverylog.STORED_IN_REDIS,
                 scripts.DISCARDED: deliverylog.DISCARDED}

COUNTERS = ("routed_out", "routed_in", "given_back", "kept_local", "claims", "claimed",
            "claim_failures", "route_failures", "evictions", "resyncs")


class ClusterStream(Stream):
    """A stream that knows which connect of the cluster it is (0 until its claim is answered)."""

    __slots__ = ("seq",)

    def __init__(self, fd: int, token: bytes) -> None:
        super().__init__(fd, token)
        self.seq = 0


def join_cluster(process: "NodeProcess") -> "ClusterNode":
    """Make ``process``'s worker a node of the Redis cluster (module docstring)."""
    return ClusterNode(process)


class ClusterOwner:
    """The owning worker's half of a push in Redis mode."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: "ClusterNode") -> None:
        self.cluster = cluster

    def take_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                   delay: float, answer: Any, request: Any, apns_id: bytes) -> Accepted | None:
        cluster = self.cluster
        if token in cluster.registry.streams:  # held here: no Redis work at all, no Push
            return cluster.worker.delivery.take_plain(token, frame, expires, received, delay)
        push = Push(frame, expires, received)
        done = push_answer(answer, request, apns_id)
        taken = cluster.loop.now  # what the delivery log records, whenever Redis answers
        cluster.agent.route(token, push, delay, records.MODE_PUSH,
                            lambda outcome: done(cluster.count_route(outcome, token, push,
                                                                     taken)))
        return None  # answered once Redis did


class RedisPending:
    """Where a push waits in Redis mode: in Redis, with this worker as the fallback."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: "ClusterNode") -> None:
        self.cluster = cluster

    def attached(self, stream: Stream) -> None:
        """Hand over what was kept here, and claim the device in Redis (which hands over what
        waits there)."""
        cluster = self.cluster
        cluster.registry.hand_pending(stream)
        if isinstance(stream, ClusterStream):  # always, in a cluster worker
            cluster.claim(stream, records.CLAIM_TAKE)

    def detached(self, token: bytes) -> None:
        self.cluster.agent.release(token)

    def store(self, token: bytes, push: Push) -> None:
        """A push for a device not held here (a delayed delivery whose stream went away)."""
        self.cluster.give_back(token, push, records.MODE_PUSH)

    def store_requeued(self, token: bytes, push: Push) -> None:
        """A push a stream here did not finish writing goes back to Redis, where a newer
        pending push wins (``nx``)."""
        self.cluster.give_back(token, push, records.MODE_REQUEUE)

class AgentClient:
    """Requests to the node's Redis agent (mesh peer number ``workers``) and its replies."""

    def __init__(self, cluster: "ClusterNode") -> None:
        self.cluster = cluster
        self.mesh = mesh = cluster.process.mesh
        self.peer = cluster.worker.count
        mesh.add_peer(self.peer)
        mesh.handle(records.ROUTED, self._on_routed)
        mesh.handle(records.CLAIMED, self._on_claimed)
        mesh.handle(records.CLUSTER_VIEW, self._on_view)
        mesh.handle(records.CLUSTER_BCAST_DONE, self._on_view)  # the same shape: rid, JSON
        mesh.handle(records.DELIVER, self._on_deliver)
        mesh.handle(records.EVICT, self._on_evict)
        mesh.handle(records.STATE, self._on_state)
        mesh.handle(records.FOUND, self._on_found)
        mesh.handle(records.ASK, self._on_ask)

    def waiting(self) -> int:
        return sum(1 for entry in self.mesh.waiting.values() if entry[0] == self.peer)

    def _request(self, kind: int, body: Callable[[int], bytes], done: Callable[[Any], None],
                 timeout: float = REQUEST_TIMEOUT) -> None:
        if not self.mesh.can_send(self.peer):  # the agent is down (being respawned, starting)
            done(None)
            return
        rid = self.mesh.expect(self.peer, done, None, timeout)
        self.mesh.send(self.peer, kind, body(rid))

    def route(self, token: bytes, push: Push, delay: float, mode: int,
              done: Callable[[int], None]) -> None:
        """``done(outcome)``: one of ``scripts``' outcomes, FAILED when not run."""
        self._request(records.ROUTE,
                      lambda rid: records.route(rid, mode, push.expires, delay, token, push.frame),
                      lambda reply: done(scripts.FAILED if reply is None else reply))

    def claim(self, token: bytes, mode: int, done: Callable[[tuple[int, bytes] | None], None]) -> None:
        """``done((seq, pending value))``, seq 0 = taken by another node; None = failed."""
        self._request(records.CLAIM, lambda rid: records.claim(rid, mode, token), done)

    def release(self, token: bytes) -> None:
        if self.mesh.can_send(self.peer):
            self.mesh.send(self.peer, records.RELEASE, token)

    def put_stats(self, totals: dict[str, Any]) -> None:
        if self.mesh.can_send(self.peer):
            self.mesh.send(self.peer, records.STATS, orjson.dumps(totals))

    def cluster_view(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request(records.CLUSTER, records.request, done)

    def broadcast_elsewhere(self, frame: bytes, prefix: str, wait: float,
                            done: Callable[[dict[str, Any] | None], None]) -> None:
        """``done({"nodes", "reasons"})``: the other nodes' parts, within ``wait`` (the agent's
        bound) and a request timeout more; None when the agent could not be asked."""
        self._request(records.CLUSTER_BCAST,
                      lambda rid: records.broadcast(rid, prefix.encode(), frame), done,
                      wait + REQUEST_TIMEOUT)
    def find_deliveries(self, query: dict[str, Any],
                        done: Callable[[dict[str, Any] | None], None]) -> None:
        """``done({"nodes": {id: answers}, "late": [...], "redis_waiting": [...]})`` from the
        other nodes (``agent_deliveries.py``); None when the agent is down."""
        payload = orjson.dumps(query)
        self._request(records.FIND, lambda rid: records.request(rid, payload), done)

    # -- replies and messages -----------------------------------------------------------------

    def _on_routed(self, body: memoryview) -> None:
        rid, outcome = records.parse_routed(body)
        self.mesh.resolve(rid, outcome)

    def _on_claimed(self, body: memoryview) -> None:
        rid, seq, value = records.parse_claimed(body)
        self.mesh.resolve(rid, None if seq < 0 else (seq, value))

    def _on_view(self, body: memoryview) -> None:
        rid, payload = records.parse_request(body)
        self.mesh.resolve(rid, orjson.loads(payload))

    def _on_found(self, body: memoryview) -> None:
        rid, payload = records.parse_request(body)
        self.mesh.resolve(rid, orjson.loads(payload))

    def _on_ask(self, body: memoryview) -> None:
        """Another node's deliveries query: this node's answers, to the agent."""
        rid, payload = records.parse_request(body)
        # ``reply`` links up first: this worker may never have sent the agent anything yet.
        self.cluster.process.router.node_deliveries(
            orjson.loads(payload),
            lambda answers: self.mesh.reply(self.peer, records.ANSWER,
                                            records.request(rid, orjson.dumps(answers))))

    def _on_deliver(self, body: memoryview) -> None:
        expires, delay, token, frame = records.parse_deliver(body)
        # Received here: another node's monotonic clock is not ours (``latency.py``).
        self.cluster.routed_in(token, Push(frame, expires, time.monotonic()), delay)

    def _on_evict(self, body: memoryview) -> None:
        seq, token = records.parse_evict(body)
        self.cluster.evict(token, seq)

    def _on_state(self, body: memoryview) -> None:
        up, resync = records.parse_state(body)
        self.cluster.redis_state(up, resync)


class ClusterNode:
    """The cluster's parts of one worker, and what it does with Redis (module docstring)."""

    def __init__(self, process: "NodeProcess") -> None:
        self.process = process
        self.worker = worker = process.worker
        self.registry = worker.registry
        self.stats = worker.stats
        self.loop = worker.loop
        self.agent = AgentClient(self)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.redis_up = False
        # token -> highest superseding connect number heard while our claim was in flight
        self.evict_pending: dict[bytes, int] = {}
        # tokens whose claim failed while their stream stays open: claimed again next tick
        self.unclaimed: set[bytes] = set()
        self._last_stats = 0.0
        owner = ClusterOwner(self)
        process.router.owner = owner
        process.router.finish_document = self.with_cluster
        process.router.broadcast_to = self.broadcast
        process.router.finish_deliveries = self.with_other_nodes
        process.finish_drain = self.finish_drain
        worker.registry.store = RedisPending(self)
        worker.stream_type = ClusterStream
        worker.tick_hooks.append(self._tick)
        worker.snapshot_hooks.append(self._extend_snapshot)
        # Accepting waits for the agent's first word on Redis (or BOOT_REDIS_WAIT): a device
        # whose connect claim fails because the agent is still connecting would be re-claimed
        # in resync mode, which yields to an older stream on another node (newest must win).
        worker.hold(REDIS_GATE)
        self.loop.call_later(BOOT_REDIS_WAIT, self._redis_wait_over)

    # -- pushes ---------------------------------------------------------------------------------

    def count_route(self, outcome: int, token: bytes, push: Push, taken: float) -> Accepted:
        """Count a ROUTE outcome as the single-node counters would; HELD if Redis took it,
        UNREACHABLE if Redis (or the agent) could not be reached."""
        self.log_route(outcome, token, push, taken)
        stats = self.stats
        if outcome == scripts.ROUTED:
            self.counters["routed_out"] += 1
        elif outcome == scripts.STORED:
            stats.stored += 1
        elif outcome == scripts.COALESCED:
            stats.coalesced += 1
        elif outcome == scripts.DISCARDED:
            stats.discarded += 1
        else:
            self.counters["route_failures"] += 1
            return UNREACHABLE
        return HELD

    def log_route(self, outcome: int, token: bytes, push: Push, taken: float) -> None:
        """Record where ROUTE put ``push`` in the delivery log (if it is on), as of ``taken``:
        the device's node may have written it before our reply came."""
        log = self.registry.log
        code = _ROUTE_EVENTS.get(outcome)
        if log is not None and code is not None:
            log.record(code, token, push.frame, push.expires, taken)

    def routed_in(self, token: bytes, push: Push, delay: float) -> None:
        """A push another node routed here because this node owns the device."""
        self.counters["routed_in"] += 1
        if token not in self.registry.streams:
            self.give_back(token, push, records.MODE_PUSH)  # the device moved on meanwhile
        elif self.worker.delivery.accept(token, push, delay) is not HELD:
            self.registry.deliver(token, push)  # the delay queue is full: deliver now

    def give_back(self, token: bytes, push: Push, mode: int) -> None:
        """Put a push this worker cannot write back into Redis (routed to the device's node,
        or stored); kept here if Redis cannot take it."""
        self.counters["given_back"] += 1
        taken = self.loop.now

        def done(outcome: int) -> None:
            self.log_route(outcome, token, push, taken)
            if outcome == scripts.FAILED:
                self.counters["kept_local"] += 1
                self.registry.keep(token, push, newly_stored=False)
            elif outcome == scripts.DISCARDED:
                self.stats.discarded += 1

        self.agent.route(token, push, 0.0, mode, done)

    # -- ownership ------------------------------------------------------------------------------

    def claim(self, stream: ClusterStream, mode: int) -> None:
        self.counters["claims"] += 1
        self.agent.claim(stream.token, mode, lambda reply: self._claimed(stream, reply))

    def _claimed(self, stream: ClusterStream, reply: tuple[int, bytes] | None) -> None:
        token = stream.token
        current = self.registry.streams.get(token) is stream
        if current or token not in self.registry.streams:
            superseded_by = self.evict_pending.pop(token, 0)
        else:  # a newer local stream's own claim reply will settle it
            superseded_by = 0
        if reply is None:  # Redis or the agent unreachable: the stream stays, claimed later
            self.counters["claim_failures"] += 1
            if current:
                self.unclaimed.add(token)
            return
        self.counters["claimed"] += 1
        seq, value = reply
        if current and (seq == scripts.SEQ_TAKEN or superseded_by > seq):
            self._close_superseded(stream)  # another node holds a newer stream for the device
        elif current:
            stream.seq = seq
        if value:
            expires, frame = scripts.decode_value(value)
            self._hand_claimed(token, Push(frame, expires, time.monotonic()))

    def _hand_claimed(self, token: bytes, push: Push) -> None:
        """A pending push claimed from Redis: to the token's stream here, or back."""
        log = self.registry.log
        if push.expired(time.time()):
            self.stats.expired += 1
            if log is not None:
                log.record(deliverylog.EXPIRED, token, push.frame, push.expires)
            return
        stream = self.registry.streams.get(token)
        if stream is None:
            self.give_back(token, push, records.MODE_REQUEUE)
            return
        self.stats.delivered_on_connect += 1
        if stream.send(push.frame, push) and log is not None:
            log.record(deliverylog.DELIVERED_ON_CONNECT, stream.token, push.frame, push.expires)

    def held(self, token: bytes) -> ClusterStream | None:
        """The token's stream here (every stream of a cluster worker is a ClusterStream)."""
        stream = self.registry.streams.get(token)
        return stream if isinstance(stream, ClusterStream) else None

    def evict(self, token: bytes, seq: int) -> None:
        """Another node's connect number ``seq`` claimed a device this node may still hold."""
        stream = self.held(token)
        if stream is None:
            return
        if stream.seq == 0:  # our claim is in flight: decide when its number is known
            self.evict_pending[token] = max(seq, self.evict_pending.get(token, 0))
        elif stream.seq < seq:
            self._close_superseded(stream)

    def _close_superseded(self, stream: ClusterStream) -> None:
        self.counters["evictions"] += 1
        self.stats.takeovers += 1
        stream.close("takeover")  # its unsent push goes to the new owner through Redis

    # -- Redis up and down ----------------------------------------------------------------------

    def _redis_wait_over(self) -> None:
        """Redis unreachable at boot: serve anyway (streams work; pushes needing Redis get 503)."""
        self.worker.release(REDIS_GATE)

    def redis_state(self, up: bool, resync: bool) -> None:
        self.redis_up = up
        self._redis_wait_over()
        if up and resync:
            self.counters["resyncs"] += 1
            self.unclaimed.clear()  # every held stream is claimed again now
            streams = [s for s in self.registry.streams.values() if isinstance(s, ClusterStream)]
            self._resync(streams, 0)

    def _resync(self, streams: list[ClusterStream], start: int) -> None:
        """Re-claim every held stream after Redis came back (a slice per loop turn)."""
        end = min(len(streams), start + RESYNC_SLICE)
        for stream in streams[start:end]:
            if stream.fd >= 0 and self.registry.streams.get(stream.token) is stream:
                self.claim(stream, records.CLAIM_RESYNC)
        if end < len(streams) and self.redis_up:
            self.loop.call_later(0.0, self._resync, streams, end)

    def _claim_again(self) -> None:
        """Streams whose claim failed (the agent was starting or being respawned, a request
        timed out) are claimed again, yielding to a node that claimed the device meanwhile."""
        tokens, self.unclaimed = self.unclaimed, set()
        for token in tokens:
            stream = self.held(token)
            if stream is not None and stream.seq == 0:
                self.claim(stream, records.CLAIM_RESYNC)

    def _give_back_kept(self) -> None:
        """Pushes kept here while Redis was down (or loaded from the state file) go back."""
        pending = self.registry.pending
        for token in list(pending)[:OUTBOX_SLICE]:
            if token in self.registry.streams:
                continue  # attach already handed it over; never both
            self.give_back(token, pending.pop(token), records.MODE_REQUEUE)

    # -- broadcasts -------------------------------------------------------------------------------

    def broadcast(self, frame: bytes, prefix: str, done: BroadcastAnswer) -> None:
        """Every node's streams (``broadcast.py``): this node's through the mesh and the
        others' through the agent, at once."""
        config = self.worker.config
        join = Join(config.node_id, done)
        self.process.router.node_broadcast(frame, prefix, join.node_done)
        self.agent.broadcast_elsewhere(frame, prefix, config.broadcast_wait, join.others_done)

    # -- periodic work, stats, stop ----------------------------------------------------------------

    def _tick(self) -> None:
        if self.redis_up and self.unclaimed:
            self._claim_again()
        if self.redis_up and self.registry.pending:
            self._give_back_kept()
        worker = self.worker
        if worker.index == 0 and self.loop.now - self._last_stats >= STATS_SECONDS:
            self._last_stats = self.loop.now
            self.process.router.node_stats(lambda doc: self.agent.put_stats(doc["node"]))

    def _extend_snapshot(self, doc: dict[str, Any]) -> None:
        doc["redis_routing"] = dict(self.counters)

    def with_cluster(self, doc: dict[str, Any], done: Callable[[dict[str, Any]], None]) -> None:
        """The node document plus ``node_id``, ``nodes``, ``cluster`` totals and ``redis``."""
        self.agent.cluster_view(lambda view: done(cluster_document(doc, view)))

    def with_other_nodes(self, query: dict[str, Any], found: dict[str, Any],
                         done: Callable[[dict[str, Any]], None]) -> None:
        """A deliveries query's answers from this node, then the other nodes' through Redis."""
        node_id = self.worker.config.node_id
        self.agent.find_deliveries(query, lambda others: done(
            _deliveries_of_cluster(node_id, found, others)))

    def finish_drain(self, then: Callable[[], None]) -> None:
        """Wait (briefly) for the agent's answers to the pushes our closing streams gave back:
        a failed one must be kept in the state file, not lost with the process."""
        deadline = self.loop.now + DRAIN_WAIT_SECONDS

        def finish() -> None:
            if self.agent.waiting() and self.loop.now < deadline:
                self.loop.call_later(0.05, finish)
            else:
                then()

        finish()


def _deliveries_of_cluster(node_id: str, found: dict[str, Any],
                           others: dict[str, Any] | None) -> dict[str, Any]:
    """This node's answers to a deliveries query, with the other nodes' (or, the agent down,
    a note that they could not be asked)."""
    for answer in found["answers"]:
        answer["node"] = node_id
    if others is None:
        found["late"] = ["(other nodes: this node's Redis agent did not answer)"]
        return found
    for name, answers in others["nodes"].items():
        for answer in answers:
            answer["node"] = name
        found["answers"].extend(answers)
    found["late"] = others["late"]
    found["redis_waiting"] = others["redis_waiting"]
    return found


def cluster_document(doc: dict[str, Any], view: dict[str, Any] | None) -> dict[str, Any]:
    """Add the cluster to a node's ``/stats``: other nodes' last totals plus ours, live, summed
    (``cluster``) and by node (``cluster_nodes``, the live view's per-node rows)."""
    if view is None:  # the agent is down
        doc.update(node_id=None, nodes=1, cluster=doc["node"], redis={"up": 0})
        return doc
    node_id = view["node_id"]
    others = [totals for name, totals in view["nodes"].items() if name != node_id]
    doc["node_id"] = node_id
    doc["nodes"] = len(others) + 1
    doc["cluster"] = sum_totals([doc["node"], *others])
    doc["cluster_nodes"] = {**view["nodes"], node_id: doc["node"]}
    doc["redis"] = view["redis"]
    return doc
