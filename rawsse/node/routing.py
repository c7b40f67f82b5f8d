"""The router of a prefork worker: its own token shard here, every other shard through the mesh.

Each worker owns a hash shard of tokens (``owner_of``: CRC-32 of the raw token, modulo the
worker count), stable across processes and restarts. The kernel's SO_REUSEPORT hash decides
which worker accepts a connection, so a push or a device can land anywhere; this router sends
it to the owner: a push goes through ``Mesh.submit_plain``, which computes its owner once and
hands it to this worker's owner or forwards it, answered once the owner holds it; a device's
socket is handed over (``Mesh.hand_off``). What the owner then does with a push is its
``Owner``'s business (``rawsse.apns.routing``): the same router serves a node of a Redis
cluster with a cluster owner.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import orjson

from rawsse.apns.routing import BroadcastAnswer, Owner, PlainSubmit, owner_of, tally
from rawsse.node.wire import DELIVERIES, STATS
from rawsse.server.documents import node_document

if TYPE_CHECKING:
    from rawsse.node.mesh import Mesh
    from rawsse.server.worker import Worker

Document = dict[str, Any]


class MeshRouter:
    """Routes between the workers of one node."""

    def __init__(self, worker: "Worker", mesh: "Mesh", owner: Owner,
                 share_with_master: Callable[[Document], None]) -> None:
        self.worker = worker
        self.mesh = mesh
        self.index, self.count, self.stats = worker.index, worker.count, worker.stats
        # ``Router.submit_plain``: a worker with no peer owns every token, and the count never
        # changes while the node runs (the master refuses TTIN/TTOU; a respawn keeps it): its
        # pushes go straight to the owner, no routing call (the ``owner`` setter binds it).
        self.submit_plain: PlainSubmit = mesh.submit_plain
        self.owner = owner
        self.share_with_master = share_with_master
        self.master_info: Document = {}  # the master's last word on the node, for /stats
        # The last step of /stats: the node document as is, or (Redis mode) with the cluster.
        self.finish_document: Callable[[Document, Callable[[Document], None]], None] = \
            _as_is
        # Where a broadcast goes: this node's workers, or (Redis mode) every node's.
        self.broadcast_to: Callable[[bytes, str, BroadcastAnswer], None] = self.node_broadcast
        # The last step of a deliveries query: this node's answers as they are, or (Redis mode)
        # with the other nodes' (``rawsse.cluster.routing``).
        self.finish_deliveries: Callable[[Document, Document, Callable[[Document], None]],
                                         None] = _found_as_is
        mesh.serve(DELIVERIES, lambda query: orjson.dumps(
            worker.deliveries_answer(orjson.loads(query))))

    @property
    def owner(self) -> Owner:
        """What this worker does with a push for its own shard (a cluster sets its own): set
        here, it holds in the mesh too."""
        return self._owner

    @owner.setter
    def owner(self, owner: Owner) -> None:
        self._owner = owner
        self.mesh.owner = owner
        self.submit_plain = owner.take_plain if self.count == 1 else self.mesh.submit_plain

    def place_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        worker = self.worker
        owner = owner_of(token, worker.count)
        if owner == worker.index:
            worker.open_stream(fd, token, leftover, events)
            return
        worker.loop.remove(fd)
        try:
            handed = self.mesh.hand_off(owner, fd, token, leftover)
        except Exception:
            os.close(fd)  # out of the loop and with no new owner: nobody else would close it
            raise
        if handed:
            worker.stats.handoffs += 1
            return
        # The owner is down (being respawned): the device is told to come back later.
        worker.stats.handoff_failures += 1
        worker.refuse_device(fd, leftover)

    def broadcast(self, frame: bytes, prefix: str, done: BroadcastAnswer) -> None:
        self.broadcast_to(frame, prefix, done)

    def node_broadcast(self, frame: bytes, prefix: str, done: BroadcastAnswer) -> None:
        """Every worker of this node writes ``frame`` to its streams."""
        self.mesh.broadcast(frame, prefix, lambda written, refused, missing: done(
            tally(written, refused, missing)))

    def node_stats(self, done: Callable[[Document], None]) -> None:
        """``done(document)`` for this node: every worker's snapshot and the master's facts."""
        own = self.worker.snapshot()

        def finish(replies: list[Any]) -> None:
            workers = sorted([own, *replies], key=lambda doc: doc["worker"])
            done(node_document(workers, self.master_info))

        self.mesh.collect(STATS, b"", finish)

    def collect_stats(self, done: Callable[[Document], None]) -> None:
        self.node_stats(lambda doc: self.finish_document(doc, done))

    def node_deliveries(self, query: Document, done: Callable[[list[Document]], None]) -> None:
        """Every worker's answer to a deliveries query (``deliverylog.worker_answer``); a
        worker that does not answer within the mesh's request timeout is left out."""
        own = self.worker.deliveries_answer(query)
        self.mesh.collect(DELIVERIES, orjson.dumps(query),
                          lambda replies: done([own, *replies]))

    def find_deliveries(self, query: Document, done: Callable[[Document], None]) -> None:
        self.node_deliveries(query, lambda answers: self.finish_deliveries(
            query, {"answers": answers, "late": []}, done))

    def share_admin(self, command: Document, done: Callable[[], None]) -> None:
        """The running workers get it through the mesh before the answer (so it holds for the
        very next push wherever it lands); the master gets it too, keeps the node's state for
        workers it spawns later and hands it to any worker still booting."""
        self.share_with_master(command)
        self.mesh.share(command, lambda replies: done())


def _as_is(doc: Document, done: Callable[[Document], None]) -> None:
    done(doc)


def _found_as_is(query: Document, found: Document, done: Callable[[Document], None]) -> None:
    done(found)
