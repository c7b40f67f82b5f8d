"""Routing by composition: what the routes ask of a worker, whichever topology it is part of.

Theory of operation
-------------------
The routes (``routes.py``) know one ``Router`` per worker and nothing of the topology behind it.
A router offers: submit a push, place a device's stream, broadcast, collect ``/stats``, share an
admin change. Three compose the same parts:

- ``LocalRouter`` (below): one process owns every token.
- ``rawsse.node.routing.MeshRouter``: a prefork worker owns one hash shard of tokens and reaches
  the other workers through the mesh.
- the same ``MeshRouter`` with a cluster ``Owner`` and pending store (``rawsse.cluster.routing``):
  a node of several, where a device may be held by another node, reached through Redis.

The part that differs between a node and a cluster is the ``Owner``: what the worker owning a
token does with a push for it. ``LocalOwner`` accepts it into this worker's queues
(``delivery.py``); a cluster's owner writes it here if the device is held here and otherwise
routes it through Redis. Every answer is an ``Accepted``.
"""

from __future__ import annotations

import enum
import zlib
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from rawsse.apns.registry import Push
from rawsse.server.documents import node_document

if TYPE_CHECKING:
    from rawsse.apns.delivery import Delivery
    from rawsse.server.worker import Worker



def owner_of(token: bytes, workers: int) -> int:
    """The worker of a node that owns ``token``: stable across processes and restarts (not
    ``hash()``). Here, beside the Router, because the routes' hot path asks it too."""
    return zlib.crc32(token) % workers if workers > 1 else 0

class Accepted(enum.IntEnum):
    """What became of a submitted push; the values are also its mesh wire encoding."""

    HELD = 1  # the token's owner holds it (stream, pending, delay queue, or Redis): 200
    QUEUE_FULL = 0  # a bounded queue is full: 503, back-pressure, the sender retries
    UNREACHABLE = -1  # the owner (worker, node's agent, Redis) could not be reached: 503


# The members as plain names: ``Accepted.HELD`` is an attribute lookup through the enum's
# metaclass, 5x a global's cost on Python 3.11 (0.11 vs 0.02 us, python -m timeit), paid on
# every push.
HELD, QUEUE_FULL, UNREACHABLE = Accepted.HELD, Accepted.QUEUE_FULL, Accepted.UNREACHABLE

PushAnswer = Callable[[Accepted], None]
# How a push submitted plain (``Router.submit_plain``) is answered when it is not a plain 200
# written by the channel: the routes' ``_push_answered(request, apns_id, accepted)``.
PlainAnswer = Callable[[Any, bytes, Accepted], None]
# What a broadcast reached: ``{"streams", "refused"}`` for a node, and "missing_workers" when
# some of its workers gave no count; in Redis mode also "nodes", "missing" and "reasons"
# (``rawsse.cluster.broadcast``). The answer to POST /broadcast.
BroadcastAnswer = Callable[[dict[str, Any]], None]


def tally(written: int, refused: int, missing_workers: list[int] | None = None) -> dict[str, Any]:
    """A node's (or a worker's) part of a broadcast, as its answer shows it: the workers that
    gave no count (down, or late) are named, so a sum short of them never passes for whole."""
    part: dict[str, Any] = {"streams": written, "refused": refused}
    if missing_workers:
        part["missing_workers"] = missing_workers
    return part


class Owner(Protocol):
    """The owning worker's half of a push."""

    def take(self, token: bytes, push: "Push", delay: float, answer: PushAnswer) -> None: ...


class Router(Protocol):
    """What the routes need from the worker's place in the node and the cluster."""

    # The token owner's half, where this worker owns the token (a cluster swaps its own in):
    # a push for a token this worker owns, with a ``LocalOwner`` here, may skip ``submit``.
    owner: Owner

    def submit(self, token: bytes, push: "Push", delay: float, answer: PushAnswer) -> None:
        """Hand ``push`` to the token's owner; ``answer`` once it is held or refused."""

    def submit_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                     delay: float, answer: PlainAnswer, request: Any, apns_id: bytes) -> None:
        """``submit`` of a push whose 200 is plain (``Channel.answer_ok`` of ``apns_id`` on
        ``request``, counted in ``pushes_ok``: no --response-delay, no sandbox id), with no
        ``Push`` or callback made for it where the way to its owner can do without (a
        forwarded push: ``rawsse.node.forwarding``); anything else is
        ``answer(request, apns_id, accepted)``."""

    def place_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        """A device's ``GET /events`` is answered: its socket goes to the token's owner."""

    def broadcast(self, frame: bytes, prefix: str, done: BroadcastAnswer) -> None:
        """Write ``frame`` to every stream (or those under ``prefix``); ``done(what reached)``."""

    def collect_stats(self, done: Callable[[dict[str, Any]], None]) -> None:
        """``done(document)``: ``/stats`` for the node (and the cluster)."""

    def share_admin(self, command: dict[str, Any], done: Callable[[], None]) -> None:
        """Apply an admin change (replayable, ``admin.py``) everywhere, then ``done()``."""

    def find_deliveries(self, query: dict[str, Any],
                        done: Callable[[dict[str, Any]], None]) -> None:
        """``done({"answers": [...], "late": [...]})``: every worker's (and node's) answer to
        a deliveries query (``deliverylog.worker_answer``), and the nodes that did not answer
        in time."""


class LocalOwner:
    """Accept into this worker's own queues (``Delivery``)."""

    __slots__ = ("delivery",)

    def __init__(self, delivery: "Delivery") -> None:
        self.delivery = delivery

    def take(self, token: bytes, push: "Push", delay: float, answer: PushAnswer) -> None:
        answer(self.delivery.accept(token, push, delay))


class LocalRouter:
    """One process owns every token: everything happens here, at once."""

    __slots__ = ("worker", "owner")

    def __init__(self, worker: "Worker", owner: Owner) -> None:
        self.worker = worker
        self.owner = owner

    def submit(self, token: bytes, push: "Push", delay: float, answer: PushAnswer) -> None:
        self.owner.take(token, push, delay, answer)

    def submit_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                     delay: float, answer: PlainAnswer, request: Any, apns_id: bytes) -> None:
        # Only with an owner that is not a LocalOwner (the routes write those themselves).
        self.owner.take(token, Push(frame, expires, received), delay,
                        partial(answer, request, apns_id))

    def place_stream(self, fd: int, token: bytes, leftover: bytes, events: int) -> None:
        self.worker.open_stream(fd, token, leftover, events)

    def broadcast(self, frame: bytes, prefix: str, done: BroadcastAnswer) -> None:
        done(tally(*self.worker.broadcast_local(frame, prefix)))

    def collect_stats(self, done: Callable[[dict[str, Any]], None]) -> None:
        done(node_document([self.worker.snapshot()]))

    def share_admin(self, command: dict[str, Any], done: Callable[[], None]) -> None:
        done()

    def find_deliveries(self, query: dict[str, Any],
                        done: Callable[[dict[str, Any]], None]) -> None:
        done({"answers": [self.worker.deliveries_answer(query)], "late": []})
