"""A worker process of a prefork node: its routing (``NodeWorker``) and its life after fork.

Exit codes are the API with the master (gunicorn's convention): 0 after a drain, ``BOOT_ERROR``
when the worker could not start serving (the master then stops instead of fork-looping).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any, Callable

import orjson

from rawsse.node import statefile
from rawsse.apns.admin import AdminError, AdminState
from rawsse.config import ServeConfig
from rawsse.node.control import receive_from_master
from rawsse.node.drain import Drainer
from rawsse.server.loop import READ_EVENTS
from rawsse.node.mesh import STATS, Mesh, owner_of
from rawsse.apns.registry import Push
from rawsse.server.worker import SERVICE_UNAVAILABLE_CLOSE, Worker, node_document

log = logging.getLogger(__name__)

BOOT_ERROR = 3


class NodeWorker(Worker):
    """A worker that owns one shard of tokens and routes the rest through the mesh."""

    def __init__(self, config: ServeConfig, index: int, count: int, node: int,
                 control: socket.socket, pending: dict[bytes, Push], part_path: str,
                 admin: AdminState | None = None) -> None:
        super().__init__(config, index, count, pending, admin)
        self.mesh = Mesh(self, node)
        self.control = ControlLink(self, control)
        self.master_info: dict[str, Any] = {}
        self.part_path = part_path
        self.drainer: Drainer | None = None

    # -- routing hooks ------------------------------------------------------------------------

    def submit(self, token: bytes, push: Push, delay: float,
               answer: Callable[[bool], None]) -> None:
        owner = owner_of(token, self.count)
        if owner == self.index:
            self.take_push(token, push, delay, answer)
        else:
            self.stats.forwarded += 1
            self.mesh.forward_push(owner, token, push, delay, answer)

    def open_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        owner = owner_of(token, self.count)
        if owner == self.index:
            super().open_stream(fd, token, leftover, events)
            return
        self.loop.remove(fd)
        if self.mesh.hand_off(owner, fd, token, leftover):
            self.stats.handoffs += 1
            return
        # The owner is down (being respawned): the device is told to come back later.
        self.stats.handoff_failures += 1
        self.stats.disconnect("rejected")
        try:
            os.write(fd, leftover + SERVICE_UNAVAILABLE_CLOSE)
        except OSError:
            pass
        os.close(fd)

    def broadcast(self, frame: bytes, prefix: str, done: Callable[[int], None]) -> None:
        self.mesh.broadcast(frame, prefix, done)

    def collect_stats(self, done: Callable[[dict[str, Any]], None]) -> None:
        own = self.snapshot()

        def finish(replies: list[Any]) -> None:
            workers = sorted([own, *replies], key=lambda doc: doc["worker"])
            done(node_document(workers, self.master_info))

        self.mesh.collect(STATS, b"", finish)

    def share_admin_command(self, command: dict[str, Any], done: Callable[[], None]) -> None:
        """The running workers get it through the mesh before the answer (so it holds for the
        very next push wherever it lands); the master gets it too, keeps the node's state for
        workers it spawns later and hands it to any worker still booting."""
        self.control.send({"type": "admin", "commands": [command]})
        self.mesh.share(command, lambda replies: done())

    # -- life -----------------------------------------------------------------------------------

    def _tick(self) -> None:
        super()._tick()
        self.mesh.expire_waiting(self.loop.now)
        self.control.beat()

    def drain(self) -> None:
        if self.drainer is None:
            self.drainer = Drainer(self, self.config.drain_seconds, self._drained)
        else:  # a second TERM: no more waiting
            self.drainer.finish_now()

    def _drained(self) -> None:
        saved = statefile.save(self.part_path, self.pending_items())
        log.info("worker %d drained; %d pending pushes kept", self.index, saved)
        self.loop.stop()


class ControlLink:
    """The worker's end of its socketpair with the master: heartbeats out, node info in."""

    __slots__ = ("worker", "sock", "fd")

    def __init__(self, worker: NodeWorker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        worker.loop.add(self.fd, self, READ_EVENTS)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(orjson.dumps(message))
        except (BlockingIOError, OSError):
            pass  # the master reads every beat; a lost one is covered by the next

    def beat(self) -> None:
        w = self.worker
        self.send({"type": "beat", "streams": len(w.registry.streams), "pending": len(w.registry.pending),
                   "pushes": w.stats.pushes_received, "http": len(w.http_conns)})

    def handle_events(self, events: int) -> None:
        message = receive_from_master(self.sock, f"worker {self.worker.index}")
        if message is None:
            return
        kind = message.get("type")
        if kind == "info":
            self.worker.master_info = message
            if message.get("workers_up") == message.get("workers") and not self.worker.draining:
                self.worker.start_accepting()
        elif kind == "admin":
            for command in message.get("commands") or []:
                try:  # replayable: a worker that already has it is unchanged
                    self.worker.admin.apply(command)
                except AdminError as exc:
                    log.error("admin change from the master refused: %s", exc)

    def close(self, reason: str = "") -> None:
        self.worker.loop.remove(self.fd)
        self.sock.close()


def run_worker(config: ServeConfig, index: int, count: int, node: int, control: socket.socket,
               pending: dict[bytes, Push], part_path: str, admin: AdminState | None = None) -> int:
    """The worker process's main, called right after fork. Returns the exit code."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)  # the master decides; Ctrl-C reaches it alone
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    worker_class: type[NodeWorker] = NodeWorker
    if config.redis_url:  # imported only in Redis mode: a single node needs no Redis
        from rawsse.cluster.routing import ClusterWorker

        worker_class = ClusterWorker
    try:
        worker = worker_class(config, index, count, node, control, pending, part_path, admin)
        worker.mesh.listen()
        # Accept only once every worker serves (the master's info says so): a push or a device
        # that lands here while the owner of its token is still booting would get a 503.
        worker.listen(accept=False)
    except OSError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        return BOOT_ERROR
    terms: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    signal.set_wakeup_fd(worker.loop.wakeup_fd(), warn_on_full_buffer=False)

    def on_wakeup() -> None:
        while terms:
            terms.pop()
            worker.drain()

    worker.loop.on_wakeup = on_wakeup
    worker.start()
    worker.control.send({"type": "ready", "capacity": worker.capacity, "max_fds": worker.max_fds})
    worker.loop.run()
    return 0

