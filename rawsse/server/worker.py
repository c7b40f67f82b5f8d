"""One serving process: listeners, connections, streams, the registry and the periodic sweeps.

Theory of operation
-------------------
A ``Worker`` owns one ``Loop``. Its listeners accept connections (``Conn``); a device request turns
its connection into a ``Stream`` registered in the ``Registry``; a push is validated by the routes
and handed to ``submit``, which delivers it here (this module) or, in a prefork node, to the
worker that owns the token (``mesh.py`` overrides the routing hooks: ``submit``, ``broadcast``,
``collect_stats``, ``share_admin_command``).

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

import errno
import gc
import logging
import math
import os
import random
import resource
import socket
import time
from typing import Any, Callable

from rawsse.server import frames
from rawsse.node import statefile
from rawsse.apns.admin import AdminState
from rawsse.config import ServeConfig
from rawsse.server.http1 import Conn
from rawsse.server.loop import READ_EVENTS, Loop
from rawsse.apns.validation import IdGenerator
from rawsse.apns.registry import Push, Registry
from rawsse.apns.routes import Routes
from rawsse.server.stats import Stats, snapshot
from rawsse.server.stream import Stream

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
GC_FREEZE_SECONDS = 30.0
GC_YOUNG_THRESHOLD = 20_000
ACCEPTS_PER_WAKEUP = 256
EMFILE_PAUSE_SECONDS = 0.1  # asyncio's accept backoff: retry later instead of spinning
# Each worker may hold this much more than its share of --max-connections: tokens hash unevenly
# over the shards (a few % at 300k), and a device refused below the node's target is worse than a
# node briefly over it. The open-file limit stays the hard bound.
CAPACITY_SLACK = 1.1
FD_RESERVE = 64  # fds kept free for the listener, log files, the state file, inter-worker pipes
EXPIRY_SWEEP_BUDGET = 20_000
READ_BUFFER_SIZE = 64 * 1024
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

SERVICE_UNAVAILABLE_CLOSE = frames.json_response(503, frames.reason_body("ServiceUnavailable"),
                                                 close=True)


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (systemd leaves soft at 1024 so select()
    users do not break; an epoll server is expected to raise it itself, ops.md §1.4)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def bind_listener(address: tuple[str, int], backlog: int) -> socket.socket:
    """A non-blocking listener with SO_REUSEPORT (each prefork worker binds its own, so the kernel
    spreads accepts over per-worker queues) and TCP_NODELAY, which accepted sockets inherit on
    Linux: small SSE events must not wait for Nagle."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts on one listening socket, at most ``ACCEPTS_PER_WAKEUP`` per loop turn."""

    __slots__ = ("sock", "fd", "worker", "operator", "paused")

    def __init__(self, sock: socket.socket, worker: "Worker", operator: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.worker = worker
        self.operator = operator
        self.paused = False

    def handle_events(self, events: int) -> None:
        worker = self.worker
        accept = self.sock._accept  # (fd, address) without building a socket object
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                fd, _addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                worker.stats.accept_errors[name] = worker.stats.accept_errors.get(name, 0) + 1
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    self.pause(EMFILE_PAUSE_SECONDS)
                return
            worker.accept(fd, self.operator)

    def pause(self, seconds: float) -> None:
        if not self.paused:
            self.paused = True
            self.worker.loop.remove(self.fd)
            self.worker.loop.call_later(seconds, self.resume)

    def resume(self) -> None:
        if self.paused and self.fd >= 0:
            self.paused = False
            self.worker.loop.add(self.fd, self)

    def close(self, reason: str = "shutdown") -> None:
        if self.fd >= 0:
            if not self.paused:
                self.worker.loop.remove(self.fd)
            self.fd = -1
            self.sock.close()


class Worker:
    """Everything one process serves. ``index`` is its place among the node's workers."""

    stream_type = Stream  # a Redis-mode worker's streams carry one more slot (cluster.py)

    def __init__(self, config: ServeConfig, index: int = 0, count: int = 1,
                 pending: dict[bytes, Push] | None = None, admin: AdminState | None = None) -> None:
        self.config = config
        self.index = index
        self.count = count
        self.loop = Loop()
        self.stats = Stats()
        self.registry = self.new_registry()
        # A worker (re)spawned by the master starts from the node's run-time admin state.
        self.admin = admin.copy() if admin is not None else AdminState(config.faults)
        self.ids = IdGenerator()
        self.routes = Routes(self)
        self.http_conns: set[Conn] = set()
        self.listeners: list[Listener] = []
        self.delayed = 0
        self.draining = False
        self.preambles = frames.retry_preambles(config.retry_ms)
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
        Stream.worker = self
        Stream.limit = config.stream_buffer
        Conn.worker = self
        if pending:
            self.registry.pending.update(pending)

    def new_registry(self) -> Registry:
        return Registry(self.stats)

    # -- startup ------------------------------------------------------------------------------

    def listen(self, sockets: list[tuple[socket.socket, bool]] | None = None,
               accept: bool = True) -> None:
        """Bind (or adopt) the listeners: the public one and, if configured, the operator one.
        With ``accept=False`` they are bound (a port clash fails now) but take connections
        only after ``start_accepting``: meanwhile the kernel queues them in the backlog."""
        if sockets is None:
            sockets = [(bind_listener(self.config.listen, self.config.backlog), False)]
            if self.config.admin_listen is not None:
                sockets.append((bind_listener(self.config.admin_listen, self.config.backlog), True))
        for sock, operator in sockets:
            listener = Listener(sock, self, operator)
            listener.paused = True
            self.listeners.append(listener)
        if accept:
            self.start_accepting()

    def start_accepting(self) -> None:
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
        conn = Conn(fd, operator)
        self.loop.add(fd, conn, READ_EVENTS)
        self.http_conns.add(conn)
        if self.draining or (not operator and self.connections() > self.capacity):
            # The connection cap answers 503 (uvicorn's limit_concurrency) and closes.
            self.stats.disconnect("rejected")
            conn.keep_alive = False
            conn.respond(SERVICE_UNAVAILABLE_CLOSE, close=True)

    def open_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        """A ``Conn`` finished a valid ``GET /events``: the fd now belongs to a ``Stream``."""
        stream = self.stream_type(fd, token)
        self.loop.replace(fd, stream)
        if events != READ_EVENTS:
            self.loop.modify(fd, READ_EVENTS)
        self._start_stream(stream, leftover)

    def adopt_stream(self, fd: int, token: bytes, leftover: bytes) -> None:
        """A device socket handed over by another worker (this worker owns its token)."""
        stream = self.stream_type(fd, token)
        self.loop.add(fd, stream, READ_EVENTS)
        self._start_stream(stream, leftover)

    def _start_stream(self, stream: Stream, leftover: bytes) -> None:
        """Write the head (after any earlier pipelined response), then attach: newest wins and
        a pending push follows the head at once."""
        head = random.choice(self.preambles)
        if stream.send(leftover + head if leftover else head):
            self.registry.attach(stream)

    # -- routing hooks (overridden by a prefork node) -----------------------------------------

    def submit(self, token: bytes, push: Push, delay: float,
               answer: Callable[[bool], None]) -> None:
        """Hand ``push`` to the token's owner (here: this worker) and ``answer`` whether it
        was accepted; a prefork node answers once the owner worker acknowledged it."""
        self.take_push(token, push, delay, answer)

    def take_push(self, token: bytes, push: Push, delay: float,
                  answer: Callable[[bool], None]) -> None:
        """The owner's half of ``submit``: accept here and answer (a Redis-mode worker may
        answer later, once Redis has routed or stored a push for a device it does not hold)."""
        answer(self.accept_push(token, push, delay))

    def accept_push(self, token: bytes, push: Push, delay: float) -> bool:
        """Deliver now or after ``delay``; False when a bounded queue is full (→ 503)."""
        if delay > 0:
            if self.delayed >= self.config.max_delayed or not self._can_store(token, push):
                return False
            self.delayed += 1
            self.loop.call_later(delay, self._deliver_delayed, token, push)
            return True
        if not self._can_store(token, push):
            return False
        self.registry.deliver(token, push)
        return True

    def _can_store(self, token: bytes, push: Push) -> bool:
        """The pending store is bounded (--max-pending); pushes already counted in it or in the
        delay queue reserve their place, so a push answered 200 is never dropped later."""
        registry = self.registry
        if token in registry.streams or token in registry.pending or push.expires <= 0:
            return True
        return len(registry.pending) + self.delayed < self.config.max_pending

    def _deliver_delayed(self, token: bytes, push: Push) -> None:
        self.delayed -= 1
        self.registry.deliver(token, push)

    def broadcast(self, frame: bytes, prefix: str, done: Callable[[int], None]) -> None:
        written = self.broadcast_local(frame, prefix)
        done(written)

    def broadcast_local(self, frame: bytes, prefix: str) -> int:
        self.stats.broadcasts += 1
        key: bytes | str = prefix
        if prefix and len(prefix) % 2 == 0:
            key = bytes.fromhex(prefix)
        written = self.registry.broadcast(frame, key)
        self.stats.broadcast_events += written
        return written

    def collect_stats(self, done: Callable[[dict[str, Any]], None]) -> None:
        done(node_document([self.snapshot()]))

    def share_admin_command(self, command: dict[str, Any], done: Callable[[], None]) -> None:
        """Apply ``command`` (replayable, ``admin.py``) on the node's other workers, then
        ``done()``; alone, at once."""
        done()

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.stats, worker=self.index, streams=len(self.registry.streams),
                        http=len(self.http_conns), pending=len(self.registry.pending),
                        delayed=self.delayed)

    # -- periodic work ------------------------------------------------------------------------

    def _tick(self) -> None:
        now = self.loop.now
        self.loop.call_later(self.tick_seconds, self._tick)
        for conn in [c for c in self.http_conns if c.deadline < now]:
            conn.timed_out()
        if self.config.keepalive > 0:
            self._send_keepalives(now)
        self.registry.sweep_expired(time.time(), EXPIRY_SWEEP_BUDGET)

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
            if stream.fd >= 0 and stream.out is None and stream.send(frames.SSE_KEEPALIVE):
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

    def flush_delayed(self) -> None:
        """Deliver (or keep pending) every push still waiting out its delivery delay: they were
        answered 200, so a stop must not drop them."""
        for timer in list(self.loop.timers):
            if timer[2] == self._deliver_delayed:
                callback, args = timer[2], timer[3]
                self.loop.cancel(timer)
                callback(*args)

    def close_streams(self, count: int) -> int:
        """Close up to ``count`` streams (drain); their unsent pushes become pending."""
        streams = list(self.registry.streams.values())[:count]
        for stream in streams:
            stream.close("shutdown")
        return len(streams)

    def pending_items(self) -> list[tuple[bytes, Push]]:
        return list(self.registry.pending.items())

    def save_state(self, path: str) -> int:
        return statefile.save(path, self.pending_items())


def node_document(workers: list[dict[str, Any]],
                  master: dict[str, Any] | None = None) -> dict[str, Any]:
    """``/stats`` for a node: totals over workers, each worker's own figures, and what the
    master knows (workers up, restarts, what died with a killed worker)."""
    totals: dict[str, Any] = {}
    for doc in workers:
        for key, value in doc.items():
            if key in ("worker", "pid"):
                continue
            if isinstance(value, dict):
                merged = totals.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                totals[key] = totals.get(key, 0) + value
    connections = totals.get("connections", 0)
    totals["user_bytes_per_connection"] = (
        round(totals.get("uss_bytes", 0) / connections) if connections else None)
    document: dict[str, Any] = {"node": totals, "workers": workers}
    if master:
        document["master"] = {k: v for k, v in master.items() if k != "type"}
    return document

