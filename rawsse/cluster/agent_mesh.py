"""The Redis agent's end of the node mesh, on asyncio: the same sockets and framing as the workers'.

The agent is mesh peer number ``workers``: it listens on ``wire.address(node, workers)`` and
workers connect to it the first time they have a record for it; it connects to each worker's own
address to send (one outbound link per worker, as between workers). Records to one worker that
pile up during a loop turn leave as one ``send`` (split at ``wire.MAX_MESSAGE``), so a burst of
routed pushes costs the worker one wakeup, not one per push. What a worker's socket has not taken
yet waits in a ``SendQueue``, written out when asyncio reports the socket writable.

A record that cannot reach its worker (the worker is being respawned, its link broke) is handed
to ``undeliverable(worker, kind, body)``: the agent puts a routed push back into Redis rather
than lose it.

The agent reads nothing on its outbound links, so it learns that a worker died only when a send
on the link fails (``EPIPE``). By then the master may have respawned the worker (a first death
is respawned at once, in ~0.2 s): the records for the worker's shard that the dead link did not
take (``records.FOR_THE_SHARD``: a routed push, a broadcast, ...) go once more on a new link, to
the replacement, and are undeliverable only if nothing listens yet. Replies to the dead
process's requests are not resent: its request ids start again in the replacement, where one
could match another request. Without that second try, a broadcast in the second after a
respawn named the replacement missing (its streams left without the event) unless the agent's
once-a-second beacon had found the dead link first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from rawsse.cluster.records import FOR_THE_SHARD
from rawsse.node import peercred
from rawsse.node.sendqueue import SendQueue, Unsent
from rawsse.node.wire import RECV_SIZE, address, iter_records, pack_messages, record, sender_of

log = logging.getLogger(__name__)

MAX_BACKLOG = 64 * 1024 * 1024  # bytes a worker has not taken yet before its link is cut


class WorkerLink:
    """The agent's outbound connection to one worker, with what the kernel has not taken."""

    __slots__ = ("mesh", "worker", "sock", "out")

    def __init__(self, mesh: "AgentMesh", worker: int) -> None:
        self.mesh = mesh
        self.worker = worker
        self.sock: socket.socket | None = None
        self.out: SendQueue | None = None

    def connect(self) -> bool:
        if self.sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(address(self.mesh.node, self.worker))
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self.sock, self.out = sock, SendQueue(sock)
        return True

    def send(self, message: bytes) -> None:
        """Queue one message; what cannot reach the worker goes to ``undeliverable``."""
        if not self.connect() or self.out is None:
            self._undeliverable(message)
            return
        if self.out.queued + len(message) > MAX_BACKLOG:
            log.error("worker %d is not reading its mesh link: cutting it", self.worker)
            self.close()
            self._undeliverable(message)
            return
        try:
            full = self.out.send(message)
        except OSError:
            self._relink()  # this message with what waited before it
            return
        if full:
            asyncio.get_running_loop().add_writer(self.out.sock.fileno(), self._drain)

    def _drain(self) -> None:
        if self.out is None:
            return
        try:
            drained = self.out.flush()
        except OSError:
            self._relink()
            return
        if drained:
            asyncio.get_running_loop().remove_writer(self.out.sock.fileno())

    def _relink(self) -> None:
        """The link failed: its worker died. The records for its shard that the link did not
        take go on a new link, to the worker's replacement if it listens already (module
        docstring); once only: a new link that fails too hands them to ``undeliverable``, as it
        does the replies the dead worker waited for."""
        unsent = self._unlink()
        if not self.connect() or self.out is None:
            self._give_up(unsent)
            return
        kept = []
        for message, _fds in unsent:
            for kind, body in iter_records(message):
                if kind in FOR_THE_SHARD:
                    kept.append((record(kind, bytes(body)), -1))
                else:
                    self.mesh.undeliverable(self.worker, kind, bytes(body))
        for message, _fds in pack_messages(self.mesh.workers, kept):
            self.out.push(message)
        try:
            drained = self.out.flush()
        except OSError:
            self.close()
            return
        if not drained:
            asyncio.get_running_loop().add_writer(self.out.sock.fileno(), self._drain)

    def close(self) -> None:
        self._give_up(self._unlink())

    def _unlink(self) -> Unsent:
        """Close the socket; what the kernel never took, oldest first."""
        if self.sock is None or self.out is None:
            return []
        try:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        except RuntimeError:
            pass
        self.sock.close()
        unsent = self.out.close()
        self.sock = self.out = None
        return unsent

    def _give_up(self, unsent: Unsent) -> None:
        for message, _fds in unsent:
            self._undeliverable(message)

    def _undeliverable(self, message: bytes) -> None:
        for kind, body in iter_records(message):
            self.mesh.undeliverable(self.worker, kind, bytes(body))


class AgentMesh:
    """Inbound records from the workers, outbound batches to them."""

    def __init__(self, node: int, workers: int,
                 on_record: Callable[[int, int, memoryview], None],
                 undeliverable: Callable[[int, int, bytes], None]) -> None:
        self.node = node
        self.workers = workers
        self.on_record = on_record
        self.undeliverable = undeliverable
        self.links = [WorkerLink(self, i) for i in range(workers)]
        self.batches: dict[int, list[tuple[bytes, int]]] = {}
        self.flush_scheduled = False
        self.inbound = 0  # workers' links to us now open
        self._readers: set[asyncio.Task[None]] = set()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def listen(self) -> None:
        """Bind the agent's mesh address (before anything slow, so workers find it early)."""
        self.listener.bind(address(self.node, self.workers))
        self.listener.listen(128)
        self.listener.setblocking(False)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            if not peercred.admit(sock, self.node):  # only this node's workers
                continue
            sock.setblocking(False)
            task = asyncio.ensure_future(self._read(sock))
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)

    async def _read(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.inbound += 1
        try:
            while True:
                data = await loop.sock_recv(sock, RECV_SIZE)
                if not data:
                    return
                sender = sender_of(data)
                for kind, body in iter_records(data):
                    try:
                        self.on_record(sender, kind, body)
                    except Exception:
                        log.exception("agent record %d from worker %d failed", kind, sender)
        except OSError:
            return
        finally:
            self.inbound -= 1
            sock.close()

    # -- sending ------------------------------------------------------------------------------

    def send(self, worker: int, kind: int, body: bytes) -> None:
        """Queue one record for ``worker``; it leaves with this loop turn's batch."""
        self.batches.setdefault(worker, []).append((record(kind, body), -1))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def send_all(self, kind: int, body: bytes) -> None:
        for worker in range(self.workers):
            self.send(worker, kind, body)

    def flush(self) -> None:
        self.flush_scheduled = False
        batches, self.batches = self.batches, {}
        for worker, records in batches.items():
            link = self.links[worker]
            for message, _fds in pack_messages(self.workers, records):
                link.send(message)

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.listener.close()
