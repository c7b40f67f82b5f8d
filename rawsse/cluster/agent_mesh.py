"""The Redis agent's end of the node mesh, on asyncio: the same sockets and framing as ``mesh.py``.

The agent is mesh peer number ``workers``: it listens on ``mesh.address(node, workers)`` and
workers connect to it the first time they have a record for it; it connects to each worker's own
address to send (one outbound link per worker, as between workers). Records to one worker that
pile up during a loop turn leave as one ``send`` (split at ``mesh.MAX_MESSAGE``), so a burst of
routed pushes costs the worker one wakeup, not one per push.

A record that cannot reach its worker (the worker is being respawned, its link broke) is handed
to ``undeliverable(worker, kind, body)``: the agent puts a routed push back into Redis rather
than lose it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Iterator

from rawsse.node.mesh import _HEADER, _SENDER, MAX_MESSAGE, RECV_SIZE, address

log = logging.getLogger(__name__)

MAX_BACKLOG = 64 * 1024 * 1024  # bytes a worker has not taken yet before its link is cut


def iter_records(data: bytes) -> Iterator[tuple[int, memoryview]]:
    """(kind, body) of every record in one mesh message (after its sender index)."""
    view = memoryview(data)
    offset = _SENDER.size
    while offset < len(data):
        kind, length = _HEADER.unpack_from(view, offset)
        offset += _HEADER.size
        yield kind, view[offset:offset + length]
        offset += length


class WorkerLink:
    """The agent's outbound connection to one worker, with what the kernel has not taken."""

    def __init__(self, mesh: "AgentMesh", worker: int) -> None:
        self.mesh = mesh
        self.worker = worker
        self.sock: socket.socket | None = None
        self.backlog: list[bytes] = []
        self.backlog_bytes = 0

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
        self.sock = sock
        return True

    def send(self, message: bytes) -> bool:
        """Queue one message; False if the worker cannot be reached (the caller recovers)."""
        if not self.connect():
            return False
        if self.backlog:
            return self._queue(message)
        try:
            self.sock.send(message)  # type: ignore[union-attr]
        except BlockingIOError:
            self._queue(message)
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._drain)  # type: ignore[union-attr]
        except OSError:
            self.close()
            return False
        return True

    def _queue(self, message: bytes) -> bool:
        if self.backlog_bytes + len(message) > MAX_BACKLOG:
            log.error("worker %d is not reading its mesh link: cutting it", self.worker)
            self.close()
            return False
        self.backlog.append(message)
        self.backlog_bytes += len(message)
        return True

    def _drain(self) -> None:
        while self.backlog and self.sock is not None:
            try:
                self.sock.send(self.backlog[0])
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self.backlog_bytes -= len(self.backlog.pop(0))
        if self.sock is not None:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        except RuntimeError:
            pass
        self.sock.close()
        self.sock = None
        lost, self.backlog, self.backlog_bytes = self.backlog, [], 0
        for message in lost:
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
        self.batches: dict[int, list[bytes]] = {}
        self.flush_scheduled = False
        self.inbound = 0  # workers' links to us now open
        self._sender = _SENDER.pack(workers)
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
                (sender,) = _SENDER.unpack_from(data)
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
        self.batches.setdefault(worker, []).append(_HEADER.pack(kind, len(body)) + body)
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
            for message in self._messages(records):
                if not link.send(message):
                    for kind, body in iter_records(message):
                        self.undeliverable(worker, kind, bytes(body))

    def _messages(self, records: list[bytes]) -> Iterator[bytes]:
        parts, size = [self._sender], len(self._sender)
        for record in records:
            if len(parts) > 1 and size + len(record) > MAX_MESSAGE:
                yield b"".join(parts)
                parts, size = [self._sender], len(self._sender)
            parts.append(record)
            size += len(record)
        yield b"".join(parts)

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.listener.close()
