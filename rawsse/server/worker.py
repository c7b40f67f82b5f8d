"""One serving process: listeners, connections, streams, the registry and the periodic sweeps.

Theory of operation
-------------------
A ``Worker`` owns one ``Loop``. Its listeners accept connections (``Http1Connection``, which
hands a connection opening with the HTTP/2 preface back to ``switch_to_h2``); a device
request turns its connection into a ``Stream`` registered in the ``Registry``; a push is
validated by the routes (``rawsse.apns.routes``) and handed to the worker's ``router``
(``rawsse.apns.routing``). The worker is the same class in every topology: a single process
keeps the ``LocalRouter`` it starts with, a prefork worker gets a ``MeshRouter``
(``rawsse.node.process``), and a node of a Redis cluster a ``MeshRouter`` over a cluster owner
and pending store (``rawsse.cluster.routing``). What a topology adds to the worker's life it
registers here: a tick hook, a snapshot hook, a gate that holds accepting back.

Periodic work runs on one 1-second tick, never on per-connection timers (300,000 timer entries
would cost more than the streams themselves):
- HTTP deadlines (header timeout, idle keep-alive, lingering close) for the few non-stream
  connections;
- keepalives: every ``--keepalive`` seconds a round starts over a snapshot of the streams and
  writes ``: keepalive`` to an equal slice of it each tick, so 300k comments are spread over the
  interval instead of leaving in one burst;
- expired pending pushes, a bounded slice per tick.

Garbage collection: the loop allocates little that lives long except streams, and breaks its own
reference cycles (a parser and its connection) by hand, so the cyclic collector has nothing to
find among long-lived objects. Yet CPython's full collection walks every tracked object: at
300,000 streams that is a stall of tens of milliseconds on every stream. So after warm-up, and
then every ``GC_FREEZE_SECONDS``, ``gc.freeze()`` moves the survivors to the permanent generation
(never scanned), and the young-generation threshold is raised so a push burst does not trigger a
collection every 700 allocations.
"""

from __future__ import annotations

import gc
import math
import os
import random
import socket
import time
from typing import Any, Callable

from rawsse.apns import answers
from rawsse.apns.admin import AdminState
from rawsse.apns.auth import Authenticator
from rawsse.apns.delivery import Delivery
from rawsse.apns.deliverylog import DeliveryLog, worker_answer
from rawsse.apns.registry import Push, Registry
from rawsse.apns.routes import Routes
from rawsse.apns.routing import LocalOwner, LocalRouter, Router
from rawsse.apns.validation import IdGenerator
from rawsse.h2 import frames as h2_frames
from rawsse.config import ServeConfig
from rawsse.h2.connection import H2Connection
from rawsse.limits import raise_nofile_limit
from rawsse.server import http1_wire, sse
from rawsse.server.http1 import Http1Connection
from rawsse.server.listener import Listener, bind_listener
from rawsse.server.refusal import RefusedConnection
from rawsse.server.loop import READ_EVENTS, Loop
from rawsse.server.stats import Stats, snapshot
from rawsse.server.statsevents import VIEWER_TOKEN, StatsEvents
from rawsse.server.stream import Stream
from rawsse.server.tls import TlsHandshake, refuse_tls, server_context
from rawsse.server.transport import SocketTransport

TICK_SECONDS = 1.0
GC_FREEZE_SECONDS = 30.0
GC_YOUNG_THRESHOLD = 20_000
# Each worker may hold this much more than its share of --max-connections: tokens hash unevenly
# over the shards (a few % at 300k), and a device refused below the node's target is worse than a
# node briefly over it. The open-file limit stays the hard bound.
CAPACITY_SLACK = 1.1
FD_RESERVE = 64  # fds kept free for the listener, log files, the state file, inter-worker pipes
EXPIRY_SWEEP_BUDGET = 20_000
READ_BUFFER_SIZE = 64 * 1024

SERVICE_UNAVAILABLE_CLOSE = answers.error(503, "ServiceUnavailable", close=True)
SERVICE_UNAVAILABLE_CLOSE_BYTES = http1_wire.serialize(SERVICE_UNAVAILABLE_CLOSE, http1_wire.CLOSE)


class Worker:
    """Everything one process serves. ``index`` is its place among the node's workers."""

    def __init__(self, config: ServeConfig, index: int = 0, count: int = 1,
                 pending: dict[bytes, Push] | None = None, admin: AdminState | None = None) -> None:
        self.config = config
        self.index = index
        self.count = count
        self.loop = Loop()
        self.stats = Stats()
        self.registry = Registry(self.stats, self.loop)
        self.delivery = Delivery(self.registry, self.loop, config)
        if config.delivery_log:
            self.registry.log = DeliveryLog(config.delivery_log, self.loop)
        # A worker (re)spawned by the master starts from the node's run-time admin state.
        self.admin = admin.copy() if admin is not None else AdminState(config.faults)
        self.ids = IdGenerator()
        # Provider authentication (--auth); None under --auth off: the push route skips it.
        self.auth = Authenticator(config, self.admin.auth) if config.auth != "off" else None
        self.routes = Routes(self)
        self.stats_events = StatsEvents(self)  # /stats/events viewers, on worker 0 only
        self.router: Router = LocalRouter(self, LocalOwner(self.delivery))
        self.stream_type: type[Stream] = Stream  # a Redis-mode stream carries one more slot
        self.http_conns: set[Http1Connection | H2Connection | TlsHandshake
                             | RefusedConnection] = set()
        self.listeners: list[Listener] = []
        # Loaded per worker (an SSLContext does not survive fork); checked by the master first.
        self.tls_context = (server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
                            if config.tls_listen is not None else None)
        self.draining = False
        # What a topology adds: work on every tick, fields in every snapshot, and reasons not
        # to accept yet (a prefork worker waits for its peers, a cluster node for Redis).
        self.tick_hooks: list[Callable[[], None]] = [self.routes.reset_clock]
        self.snapshot_hooks: list[Callable[[dict[str, Any]], None]] = []
        self.accept_gates: set[str] = set()
        # Asked once per connection, on its first bytes: True when another worker of the node
        # took the connection (a push sender's, to the worker holding the fewest:
        # rawsse/node/balance.py). A single worker keeps every connection.
        self.balance_sender: Callable[[Http1Connection, Any], bool] = _keep_here
        self.preambles = sse.retry_preambles(config.retry_ms)
        self.read_buffer = bytearray(READ_BUFFER_SIZE)
        self.read_view = memoryview(self.read_buffer)
        self.read_buffers = [self.read_view]
        self.max_fds = raise_nofile_limit()
        share = config.max_connections / count * (CAPACITY_SLACK if count > 1 else 1.0)
        self.capacity = max(1, min(math.ceil(share), self.max_fds - FD_RESERVE))
        self._keepalive_round: list[Stream] = []
        self._keepalive_pos = 0
        self._keepalive_next = 0.0
        # Sub-second keepalives (tests, aggressive proxies) need a tick at least as fast.
        self.tick_seconds = min(TICK_SECONDS, config.keepalive) if config.keepalive > 0 else TICK_SECONDS
        if self.auth is not None:
            self.snapshot_hooks.append(self.auth.snapshot)
        Stream.bind(self, config.stream_buffer)
        if pending:
            self.registry.pending.update(pending)

    # -- startup ------------------------------------------------------------------------------

    def listen(self, sockets: list[tuple[socket.socket, bool]] | None = None) -> None:
        """Bind (or adopt) the listeners: the public one and, if configured, the operator one.
        They take connections once no gate holds accepting back (``release``); meanwhile the
        kernel queues them in the backlog, and a port clash fails now."""
        if sockets is None:
            sockets = [(bind_listener(self.config.listen, self.config.backlog), False)]
            if self.config.admin_listen is not None:
                sockets.append((bind_listener(self.config.admin_listen, self.config.backlog), True))
        for sock, operator in sockets:
            self.listeners.append(Listener(sock, self, operator))
        if self.config.tls_listen is not None:
            sock = bind_listener(self.config.tls_listen, self.config.backlog)
            self.listeners.append(Listener(sock, self, False, tls=True))
        self._accept_if_open()

    def hold(self, gate: str) -> None:
        """Do not accept until ``release(gate)``."""
        self.accept_gates.add(gate)

    def release(self, gate: str) -> None:
        self.accept_gates.discard(gate)
        self._accept_if_open()

    def _accept_if_open(self) -> None:
        if not self.accept_gates and not self.draining:
            for listener in self.listeners:
                listener.resume()

    def start(self) -> None:
        """Arm the periodic tick and the GC policy; call once before ``loop.run()``."""
        self._keepalive_next = self.loop.now + self.config.keepalive
        self.loop.call_later(self.tick_seconds, self._tick)
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
        self.loop.call_later(GC_FREEZE_SECONDS, self._freeze_survivors)

    # -- connections --------------------------------------------------------------------------

    def connections(self) -> int:
        return len(self.registry.streams) + len(self.http_conns)

    def accept(self, fd: int, operator: bool) -> None:
        os.set_blocking(fd, False)
        self.stats.connections_accepted += 1
        conn: Http1Connection | RefusedConnection
        if self.draining or (not operator and self.connections() >= self.capacity):
            # The connection cap answers 503 (uvicorn's limit_concurrency), or GOAWAY to an
            # HTTP/2 client (refusal.py), and closes.
            self.stats.disconnect("rejected")
            conn = RefusedConnection(self, fd, SERVICE_UNAVAILABLE_CLOSE)
        else:
            conn = Http1Connection(self, fd, operator)
        self.loop.add(fd, conn, READ_EVENTS)
        self.http_conns.add(conn)

    def accept_tls(self, fd: int) -> None:
        """A connection on ``--tls-listen``: its handshake runs in this loop (``tls.py``), and
        it stays on this worker."""
        self.stats.connections_accepted += 1
        if self.draining or self.connections() >= self.capacity or self.tls_context is None:
            self.stats.disconnect("rejected")
            refuse_tls(fd)
            return
        os.set_blocking(fd, False)
        handshake = TlsHandshake(self, fd, self.tls_context)
        self.loop.add(fd, handshake, READ_EVENTS)
        self.http_conns.add(handshake)

    def switch_to_h2(self, conn: Http1Connection | RefusedConnection, transport: SocketTransport,
                     received: bytes, going_away: tuple[int, str] | None = None) -> None:
        """The client opened with the HTTP/2 preface: the same socket goes on as HTTP/2. A
        refused connection gets its ``going_away`` GOAWAY at once; so does one whose preface
        completes while this worker drains (its Drainer has already passed: the GOAWAY it
        would have sent, NO_ERROR "Shutdown", with no stream processed)."""
        if going_away is None and self.draining:
            going_away = (h2_frames.NO_ERROR, "Shutdown")
        h2 = H2Connection(self, transport, conn.operator, received, going_away)
        self.http_conns.discard(conn)
        if h2.fd >= 0:
            self.loop.replace(h2.fd, h2)
            self.http_conns.add(h2)

    def adopt_connection(self, fd: int, received: bytes) -> Http1Connection:
        """A push sender's connection another worker of the node handed over after its first
        read (``rawsse/node/balance.py``), nothing answered on it yet: a fresh connection here,
        fed ``received``. Over capacity it is still served (refusing it now would lose what it
        sent); a draining worker answers what it asked, then closes it (HTTP/2: GOAWAY)."""
        self.stats.senders_adopted += 1
        conn = Http1Connection(self, fd, False)
        self.loop.add(fd, conn, READ_EVENTS)
        self.http_conns.add(conn)
        conn.resume(received)
        if self.draining and conn.fd >= 0:
            conn.finish_then_close()
        return conn

    def place_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        """A connection answered a valid ``GET /events``: its socket goes where the router says."""
        self.router.place_stream(fd, token, leftover, events)

    def open_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        """The fd, still registered for its connection, becomes a ``Stream`` of this worker."""
        if token == VIEWER_TOKEN:  # /stats/events, not a device (statsevents.py)
            self.stats_events.adopt(fd, leftover, registered=True)
            return
        stream = self.stream_type(fd, token)
        self.loop.replace(fd, stream)
        if events != READ_EVENTS:
            self.loop.modify(fd, READ_EVENTS)
        self._start_stream(stream, leftover)

    def adopt_stream(self, fd: int, token: bytes, leftover: bytes) -> None:
        """A device socket handed over by another worker (this worker owns its token).

        A draining worker takes none: each new stream would have to be closed again before the
        drain can end (its drain once never ended while peers kept handing devices over), and
        no other worker may hold the token's stream. The device gets 503 and reconnects, by
        then to the owner's replacement; a push for it meanwhile stays pending here and is
        passed on with the rest."""
        if self.draining:
            self.refuse_device(fd, leftover)
            return
        if token == VIEWER_TOKEN:
            self.stats_events.adopt(fd, leftover, registered=False)
            return
        stream = self.stream_type(fd, token)
        self.loop.add(fd, stream, READ_EVENTS)
        self._start_stream(stream, leftover)

    def refuse_device(self, fd: int, leftover: bytes) -> None:
        """Answer a device socket that is in no loop 503 and close it: it comes back later."""
        self.stats.disconnect("rejected")
        try:
            os.write(fd, leftover + SERVICE_UNAVAILABLE_CLOSE_BYTES)
        except OSError:
            pass
        os.close(fd)

    def _start_stream(self, stream: Stream, leftover: bytes) -> None:
        """Write the head (after any earlier pipelined response), then attach: newest wins and
        a pending push follows the head at once."""
        self.stats.streams_opened += 1
        head = random.choice(self.preambles)
        if stream.send(leftover + head if leftover else head):
            self.registry.attach(stream)

    def broadcast_local(self, frame: bytes, prefix: str) -> tuple[int, int]:
        """Write ``frame`` to this worker's streams (under ``prefix``); (written, refused).
        The write loop's time and its deferred streams are counted (``/stats``: where a
        broadcast's time goes, worker by worker)."""
        stats = self.stats
        stats.broadcasts += 1
        key: bytes | str = prefix
        if prefix and len(prefix) % 2 == 0:
            key = bytes.fromhex(prefix)
        started = time.perf_counter()
        written, refused, deferred = self.registry.broadcast(frame, key)
        stats.broadcast_write_us += int((time.perf_counter() - started) * 1e6)
        stats.broadcast_events += written
        stats.broadcast_deferred += deferred
        return written, refused

    def deliveries_answer(self, query: dict[str, Any]) -> dict[str, Any]:
        """This worker's part of a deliveries query (``deliverylog.worker_answer``)."""
        return worker_answer(self.registry.log, self.registry, self.delivery, self.index, query)

    def snapshot(self) -> dict[str, Any]:
        doc = snapshot(self.stats, worker=self.index, streams=len(self.registry.streams),
                       http=len(self.http_conns), pending=len(self.registry.pending),
                       delayed=self.delivery.delayed)
        for extend in self.snapshot_hooks:
            extend(doc)
        return doc

    # -- periodic work ------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self.loop.now
        self.loop.call_later(self.tick_seconds, self._tick)
        for conn in [c for c in self.http_conns if c.deadline < now]:
            conn.timed_out()
        if self.config.keepalive > 0:
            self._send_keepalives(now)
        self.registry.sweep_expired(time.time(), EXPIRY_SWEEP_BUDGET)
        for hook in self.tick_hooks:
            hook()

    def _send_keepalives(self, now: float) -> None:
        interval = self.config.keepalive
        if now >= self._keepalive_next:
            self._keepalive_next = now + interval
            self._keepalive_round = list(self.registry.streams.values())
            self._keepalive_pos = 0
        round_ = self._keepalive_round
        if not round_:
            return
        ticks = max(1, int(interval / self.tick_seconds))
        end = min(len(round_), self._keepalive_pos + math.ceil(len(round_) / ticks))
        sent = 0
        for stream in round_[self._keepalive_pos:end]:
            # A stream still behind on its buffer gets no comment: it would only grow.
            if stream.fd >= 0 and stream.out is None and stream.send(sse.SSE_KEEPALIVE):
                sent += 1
        self.stats.keepalives += sent
        self._keepalive_pos = end
        if end >= len(round_):
            self._keepalive_round = []

    def _freeze_survivors(self) -> None:
        gc.freeze()
        self.loop.call_later(GC_FREEZE_SECONDS, self._freeze_survivors)

    # -- stopping -----------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.draining = True
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def close_streams(self, count: int) -> int:
        """Close up to ``count`` streams (drain); their unsent pushes become pending."""
        streams = list(self.registry.streams.values())[:count]
        for stream in streams:
            stream.close("shutdown")
        return len(streams)

    def pending_items(self) -> list[tuple[bytes, Push]]:
        return list(self.registry.pending.items())


def _keep_here(conn: Http1Connection, first: Any) -> bool:
    return False
