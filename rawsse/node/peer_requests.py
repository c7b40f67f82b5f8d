"""The mesh's requests to every peer at once: a broadcast (``BCAST``), ``/stats`` and the
deliveries queries (``collect``), admin commands (``share``). A part of ``Mesh`` (``mesh.py``
has the theory of operation) in a module of its own, to keep that one short: ``Mesh`` binds
these functions as its methods.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import orjson

from rawsse.node.wire import ADMIN, BCAST, encode

if TYPE_CHECKING:
    from rawsse.node.mesh import Mesh


def broadcast(mesh: "Mesh", frame: bytes, prefix: str,
              done: Callable[[int, int, list[int]], None]) -> None:
    """Ask every peer to write ``frame`` to its streams; ``done(written, refused, missing)``
    summed over the workers once all replied or ``--broadcast-worker-wait`` passed:
    ``missing`` names the workers that gave no count (down, or not done in time: such a
    worker may still write the event; its streams are not in the sums).

    The requests leave before this worker writes its own streams, so every worker writes
    at once (queued for the end of the turn, they waited for this worker's whole loop)."""
    waited = {peer for peer in range(mesh.count) if peer != mesh.index}
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
    reply(mesh.index, mesh.worker.broadcast_local(frame, prefix))


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
