"""The mesh's requests to every peer at once: a broadcast (``BCAST``), ``/stats`` and the
deliveries queries (``collect``), admin commands (``share``). A part of ``Mesh`` (``mesh.py``
has the theory of operation) in a module of its own, to keep that one short: ``Mesh`` binds
these functions as its methods.

A broadcast comes after the pushes answered before it: a sender that got its 200 for a push,
then sent a broadcast, sees the push first on that device's stream, whichever workers took the
two. The forwarded push's 200 means its message is in the owner's socket queue (``mesh.py``),
and a worker writes a broadcast (its own or a peer's ``BCAST``) only at the end of a loop turn,
after reading every peer's link to the end and writing the pushes found there
(``write_broadcasts``): otherwise a ``BCAST`` read on one link overtook a push still queued on
another, or one read earlier in the same turn (an owner writes a peer's pushes in the turn's
flush, after their ``TAKEN``), and the push arrived after the broadcast sent after its 200.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import orjson

from rawsse.node.wire import ADMIN, BCAST, encode

if TYPE_CHECKING:
    from rawsse.node.mesh import Mesh

log = logging.getLogger(__name__)


def broadcast(mesh: "Mesh", frame: bytes, prefix: str,
              done: Callable[[int, int, list[int]], None]) -> None:
    """Ask every peer to write ``frame`` to its streams; ``done(written, refused, missing)``
    summed over the workers once all replied or ``--broadcast-worker-wait`` passed:
    ``missing`` names the workers that gave no count (down, or not done in time: such a
    worker may still write the event; its streams are not in the sums).

    The requests leave before this worker writes its own streams, so every worker writes
    at once (queued for the end of the turn, they waited for this worker's whole loop)."""
    waited = set(range(mesh.count))  # each worker, this one too, until its part arrives
    tally = [0, 0]  # written, refused

    def reply(peer: int, part: tuple[int, int] | None) -> None:
        if part is not None:
            waited.discard(peer)
            tally[0] += part[0]
            tally[1] += part[1]
        replies[0] -= 1
        if replies[0] == 0:
            done(tally[0], tally[1], sorted(waited))

    prefix_bytes = prefix.encode()
    peers = mesh.worker_peers()
    replies = [len(peers) + 1]
    wait = mesh.worker.config.broadcast_worker_wait
    for peer in peers:
        rid = mesh.expect(peer, partial(reply, peer), None, wait)
        mesh.send(peer, BCAST, encode(BCAST, rid, prefix_bytes, frame))
    if peers:
        mesh.flush()
    mesh.broadcast_here(frame, prefix, partial(reply, mesh.index))


def broadcast_here(mesh: "Mesh", frame: bytes, prefix: str,
                   done: Callable[[tuple[int, int] | None], None]) -> None:
    """Write ``frame`` to this worker's streams at the end of this loop turn, after the pushes
    the peers sent before it (``write_broadcasts``); ``done((written, refused))``, or
    ``done(None)`` if writing failed (logged): the worker is then missing from the answer."""
    mesh.broadcasts_due.append((frame, prefix, done))
    if len(mesh.broadcasts_due) == 1:
        mesh.worker.loop.call_first(mesh.write_broadcasts)


def write_broadcasts(mesh: "Mesh") -> None:
    """Read every peer's link to the end and write the pushes found there, then the due
    broadcasts. Run from the loop (``call_first``), never inside a link's read: a read nested
    in another would take the next message before the rest of the one being handled. The
    links are read past their per-turn budget (``InLink.handle_events``): the order needs all
    of it, and a broadcast is rare."""
    while mesh.broadcasts_due:
        due, mesh.broadcasts_due = mesh.broadcasts_due, []
        for link in list(mesh.inbound):
            link.read_all()
        mesh.flush()
        for frame, prefix, done in due:
            counts: tuple[int, int] | None = None
            try:
                counts = mesh.worker.broadcast_local(frame, prefix)
            except Exception:
                log.exception("broadcast to this worker's streams failed")
            done(counts)
    if mesh.batches:  # the replies (BCAST_DONE) leave this turn, not the next
        mesh.flush()


def collect(mesh: "Mesh", kind: int, body: bytes, done: Callable[[list[Any]], None]) -> None:
    """Ask every reachable peer (``STATS``, ``ADMIN``); ``done`` gets their JSON replies
    once all answered (a peer lost meanwhile is left out)."""
    replies: list[Any] = []
    peers = mesh.worker_peers()
    remaining = [len(peers)]

    def reply(doc: Any) -> None:
        if doc is not None:
            replies.append(doc)
        remaining[0] -= 1
        if remaining[0] == 0:
            done(replies)

    if not peers:
        done(replies)
        return
    for peer in peers:
        rid = mesh.expect(peer, reply, None)
        mesh.send(peer, kind, encode(kind, rid, body))


def share(mesh: "Mesh", command: dict[str, Any], done: Callable[[list[Any]], None]) -> None:
    """Apply an admin command on every peer; ``done`` once all have it, so the change holds
    for the very next push whichever worker takes it."""
    mesh.collect(ADMIN, orjson.dumps(command), done)
