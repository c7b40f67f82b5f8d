"""The master of a node: spawns, watches, reaps and respawns workers; never touches a client.

Theory of operation (the model is gunicorn's arbiter: benoitc/gunicorn ``gunicorn/arbiter.py``)
-----------------------------------------------------------------------------------------------
The master forks ``N`` workers. Each binds the listen port itself with ``SO_REUSEPORT`` and owns
token shard ``index`` (``routing.owner_of``). The master keeps one ``SOCK_SEQPACKET`` socketpair
per worker (``WorkerHandle``): a worker reports ``ready`` once and a heartbeat every tick; the master
sends node facts (workers up, restarts, losses) for ``/stats``, in order through a ``SendQueue``.

Rules
-----
- Signal handlers only queue the signal; the loop handles it after its wakeup fd fires
  (``handle_<signame>``), so nothing non-reentrant runs in a handler (benoitc/gunicorn issue
  #3198, "Logging in signal handlers may be unsafe").
- A worker that dies is respawned into the same shard. What it held is counted from its last
  heartbeat (streams whose devices will reconnect, pending pushes lost), never silent. Repeated
  deaths back off (1 s doubling to 30 s) so a crash loop cannot hammer the devices.
- A worker that exits with ``BOOT_ERROR`` before it ever served stops the master (exit 3) instead
  of fork-looping on a port that cannot be bound.
- A worker whose heartbeat stops for ``HEARTBEAT_TIMEOUT`` is killed and respawned; the systemd
  watchdog is pinged only while every worker beats, so a wedged node is caught.
- TERM/INT: graceful drain (each worker stops accepting, answers in-flight pushes, closes its
  streams over ``--drain-seconds`` and saves its pending pushes); the master merges them into
  ``--state-file``, which the next start loads and shards again. A second TERM/INT cuts the drain.
  A save that fails is logged once and the master exits 1 (never a retry loop that ignores TERM).
- HUP: rolling restart, one worker at a time: the next is stopped only once the previous one's
  replacement serves, so at most one shard is ever down; the old worker's pending pushes pass to
  its replacement (its part file). While it drains, devices of its shard handed over by peers get
  503 and reconnect (``Worker.adopt_stream``); pushes for them are kept and passed on.
- kill -9 of the master: the workers save their parts and exit (``process.py``); the next start
  with the same ``--state-file`` merges those parts into it before loading it.
- Without ``--state-file`` the parts go through a private directory (``mkdtemp``: 0700, files
  0600), removed at stop: payloads are never in a predictable world-readable path.
- Admin changes made at run time (token states, fault rules) reach the master too (``admin``
  messages, in replayable form): it keeps the node's ``AdminState``, forks every new worker with
  it, and hands each change to the other workers (one still booting missed the mesh share).
- TTIN/TTOU (add/remove a worker) are refused: the worker count is the shard modulus, so
  changing it would move almost every token to another worker while its stream and pending push
  stay behind. Restart with ``--workers N`` instead.
- Redis mode (``--redis``): one more child, the node's Redis agent (``cluster/agent.py``), is
  spawned first, watched and respawned like a worker (its death loses no stream: the workers keep
  theirs and re-claim them when the new agent is up). On stop it is signalled with the workers and
  leaves after them, because their draining streams still hand pushes back to Redis through it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any, Callable

from rawsse import __version__
from rawsse.h2 import huffman
from rawsse.node import statefile
from rawsse.node.balance import SenderBoard
from rawsse.apns.admin import AdminError, AdminState
from rawsse.node.process import BOOT_ERROR, NodeProcess, run_worker
from rawsse.config import ConfigError, ServeConfig
from rawsse.server.loop import READ_EVENTS, Loop
from rawsse.node.routing import owner_of
from rawsse.node.handle import WorkerHandle
from rawsse.apns.registry import Push
from rawsse.node.systemd import Notifier
from rawsse.limits import raise_nofile_limit
from rawsse.server.tls import server_context
from rawsse.server.worker import FD_RESERVE

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT = 30.0
STATUS_SECONDS = 5.0
STOP_GRACE_SECONDS = 15.0
# Anonymous PSS of one more idle worker, measured with ``python bench/workers.py`` (idle anon PSS
# of the node at 16 workers against 1, divided by 15; bench/README.md).
IDLE_WORKER_MB = 7


def workers_needed(max_connections: int, fd_limit: int) -> int:
    """Workers so that each holds its share of ``max_connections`` under its open-file limit."""
    per_worker = max(1, fd_limit - FD_RESERVE)
    return max(os.cpu_count() or 1, math.ceil(max_connections / per_worker))


class Arbiter:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.fd_limit = raise_nofile_limit()
        self.count = config.workers or workers_needed(config.max_connections, self.fd_limit)
        self.loop = Loop()
        self.notifier = Notifier()
        self.handles = [WorkerHandle(self, i) for i in range(self.count)]
        self.admin = AdminState(config.faults)  # the node's run-time admin state (see above)
        # Each worker's push sender connections, in memory every worker maps (balance.py)
        self.senders = SenderBoard(self.count) if config.balance_senders and self.count > 1 \
            else None
        # Redis mode: the node's Redis agent, mesh peer number ``count``
        self.agent = WorkerHandle(self, self.count) if config.redis_url else None
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.announced_ready = False
        self.worker_restarts = 0
        self.lost_streams = 0
        self.lost_pending = 0
        self.rolling: list[int] = []
        self.restarting_now: WorkerHandle | None = None  # the rolling restart's current slot
        self.restart_deadline = 0.0  # by then its old worker has drained, or is killed
        self.last_pushes = 0
        self.last_status = time.monotonic()
        self.last_watchdog = 0.0
        self.reloading = False
        # Names the mesh sockets of this node's workers; fixed before any fork (a worker's own
        # getpid() would differ).
        self.node_id = os.getpid()
        self.part_dir = os.path.dirname(os.path.abspath(config.state_file)) if config.state_file \
            else tempfile.mkdtemp(prefix="rawsse-")  # 0700: only this user reads the parts

    # -- start --------------------------------------------------------------------------------

    def run(self) -> int:
        self._warn_if_capacity_short()
        huffman.prepare()  # built once here, shared by every worker forked below
        pending = self._load_state()
        shards: list[dict[bytes, Push]] = [{} for _ in range(self.count)]
        for token, push in pending.items():
            shards[owner_of(token, self.count)][token] = push
        self._install_signals()
        if self.agent is not None:  # first, so the workers find it listening
            self.spawn(self.agent, {})
        for handle in self.handles:
            self.spawn(handle, shards[handle.index])
        del pending, shards
        self._log_start()
        self.loop.call_later(1.0, self._tick)
        try:
            self.loop.run()
        finally:
            signal.set_wakeup_fd(-1)
            self._remove_private_dir()
        log.info("stopped (exit code %d)", self.exit_code)
        return self.exit_code

    def _log_start(self) -> None:
        """What an operator checks after a start, in two lines: where it listens, what it does
        to pushes."""
        c = self.config
        operator = "%s:%d" % c.admin_listen if c.admin_listen else "on --listen"
        log.info("rawsse %s master %d: %d workers on %s:%d, operator routes %s, state file %s",
                 __version__, os.getpid(), self.count, *c.listen, operator,
                 c.state_file or "none")
        if not c.workers:
            self._log_worker_count()
        if self.count > 1:
            log.info("push senders' connections (plain HTTP/1.1 and h2c, not TLS): %s",
                     "each handed after its first read to the worker holding the fewest "
                     "(--balance-senders on)" if self.senders else "left where the kernel's "
                     "SO_REUSEPORT hash put them (--balance-senders off)")
        faults = ", ".join(rule.describe() for rule in c.faults) or "none"
        log.info("delivery delay %s, response delay %s, faults %s, max pending %d / %d bytes "
                 "per worker", c.delivery_delay.describe(), c.response_delay.describe(), faults,
                 c.max_pending, c.max_pending_bytes)

    def _log_worker_count(self) -> None:
        """Why ``--workers auto`` chose this many: an operator sees the cost before paying it."""
        c = self.config
        per_worker = max(1, self.fd_limit - FD_RESERVE)
        log.info("%d workers (--workers auto): %d to hold --max-connections %d at %d each under "
                 "the open-file limit %d, at least one per CPU (%d); each idle worker costs "
                 "~%d MB and pushes for a token another worker owns are forwarded to it: with "
                 "fewer connections to hold, a lower --max-connections or --workers N saves "
                 "both", self.count, math.ceil(c.max_connections / per_worker), c.max_connections,
                 per_worker, self.fd_limit, os.cpu_count() or 1, IDLE_WORKER_MB)

    def _remove_private_dir(self) -> None:
        if not self.config.state_file:
            shutil.rmtree(self.part_dir, ignore_errors=True)

    def _warn_if_capacity_short(self) -> None:
        per_worker = self.fd_limit - FD_RESERVE
        capacity = per_worker * self.count
        if capacity < self.config.max_connections:
            log.warning("capacity %d connections (%d workers x %d fds) is below --max-connections "
                        "%d: raise the open-file limit (LimitNOFILE) or use --workers %d",
                        capacity, self.count, per_worker, self.config.max_connections,
                        workers_needed(self.config.max_connections, self.fd_limit))

    def _load_state(self) -> dict[bytes, Push]:
        path = self.config.state_file
        if not path:
            return {}
        try:
            pending = statefile.load(path)
        except statefile.StateFileError as exc:
            log.error("%s; starting without it", exc)
            pending = {}
        try:  # after a kill -9 of the master, its workers' parts (process.py)
            recovered = statefile.merge_leftover_parts(self.part_dir, path, pending)
        except (statefile.StateFileError, OSError) as exc:
            log.error("pending pushes left by a stopped master not merged: %s", exc)
            recovered = 0
        if recovered:
            log.warning("recovered %d pending pushes saved by the workers of a stopped master",
                        recovered)
        log.info("loaded %d pending pushes from %s", len(pending), path)
        return pending

    def processes(self) -> list[WorkerHandle]:
        """Every child: the workers and, in Redis mode, the agent."""
        return self.handles if self.agent is None else [*self.handles, self.agent]

    def part_path(self, index: int) -> str:
        return statefile.part_path(self.part_dir, self.config.state_file or "rawsse.state", index)

    def spawn(self, handle: WorkerHandle, pending: dict[bytes, Push]) -> None:
        master_side, worker_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                master_side.close()
                self._forget_master_fds()
                if handle is self.agent:
                    from rawsse.cluster.agent import run_agent

                    code = run_agent(self.config, self.node_id, self.count, worker_side)
                else:
                    code = run_worker(self.config, handle.index, self.count, self.node_id,
                                      worker_side, pending, self.part_path(handle.index),
                                      self.admin, self._topology(), self.senders)
            except BaseException:
                logging.getLogger(__name__).exception("worker %d crashed", handle.index)
            finally:
                os._exit(code)
        worker_side.close()
        master_side.setblocking(False)
        handle.attach(pid, master_side)
        self.loop.add(handle.fd, handle, READ_EVENTS)

    def _topology(self) -> Callable[[NodeProcess], Any] | None:
        """What a worker adds to the node's parts: Redis mode's cluster parts, or nothing (a
        single node never imports the cluster, nor Redis)."""
        if not self.config.redis_url:
            return None
        from rawsse.cluster.routing import join_cluster

        return join_cluster

    def _forget_master_fds(self) -> None:
        """In a new worker: drop the master's loop and the other workers' control sockets."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for other in self.processes():
            if other.sock is not None:
                other.sock.close()
        self.loop.close()
        self.notifier.close()

    # -- messages from workers ----------------------------------------------------------------

    def on_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        handle.last_beat = time.monotonic()
        kind = message.get("type")
        if kind == "ready":
            handle.ready = True
            if handle is self.restarting_now:  # a replacement serves: the next slot, now
                self._restart_next()
            self._broadcast_info()
            self._maybe_ready()
        elif kind == "beat":
            handle.beat = message
        elif kind == "admin":
            self.on_admin(handle, message.get("commands") or [])

    def on_admin(self, origin: WorkerHandle, commands: list[Any]) -> None:
        """Keep admin changes (replayable, ``admin.py``) from a worker, or from other nodes
        through the Redis agent, and hand them to every other worker; a worker's go to the
        agent too, which stores and publishes them for the cluster."""
        kept = []
        for command in commands:
            try:
                self.admin.apply(command)
            except AdminError as exc:
                log.error("admin change from %s refused: %s", self._name(origin), exc)
                continue
            kept.append(command)
        if not kept:
            return
        message = {"type": "admin", "commands": kept}
        for handle in self.handles:
            if handle is not origin:
                handle.send(message)
        if self.agent is not None and origin is not self.agent:
            self.agent.send(message)

    def _name(self, handle: WorkerHandle) -> str:
        return "the Redis agent" if handle is self.agent else f"worker {handle.index}"

    def _maybe_ready(self) -> None:
        if all(h.ready for h in self.processes()):
            if not self.announced_ready:
                self.announced_ready = True
                log.info("all %d workers serving", self.count)
                self.notifier.ready(self.status_line())
            elif not self.rolling and self.restarting_now is None and self.reloading:
                self.reloading = False
                self.notifier.ready(self.status_line())
                log.info("rolling restart finished")

    def info(self) -> dict[str, Any]:
        return {"type": "info", "workers": self.count,
                "workers_up": sum(1 for h in self.handles if h.ready),
                "worker_restarts": self.worker_restarts, "lost_streams": self.lost_streams,
                "lost_pending": self.lost_pending, "master_pid": os.getpid()}

    def _broadcast_info(self) -> None:
        message = self.info()
        for handle in self.handles:
            handle.send(message)

    def status_line(self) -> str:
        streams = sum(h.beat.get("streams", 0) for h in self.handles)
        pushes = sum(h.beat.get("pushes", 0) for h in self.handles)
        now = time.monotonic()
        rate = (pushes - self.last_pushes) / max(1e-3, now - self.last_status)
        self.last_pushes, self.last_status = pushes, now
        up = sum(1 for h in self.handles if h.ready)
        return f"{streams} streams, {up}/{self.count} workers, {rate:.0f} pushes/s"

    # -- periodic -----------------------------------------------------------------------------

    def _tick(self) -> None:
        self.loop.call_later(1.0, self._tick)
        now = time.monotonic()
        self._reap()
        if self.stopping:
            self._tick_stopping(now)
            return
        for handle in self.processes():
            if handle.pid and handle.ready and now - handle.last_beat > HEARTBEAT_TIMEOUT:
                log.error("worker %d (pid %d) missed heartbeats for %.0fs: killing it",
                          handle.index, handle.pid, now - handle.last_beat)
                self._kill(handle.pid, signal.SIGKILL)
        if now - self.last_status >= STATUS_SECONDS:
            self.notifier.status(self.status_line())
        self._watchdog(now)

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        beating = all(h.pid and now - h.last_beat < 2 * interval for h in self.processes())
        if beating and now - self.last_watchdog >= interval:
            self.last_watchdog = now
            self.notifier.watchdog()

    def _tick_stopping(self, now: float) -> None:
        alive = [h for h in self.processes() if h.pid]
        if not alive:
            self._finish_stop()
            return
        remaining = self.stop_deadline - now
        self.notifier.extend_timeout(max(5.0, remaining + 5.0))
        if remaining <= 0:
            for handle in alive:
                log.error("worker %d did not drain in time: killing it", handle.index)
                self._kill(handle.pid, signal.SIGKILL)

    # -- children -----------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = next((h for h in self.processes() if h.pid == pid), None)
            if handle is not None:
                self._on_exit(handle, os.waitstatus_to_exitcode(status))

    def _on_exit(self, handle: WorkerHandle, code: int) -> None:
        was_ready = handle.ready
        handle.pid = 0
        handle.ready = False
        handle.close_socket()
        if self.senders is not None and handle is not self.agent:
            self.senders.clear(handle.index)  # no sibling hands it a connection now
        self._broadcast_info()
        if self.stopping:
            log.info("%s exited (%d)", self._name(handle), code)
            if not any(h.pid for h in self.processes()):
                self._finish_stop()
            return
        if handle is self.agent:
            self._on_agent_exit(handle, code)
            return
        if handle.restarting:
            handle.restarting = False
            log.debug("worker %d (old pid) exited (%d); starting its replacement", handle.index, code)
            self._respawn(handle, self._take_part(handle.index))
            return
        if code == BOOT_ERROR and not was_ready:
            log.error("worker %d failed to boot: stopping the node", handle.index)
            self.exit_code = BOOT_ERROR
            self.begin_stop(drain=False)
            return
        streams, pending = handle.beat.get("streams", 0), handle.beat.get("pending", 0)
        self.worker_restarts += 1
        self.lost_streams += streams
        self.lost_pending += pending
        log.error("worker %d (shard %d) died with exit code %d holding ~%d streams and ~%d "
                  "pending pushes; respawning", handle.index, handle.index, code, streams, pending)
        self.loop.call_later(handle.record_death(time.monotonic()), self._respawn, handle, {})

    def _on_agent_exit(self, handle: WorkerHandle, code: int) -> None:
        """The Redis agent died: respawn it (backing off like a worker). Streams stay with the
        workers; pushes needing Redis get 503 meanwhile; the new agent has them re-claimed."""
        delay = handle.record_death(time.monotonic())
        log.error("redis agent died with exit code %d; respawning in %.0fs", code, delay)
        self.loop.call_later(delay, self._respawn, handle, {})

    def _respawn(self, handle: WorkerHandle, pending: dict[bytes, Push]) -> None:
        if not self.stopping and not handle.pid:
            self.spawn(handle, pending)
            self._broadcast_info()

    def _take_part(self, index: int) -> dict[bytes, Push]:
        path = self.part_path(index)
        try:
            pending = statefile.load(path)
            os.unlink(path)
        except (statefile.StateFileError, OSError) as exc:
            log.error("worker %d's pending pushes could not be passed on: %s", index, exc)
            return {}
        return pending

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    # -- signals ------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.loop.wakeup_fd(), warn_on_full_buffer=False)
        self.loop.on_wakeup = self._on_wakeup
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                    signal.SIGCHLD):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def _on_wakeup(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name.lower()
            getattr(self, f"handle_{name}")()

    def handle_sigchld(self) -> None:
        self._reap()

    def handle_sigterm(self) -> None:
        if self.stopping:
            log.info("second stop signal: cutting the drain short")
            for handle in self.processes():
                if handle.pid:
                    self._kill(handle.pid, signal.SIGTERM)
            return
        self.begin_stop(drain=True)

    handle_sigint = handle_sigterm

    def handle_sighup(self) -> None:
        if self.stopping or self.rolling:
            return
        refusal = self._tls_refusal()
        if refusal:
            log.error("SIGHUP refused, workers keep serving the certificate they loaded: %s",
                      refusal)
            return
        log.info("SIGHUP: rolling restart of %d workers", self.count)
        self.notifier.reloading()
        self.reloading = True
        self.rolling = list(range(self.count))
        self._restart_next()

    def _tls_refusal(self) -> str:
        """Why the TLS files on disk cannot serve, or "" (also when there is no --tls-listen).
        Each new worker of a rolling restart loads --tls-cert/--tls-key anew, which is how a
        renewed certificate is taken without a stop; checked here first, as at start, so a
        bad pair refuses the reload instead of crash-looping every worker it replaces."""
        config = self.config
        if not config.tls_listen:
            return ""
        try:
            server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        except ConfigError as exc:
            return str(exc)
        return ""

    def handle_sigttin(self) -> None:
        log.warning("SIGTTIN ignored: the worker count is the token shard modulus; "
                    "restart with --workers N to change it")

    handle_sigttou = handle_sigttin

    def _restart_next(self) -> None:
        """One step of a rolling restart: nothing until the slot being restarted has its
        replacement serving (its old worker exited and the new one said ready), then the next
        slot. Stopping two at once would leave two shards without an owner."""
        if self.stopping:
            return
        current = self.restarting_now
        if current is not None:
            if current.restarting and current.pid and time.monotonic() > self.restart_deadline:
                log.error("worker %d did not drain in time: killing it (~%d pending pushes "
                          "lost)", current.index, current.beat.get("pending", 0))
                self.lost_pending += current.beat.get("pending", 0)
                self._kill(current.pid, signal.SIGKILL)
                self.restart_deadline = math.inf  # once
            if current.restarting or not current.ready:
                self.loop.call_later(0.1, self._restart_next)
                return
            self.restarting_now = None
            log.info("worker %d replaced (pid %d)", current.index, current.pid)
        if not self.rolling:
            self._maybe_ready()
            return
        handle = self.handles[self.rolling[0]]
        if not handle.ready:  # crashed and respawning on its own: wait for it too
            self.loop.call_later(0.1, self._restart_next)
            return
        self.rolling.pop(0)
        handle.restarting = True
        self.restarting_now = handle
        self.restart_deadline = time.monotonic() + self.config.drain_seconds + STOP_GRACE_SECONDS
        self._kill(handle.pid, signal.SIGTERM)
        self.loop.call_later(0.1, self._restart_next)

    # -- stopping -----------------------------------------------------------------------------

    def begin_stop(self, drain: bool) -> None:
        self.stopping = True
        self.rolling = []
        self.restarting_now = None
        self.stop_deadline = time.monotonic() + (self.config.drain_seconds if drain else 0) \
            + STOP_GRACE_SECONDS
        self.notifier.stopping(f"draining {sum(h.beat.get('streams', 0) for h in self.handles)} streams")
        self.notifier.extend_timeout(self.config.drain_seconds + STOP_GRACE_SECONDS)
        log.info("stopping: draining workers over %.0fs", self.config.drain_seconds)
        for handle in self.processes():
            if handle.pid:
                self._kill(handle.pid, signal.SIGTERM)
        if not any(h.pid for h in self.processes()):
            self._finish_stop()

    def _finish_stop(self) -> None:
        if not self.loop.running:
            return
        merged: dict[bytes, Push] = {}
        for handle in self.handles:
            merged.update(self._take_part(handle.index) if os.path.exists(self.part_path(handle.index))
                          else {})
        self.loop.stop()  # whatever happens below: a failed save is not retried
        if self.config.state_file:
            try:
                saved = statefile.save(self.config.state_file, merged.items())
            except OSError as exc:
                log.error("%d pending pushes could not be saved to --state-file %s: %s",
                          len(merged), self.config.state_file, exc.strerror or exc)
                self.exit_code = 1
                return
            log.info("saved %d pending pushes to %s", saved, self.config.state_file)
        elif merged:
            log.warning("%d pending pushes dropped at stop: no --state-file", len(merged))


