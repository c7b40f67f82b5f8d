"""The Redis agent: the one process of a node that talks to Redis (``rawsse serve --redis``).

Theory of operation
-------------------
Several rawsse nodes act as one push service. Each node is a master, its workers (each owning a
hash shard of tokens, ``mesh.py``) and this agent, which the master spawns first and respawns
like a worker. The workers never block on Redis: they send the agent mesh records
(``records.py``) and get the answers back as records, in their epoll loops. The agent runs
asyncio (uvloop when installed) and holds exactly two Redis connections for the whole node:

- the command connection, a ``Pipeline``: every worker request becomes one ``EVALSHA`` of a
  script in ``scripts.py``, and requests queued while a batch is in flight leave together,
  so a node pays one round trip per batch, not per push;
- the subscriber, on the node's own channel ``P node:<id>``. One per node, not per worker, and
  nothing is broadcast: a push is published to the channel of the node holding the device only.
  The agent hands each message to the worker owning the token (``rawsse.node.routing.owner_of``).

A push for a device this node holds never reaches the agent (the owning worker delivers it).
Any other push costs one scripted round trip on the receiving node (route to the owner node's
channel, or store it pending with its TTL) and no command at all on the delivering node.

Redis down
----------
While Redis is unreachable every request fails at once (pushes needing Redis are answered 503,
claims leave the stream open and unregistered, pushes given back by ending streams stay in the
worker), and it is counted (``errors``). Streams and pushes between devices on this node are
untouched. The supervisor reconnects with backoff (0.1 s doubling to 5 s, jittered, reset after a
success; Fleet's never-reset backoff drifts to 60 s: fleetdm/fleet
``cmd/apple-apns-mock/coordinator.go`` with cenkalti/backoff's defaults), loads the
scripts, subscribes, and only then tells the workers ``STATE up, resync``: they re-claim every
stream they hold (taking the pushes stored for them meanwhile, ``GETDEL`` inside the claim) and
give back what they kept locally. Subscribing before re-claiming matters: a push routed to us
between the two would otherwise be published to nobody.

Admin changes
-------------
Token states and fault rules set at run time on any node hold for the whole cluster. A change
made here reaches the agent from the master (``admin`` control messages, replayable and stamped,
``admin.py``); one ADMIN script stores it (unless Redis holds a newer stamp) and publishes it on
``P admin``, which every agent reads and hands to its master, which applies it and passes it to
its workers. A change made while Redis is down is kept here and sent when it is back. Each time
the agent (re)connects it subscribes first, sends what it kept, then reads the stored state and
hands it to the master, so a node that starts or returns late answers like the others; applying a
change twice or late is harmless (the newest stamp wins everywhere).

Stats
-----
Every ``STATS_SECONDS`` worker 0 sends the node's totals (``STATS``) and the agent writes them to
``P stats:<node>`` with ``PX`` = 4 intervals, refreshes this node's entry in the ``P nodes``
sorted set (score = when it lapses; lapsed and leaving nodes: ``nodes.py``) and reads the live
ones' (``ZRANGE`` + ``MGET``; no ``SCAN`` over a keyspace holding a key per device). ``/stats``
asks the agent for that view (``CLUSTER``).

Questions to every node
-----------------------
A broadcast taken on any node reaches every node (``broadcast.py``): the agent asks each other
live node once on its channel and waits a bounded time (``nodes.py``); answering one, it hands
the event to its own workers as they hand it to each other (``BCAST``). A deliveries query
(``agent_deliveries.py``) is the same kind of question, answered by one of its workers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import time
from typing import Any

import orjson

from rawsse.cluster import records
from rawsse.cluster import scripts
from rawsse.cluster.agent_deliveries import DeliveryQueries
from rawsse.cluster.agent_mesh import AgentMesh
from rawsse.cluster.broadcast import Broadcasts
from rawsse.cluster.nodes import MESSAGES as NODE_MESSAGES, Nodes
from rawsse.config import ServeConfig
from rawsse.node.control import receive_from_master
from rawsse.node.routing import owner_of
from rawsse.cluster.pipeline import Pipeline

log = logging.getLogger(__name__)

STATS_SECONDS = 2.0
BEAT_SECONDS = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
CONNECT_TIMEOUT = 2.0
MIN_REDIS_VERSION = (6, 2)  # GETDEL and SET … GET (redis.io command pages: since 6.2.0)
DRAIN_GRACE_SECONDS = 5.0
MAX_ADMIN_BACKLOG = 100_000  # admin changes kept while Redis is down
ADMIN_CHUNK_BYTES = 32 * 1024  # per control message: the master reads 64 KiB at most


class Agent:
    """The agent process: mesh records in, Redis commands out, channel messages to workers."""

    def __init__(self, config: ServeConfig, mesh_node: int, workers: int,
                 control: socket.socket) -> None:
        self.config = config
        self.workers = workers
        self.control = control
        self.keys = scripts.Keys(config.redis_prefix, config.node_id)
        self.shas = {name: scripts.sha1(text).encode() for name, text in scripts.SCRIPTS.items()}
        self.mesh = AgentMesh(mesh_node, workers, self.on_record, self.undeliverable)
        self.pipeline = Pipeline(self.lost)
        self.nodes = Nodes(self.keys, self.pipeline, lambda: self.up)
        self.broadcasts = Broadcasts(self.mesh, self.nodes, config.broadcast_wait,
                                     config.broadcast_worker_wait)
        self.commands: Any = None  # the pipeline's connection, also while it is set up
        self.subscriber: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.up = False
        self.down = asyncio.Event()
        self.stopping = False
        self.done = asyncio.Event()
        self.cluster_view: dict[str, Any] = {}
        self.counters = dict.fromkeys(
            ("connects", "connect_failures", "disconnects", "routed_in", "evictions_in",
             "rerouted_undeliverable", "lost_undeliverable", "errors", "admin_out", "admin_in",
             "admin_lost"), 0)
        self.admin_backlog: list[dict[str, Any]] = []  # changes made here while Redis is down
        self.to_master: asyncio.Queue[bytes] = asyncio.Queue()
        self.last_error = ""
        self.deliveries = DeliveryQueries(self)  # /admin/deliveries across nodes

    # -- records from the workers -------------------------------------------------------------

    def on_record(self, sender: int, kind: int, body: memoryview) -> None:
        if not 0 <= sender < self.workers:
            return
        if kind == records.ROUTE:
            rid, mode, expires, delay, token, frame = records.parse_route(body)
            self.route(token, expires, delay, frame, mode,
                       lambda outcome: self.mesh.send(sender, records.ROUTED,
                                                      records.routed(rid, outcome)))
        elif kind == records.CLAIM:
            rid, mode, token = records.parse_claim(body)
            self.claim(sender, rid, mode, token)
        elif kind == records.RELEASE:
            token = bytes(body)
            self.pipeline.call(("EVALSHA", self.shas["release"], 1, self.keys.owner(token),
                                self.keys.node), self.check)
        elif kind == records.STATS:
            self.pipeline.call(("SET", self.keys.stats, bytes(body), "PX",
                                int(4 * STATS_SECONDS * 1000)), self.check)
        elif kind == records.CLUSTER:
            rid, _ = records.parse_request(body)
            self.mesh.send(sender, records.CLUSTER_VIEW, records.request(rid, self.view()))
        elif kind == records.CLUSTER_BCAST:
            self.broadcasts.ask_others(sender, body)
        elif kind == records.BCAST_DONE:
            self.broadcasts.on_done(body)
        elif kind in (records.FIND, records.ANSWER):
            self.deliveries.on_record(sender, kind, body)
        else:
            log.error("unknown agent record %d from worker %d", kind, sender)

    def route(self, token: bytes, expires: float, delay: float, frame: bytes, mode: int,
              done: Any) -> None:
        """ROUTE script: publish to the owner node, or store pending; ``done(outcome)``."""
        args = ("EVALSHA", self.shas["route"], 2, self.keys.owner(token), self.keys.pending(token),
                self.keys.node, self.keys.channel_prefix, scripts.push_head(token, delay),
                scripts.encode_value(expires, frame), scripts.ttl_ms(expires, time.time()),
                records.ROUTE_MODES.get(mode, b"set"))

        def routed(reply: Any) -> None:
            done(reply if isinstance(reply, int) else self.failed(reply))

        self.pipeline.call(args, routed)

    def claim(self, sender: int, rid: int, mode: int, token: bytes) -> None:
        args = ("EVALSHA", self.shas["claim"], 3, self.keys.owner(token), self.keys.pending(token),
                self.keys.seq, self.keys.node, self.keys.channel_prefix, scripts.evict_head(token),
                records.CLAIM_MODES.get(mode, b"take"))

        def claimed(reply: Any) -> None:
            if isinstance(reply, list) and reply:
                body = records.claimed(rid, int(reply[0]), reply[1] if len(reply) > 1 else b"")
            else:
                body = records.claimed(rid, self.failed(reply))
            self.mesh.send(sender, records.CLAIMED, body)

        self.pipeline.call(args, claimed)

    def failed(self, error: Any) -> int:
        """Count a failed command; a script missing from Redis (``SCRIPT FLUSH``, a failover)
        is repaired the way a lost connection is: reconnect, load, resync."""
        self.counters["errors"] += 1
        if self.up:  # while down, last_error keeps why the link went down
            self.last_error = str(error)
            if "NOSCRIPT" in self.last_error:
                self.lost(error)
        return scripts.FAILED

    def check(self, reply: Any) -> None:
        """The callback of a command whose reply is not needed: count it if it failed."""
        if isinstance(reply, BaseException):
            self.failed(reply)

    def view(self) -> bytes:
        """What ``/stats`` shows of Redis and the other nodes (at most one interval old)."""
        return orjson.dumps({
            "node_id": self.config.node_id,
            "nodes": self.cluster_view,
            "redis": {"up": int(self.up), **self.counters, **self.nodes.counters,
                      "batches": self.pipeline.batches,
                      "commands": self.pipeline.commands, "last_error": self.last_error},
        })

    # -- messages on our channel --------------------------------------------------------------

    def on_channel_message(self, data: bytes) -> None:
        if data[:1] in NODE_MESSAGES:  # a question from another node, or a reply to ours
            self.nodes.on_message(data)
            return
        try:
            kind, token, delay, value = scripts.parse_message(data)
        except (ValueError, IndexError) as exc:
            log.error("bad message on %s: %s", self.keys.channel.decode(), exc)
            return
        worker = owner_of(token, self.workers)
        if kind == scripts.MSG_PUSH:
            self.counters["routed_in"] += 1
            expires, frame = scripts.decode_value(value)  # type: ignore[arg-type]
            self.mesh.send(worker, records.DELIVER, records.deliver(expires, delay, token, frame))
        else:
            self.counters["evictions_in"] += 1
            self.mesh.send(worker, records.EVICT, records.evict(value, token))

    def undeliverable(self, worker: int, kind: int, body: bytes) -> None:
        """A record its worker could not take (being respawned): a routed push goes back into
        Redis (the worker's streams died with it); a broadcast counts none; replies and hints
        are moot."""
        if kind == records.BCAST:
            self.broadcasts.undeliverable(body)
        if kind != records.DELIVER:
            return
        expires, delay, token, frame = records.parse_deliver(memoryview(body))

        def rerouted(outcome: int) -> None:
            if outcome == scripts.FAILED:
                self.counters["lost_undeliverable"] += 1
                log.error("a routed push for a dead worker could not be put back in Redis")
            else:
                self.counters["rerouted_undeliverable"] += 1

        self.route(token, expires, 0.0, frame, records.MODE_PUSH, rerouted)

    # -- the connection -----------------------------------------------------------------------

    async def supervise(self) -> None:
        """Connect, serve until the connection is lost, reconnect with backoff; forever."""
        delay = BACKOFF_FIRST
        while not self.stopping:
            try:
                await self.connect()
            except Exception as exc:  # any failure to come up is retried, never fatal
                self.counters["connect_failures"] += 1
                self.counters["errors"] += 1
                if self.last_error != str(exc):
                    log.warning("redis %s unreachable: %s (retrying)", self._where(), exc)
                self.last_error = str(exc)
                await self.disconnect()
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            delay = BACKOFF_FIRST
            self.set_up()
            await self.down.wait()
            await self.set_down()

    async def connect(self) -> None:
        """Both connections, scripts loaded and the channel subscribed, or an exception."""
        from redis.asyncio import ConnectionPool
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No socket_timeout: every exchange here is bounded by an asyncio.timeout of its own
        # (below, and per batch in the pipeline), and with one set redis-py wraps each write in
        # asyncio.wait_for, a task per batch. Never retried by redis-py: see pipeline.py.
        pool = ConnectionPool.from_url(
            str(self.config.redis_url), socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=None,
            retry=Retry(NoBackoff(), 0), client_name=f"rawsse-{self.config.node_id}")
        self.commands = pool.make_connection()
        self.subscriber = pool.make_connection()
        async with asyncio.timeout(3 * CONNECT_TIMEOUT):
            await self._prepare(self.commands)
            await self._subscribe(self.subscriber)
            await self._warn_if_not_alone(self.commands)
            await self._sync_admin(self.commands)
        self.pipeline.attach(self.commands)
        self.reader = asyncio.ensure_future(self.read_channel(self.subscriber))

    async def _prepare(self, conn: Any) -> None:
        await conn.connect()
        await conn.send_command("INFO", "server")
        self._check_version(await conn.read_response())
        for name, text in scripts.SCRIPTS.items():
            await conn.send_command("SCRIPT", "LOAD", text)
            self.shas[name] = await conn.read_response()

    async def _subscribe(self, conn: Any) -> None:
        await conn.connect()
        # hiredis ≥ 3.2 types pub/sub arrays as push notifications (RESP2 too), and redis-py's
        # default handler formats a debug string of every message; ours passes them through
        # (redis-py's own PubSub sets its handler the same way).
        conn._parser.set_pubsub_push_handler(_as_is)
        channels = (self.keys.channel, self.keys.admin_channel)
        await conn.send_command("SUBSCRIBE", *channels)
        for _ in channels:  # one confirmation per channel: the subscriptions are in place
            await conn.read_response(push_request=True)

    async def _sync_admin(self, conn: Any) -> None:
        """Send the admin changes kept while Redis was down, then hand the cluster's stored
        admin state to the master (module docstring). Runs after subscribing, before the
        channel is read: a change published meanwhile is applied after the stored state."""
        kept, self.admin_backlog = self.admin_backlog, []
        for command in kept:
            await conn.send_command("EVALSHA", self.shas["admin"],
                                    *scripts.admin_script_args(self.keys, command,
                                                               self._admin_message(command)))
            await conn.read_response()
        self.counters["admin_out"] += len(kept)
        await conn.send_command("HGETALL", self.keys.admin_tokens)
        tokens = await conn.read_response()
        await conn.send_command("MGET", self.keys.admin_faults, self.keys.admin_cleared,
                                self.keys.admin_auth)
        faults, cleared, auth = await conn.read_response()
        if isinstance(tokens, dict):  # RESP3 maps
            tokens = [item for pair in tokens.items() for item in pair]
        self.send_admin_to_master(scripts.admin_commands_from(tokens, faults, cleared, auth))

    def _admin_message(self, command: dict[str, Any]) -> bytes:
        return orjson.dumps({"node": self.config.node_id, "commands": [command]})

    def publish_admin(self, commands: list[dict[str, Any]]) -> None:
        """Admin changes made on this node (from the master): stored and published, or kept
        until Redis is back."""
        for command in commands:
            if not self.up:
                self._keep_admin(command)
                continue

            def done(reply: Any, command: dict[str, Any] = command) -> None:
                if isinstance(reply, BaseException):
                    self.failed(reply)
                    self._keep_admin(command)
                else:
                    self.counters["admin_out"] += 1

            self.pipeline.call(("EVALSHA", self.shas["admin"],
                                *scripts.admin_script_args(self.keys, command,
                                                           self._admin_message(command))), done)

    def _keep_admin(self, command: dict[str, Any]) -> None:
        if len(self.admin_backlog) >= MAX_ADMIN_BACKLOG:
            self.counters["admin_lost"] += 1
            log.error("admin change not sent to the cluster: %d already wait for Redis",
                      MAX_ADMIN_BACKLOG)
            return
        self.admin_backlog.append(command)

    def on_admin_message(self, data: bytes) -> None:
        """A change another node published: to our master, which applies and passes it on."""
        try:
            message = orjson.loads(data)
            node, commands = message["node"], message["commands"]
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bad message on %s: %s", self.keys.admin_channel.decode(), exc)
            return
        if node != self.config.node_id:
            self.counters["admin_in"] += len(commands)
            self.send_admin_to_master(commands)

    def send_admin_to_master(self, commands: list[dict[str, Any]]) -> None:
        """Queue ``admin`` control messages of at most ADMIN_CHUNK_BYTES each, in order."""
        chunk: list[bytes] = []
        size = 0
        for command in commands:
            encoded = orjson.dumps(command)
            if chunk and size + len(encoded) > ADMIN_CHUNK_BYTES:
                self.to_master.put_nowait(_admin_control(chunk))
                chunk, size = [], 0
            chunk.append(encoded)
            size += len(encoded) + 1
        if chunk:
            self.to_master.put_nowait(_admin_control(chunk))

    async def write_to_master(self) -> None:
        """Admin messages to the master, waiting for room (a snapshot can be many messages)."""
        loop = asyncio.get_running_loop()
        while True:
            data = await self.to_master.get()
            try:
                await loop.sock_sendall(self.control, data)
            except OSError:
                return  # the master is gone: on_control sees the EOF and exits

    async def _warn_if_not_alone(self, conn: Any) -> None:
        await conn.send_command("PUBSUB", "NUMSUB", self.keys.channel)
        subscribers = (await conn.read_response())[1]
        if subscribers > 1:  # both would take every push routed to this node id
            log.error("%d connections subscribe to %s: is --node-id %s used by two nodes? "
                      "(or one of ours from before a network cut still lingers in Redis)",
                      subscribers, self.keys.channel.decode(), self.config.node_id)

    @staticmethod
    def _check_version(info: bytes) -> None:
        for line in info.decode(errors="replace").splitlines():
            if line.startswith("redis_version:"):
                version = tuple(int(p) for p in line.split(":", 1)[1].split(".")[:2])
                if version < MIN_REDIS_VERSION:
                    raise RuntimeError(f"Redis {line.split(':', 1)[1]} is older than 6.2 "
                                       "(GETDEL, SET … GET)")

    async def read_channel(self, conn: Any) -> None:
        import math

        from redis.exceptions import RedisError

        try:
            while True:
                message = await conn.read_response(timeout=math.inf, push_request=True)
                if isinstance(message, list) and message and message[0] == b"message":
                    if message[1] == self.keys.admin_channel:
                        self.on_admin_message(message[2])
                    else:
                        self.on_channel_message(message[2])
        except (RedisError, OSError) as exc:
            self.lost(exc)

    def lost(self, error: BaseException) -> None:
        if self.up and not self.down.is_set():
            self.last_error = str(error)
            self.down.set()

    def set_up(self) -> None:
        self.up = True
        self.counters["connects"] += 1
        self.down.clear()
        log.info("redis %s up: node %s, channel %s", self._where(), self.config.node_id,
                 self.keys.channel.decode())
        # The workers re-claim what they hold and give back what they kept (module docstring).
        self.mesh.send_all(records.STATE, records.state(True, True))
        asyncio.ensure_future(self.refresh_cluster())

    async def set_down(self) -> None:
        self.up = False
        self.counters["disconnects"] += 1
        self.counters["errors"] += 1
        log.warning("redis %s lost: %s; pushes needing it get 503 until it is back",
                    self._where(), self.last_error)
        self.pipeline.detach(RuntimeError(self.last_error))
        self.mesh.send_all(records.STATE, records.state(False, False))
        await self.disconnect()

    async def disconnect(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None
        conns = [self.commands, self.subscriber]
        self.pipeline.conn = self.commands = self.subscriber = None
        for conn in conns:
            if conn is not None:
                try:
                    await conn.disconnect(nowait=True)
                except Exception:
                    pass

    def _where(self) -> str:
        url = self.config.redis_url or ""
        return url.split("@")[-1]  # never log a password

    # -- periodic -----------------------------------------------------------------------------

    async def refresh_cluster(self) -> None:
        """Our heartbeat in ``P nodes`` (none once we are leaving) and every live node's last
        totals."""
        if not self.up:
            return
        try:
            names = await (self.nodes.read() if self.stopping else
                           self.nodes.beat(4 * STATS_SECONDS))
            values = await self.pipeline.ask(
                "MGET", *[self.keys.prefix + b"stats:" + name.encode() for name in names]) \
                if names else []
        except Exception as exc:
            self.failed(exc)
            return
        view = {}
        for name, value in zip(names, values):
            if value:
                view[name] = orjson.loads(value)
        self.cluster_view = view

    async def tick(self) -> None:
        last_stats = 0.0
        while True:
            await asyncio.sleep(BEAT_SECONDS)
            self.send_control({"type": "beat", "redis_up": int(self.up),
                               "errors": self.counters["errors"]})
            # A beacon, so a worker started (or respawned) after the last change learns it.
            self.mesh.send_all(records.STATE, records.state(self.up, False))
            now = time.monotonic()
            if now - last_stats >= STATS_SECONDS:
                last_stats = now
                await self.refresh_cluster()

    # -- life -----------------------------------------------------------------------------------

    def send_control(self, message: dict[str, Any]) -> None:
        try:
            self.control.send(orjson.dumps(message))
        except OSError:
            pass

    def on_control(self) -> None:
        message = receive_from_master(self.control, "redis agent")  # EOF exits
        if message is not None and message.get("type") == "admin":
            self.publish_admin(message.get("commands") or [])

    def on_term(self) -> None:
        if self.stopping:  # a second TERM: no more waiting
            self.done.set()
            return
        self.stopping = True
        asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Stay while the workers drain: their ending streams give pushes back to Redis
        through us. Leave once no worker is linked and nothing is queued, or at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_seconds + DRAIN_GRACE_SECONDS
        if self.up:  # leaving: other nodes' broadcasts stop waiting for (or missing) us
            try:
                await self.nodes.leave()
            except Exception as exc:
                log.warning("could not leave %snodes: %s", self.config.redis_prefix, exc)
        await asyncio.sleep(0.3)
        while loop.time() < deadline:
            if self.mesh.inbound == 0 and self.pipeline.idle():
                break
            await asyncio.sleep(0.05)
        self.done.set()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self.control.setblocking(False)
        loop.add_reader(self.control.fileno(), self.on_control)
        loop.add_signal_handler(signal.SIGTERM, self.on_term)
        tasks = [asyncio.ensure_future(coro) for coro in
                 (self.mesh.serve(), self.pipeline.run(), self.supervise(), self.tick(),
                  self.write_to_master())]
        self.send_control({"type": "ready"})
        await self.done.wait()
        for task in tasks:
            task.cancel()
        await self.disconnect()
        self.mesh.close()
        log.info("redis agent stopped")
        return 0


async def _as_is(message: Any) -> Any:
    return message


def _admin_control(encoded_commands: list[bytes]) -> bytes:
    return b'{"type":"admin","commands":[' + b",".join(encoded_commands) + b"]}"


def run_agent(config: ServeConfig, mesh_node: int, workers: int, control: socket.socket) -> int:
    """The agent process's main, called right after fork. Returns the exit code."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)  # the master decides
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:  # uvloop is optional: plain asyncio works, slower
        runner = asyncio.run

    async def start() -> int:
        agent = Agent(config, mesh_node, workers, control)
        agent.mesh.listen()
        return await agent.main()

    try:
        return runner(start())
    except OSError as exc:
        log.error("redis agent cannot start: %s", exc)
        return 1
