"""A worker process of a prefork node: its worker, mesh and master link, put together after fork.

``NodeProcess`` composes a ``Worker`` (rawsse/server/worker.py) with the node's parts: the mesh to
the other workers, a ``MeshRouter`` (routing.py), the control link to the master, the drain. In
Redis mode the master hands ``run_worker`` the cluster's ``join_cluster``, which adds its parts
on top by composition too: no worker subclass, and this module never imports the cluster.

Exit codes are the API with the master (gunicorn's convention, benoitc/gunicorn
gunicorn/arbiter.py): 0 after a drain, ``BOOT_ERROR`` when the worker could not start serving
(the master then stops instead of fork-looping), ``SAVE_FAILED`` when its pending pushes could not
be written, ``ORPHANED`` after its master went away.

A worker whose master is killed (``kill -9``: its control socket reads EOF) is an orphan nobody
will reap, respawn or merge: it stops accepting, closes its streams at once (their unsent pushes
become pending), delivers or keeps its delayed pushes, and with ``--state-file`` saves what it
holds to its part file beside the state file (``.<name>.worker<i>``) before it exits. The next
``rawsse serve`` with that ``--state-file`` merges those parts into the state file at start
(``Arbiter._load_state``) and shards them again. Without ``--state-file`` there is nowhere that
outlives the node, so the loss is logged with its count.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any, Callable

import orjson

from rawsse.apns.admin import AdminError, AdminState
from rawsse.apns.registry import Push
from rawsse.apns.routing import LocalOwner
from rawsse.config import ServeConfig
from rawsse.node import statefile
from rawsse.node.balance import Balancer, SenderBoard
from rawsse.node.control import receive_from_master
from rawsse.node.drain import Drainer
from rawsse.node.mesh import Mesh
from rawsse.node.routing import MeshRouter
from rawsse.server.loop import READ_EVENTS
from rawsse.server.worker import Worker

log = logging.getLogger(__name__)

BOOT_ERROR = 3
SAVE_FAILED = 4
ORPHANED = 5
PEERS_GATE = "peers"  # accept only once every worker of the node serves


class NodeProcess:
    """One worker of a prefork node: owns a token shard, reaches the others through the mesh."""

    def __init__(self, config: ServeConfig, index: int, count: int, node: int,
                 control: socket.socket, pending: dict[bytes, Push], part_path: str,
                 admin: AdminState | None = None, board: SenderBoard | None = None) -> None:
        self.worker = worker = Worker(config, index, count, pending, admin)
        self.mesh = Mesh(worker, node)
        self.control = ControlLink(self, control)
        self.router = MeshRouter(worker, self.mesh, LocalOwner(worker.delivery),
                                 self.control.share_admin)
        worker.router = self.router
        # Push senders' connections spread over the workers (--balance-senders; balance.py)
        self.balancer = Balancer(worker, self.mesh, board) if board is not None else None
        worker.tick_hooks.append(self._tick)
        # Accept only once every worker serves (the master's info says so): a push or a device
        # that lands here while the owner of its token is still booting would get a 503.
        worker.hold(PEERS_GATE)
        self.part_path = part_path
        self.drainer: Drainer | None = None
        # The last step of a drain before the state is saved (Redis mode waits for the agent).
        self.finish_drain: Callable[[Callable[[], None]], None] = _now
        self.exit_code = 0

    def _tick(self) -> None:
        self.mesh.expire_waiting(self.worker.loop.now)
        self.mesh.resend_kept()
        self.control.beat()

    def drain(self) -> None:
        if self.balancer is not None:
            self.balancer.leave()
        if self.drainer is None:
            self.drainer = Drainer(self.worker, self.worker.config.drain_seconds, self._drained)
        else:  # a second TERM: no more waiting
            self.drainer.finish_now()

    def orphaned(self) -> None:
        """The master is gone: save what this worker holds, then exit (module docstring)."""
        worker = self.worker
        self.control.close()
        self.exit_code = ORPHANED
        log.error("worker %d: master went away; stopping now and keeping its pushes",
                  worker.index)
        if self.drainer is None:
            self.drainer = Drainer(worker, 0.0, self._drained)
        self.drainer.finish_now()

    def _drained(self) -> None:
        self.finish_drain(self._save_and_stop)

    def _save_and_stop(self) -> None:
        worker = self.worker
        self.mesh.settle()  # the TAKENs not read yet, and a last try for a dead owner
        kept = self.mesh.kept()
        if kept:  # their owner died and no replacement listened before this stop
            log.error("worker %d: %d forwarded pushes answered 200 never reached their owner "
                      "and are lost", worker.index, kept)
        items = worker.pending_items()
        if self.exit_code == ORPHANED and not worker.config.state_file:
            if items:
                log.error("worker %d: %d pending pushes lost: no --state-file to keep them in",
                          worker.index, len(items))
            worker.loop.stop()
            return
        try:
            saved = statefile.save(self.part_path, items)
        except OSError as exc:
            log.error("worker %d: %d pending pushes could not be saved to %s: %s",
                      worker.index, len(items), self.part_path, exc.strerror or exc)
            self.exit_code = SAVE_FAILED
        else:
            log.info("worker %d drained; %d pending pushes kept in %s", worker.index, saved,
                     self.part_path)
        worker.loop.stop()


def _now(then: Callable[[], None]) -> None:
    then()


class ControlLink:
    """The worker's end of its socketpair with the master: heartbeats out, node info in."""

    __slots__ = ("process", "worker", "sock", "fd")

    def __init__(self, process: NodeProcess, sock: socket.socket) -> None:
        self.process = process
        self.worker = worker = process.worker
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        worker.loop.add(self.fd, self, READ_EVENTS)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(orjson.dumps(message))
        except (BlockingIOError, OSError):
            pass  # the master reads every beat; a lost one is covered by the next

    def share_admin(self, command: dict[str, Any]) -> None:
        self.send({"type": "admin", "commands": [command]})

    def beat(self) -> None:
        w = self.worker
        self.send({"type": "beat", "streams": len(w.registry.streams), "pending": len(w.registry.pending),
                   "pushes": w.stats.pushes_received, "http": len(w.http_conns)})

    def handle_events(self, events: int) -> None:
        message = receive_from_master(self.sock, f"worker {self.worker.index}",
                                      self.process.orphaned)
        if message is None:
            return
        kind = message.get("type")
        if kind == "info":
            self.process.router.master_info = message
            if message.get("workers_up") == message.get("workers"):
                self.worker.release(PEERS_GATE)
        elif kind == "admin":
            for command in message.get("commands") or []:
                try:  # replayable: a worker that already has it is unchanged
                    self.worker.admin.apply(command)
                except AdminError as exc:
                    log.error("admin change from the master refused: %s", exc)

    def close(self, reason: str = "") -> None:
        if self.fd >= 0:
            self.worker.loop.remove(self.fd)
            self.sock.close()
            self.fd = -1


def run_worker(config: ServeConfig, index: int, count: int, node: int, control: socket.socket,
               pending: dict[bytes, Push], part_path: str, admin: AdminState | None = None,
               join: Callable[[NodeProcess], Any] | None = None,
               board: SenderBoard | None = None) -> int:
    """The worker process's main, called right after fork; ``join`` adds a topology's parts
    (Redis mode: ``rawsse.cluster.routing.join_cluster``). Returns the exit code."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)  # the master decides; Ctrl-C reaches it alone
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        process = NodeProcess(config, index, count, node, control, pending, part_path, admin,
                              board)
        if join is not None:
            join(process)
        process.mesh.listen()
        process.worker.listen()
    except OSError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        return BOOT_ERROR
    worker = process.worker
    terms: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    signal.set_wakeup_fd(worker.loop.wakeup_fd(), warn_on_full_buffer=False)

    def on_wakeup() -> None:
        while terms:
            terms.pop()
            process.drain()

    worker.loop.on_wakeup = on_wakeup
    worker.start()
    process.control.send({"type": "ready", "capacity": worker.capacity, "max_fds": worker.max_fds})
    worker.loop.run()
    return process.exit_code

