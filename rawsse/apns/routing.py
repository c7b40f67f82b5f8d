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
token does with a push for it. ``LocalOwner`` writes it to the device's live stream at once or
accepts it into this worker's queues (``Delivery.take_plain``); a cluster's owner does the same
if the device is held here and otherwise routes it through Redis. Every answer is an
``Accepted``.

One path for a push: the routes make one call for every push, ``router.submit_plain``, with
the push's fields (no ``Push`` object, no callback made for it). A ``LocalRouter``'s is its
owner's ``take_plain`` itself, so a push in a one-worker node costs one call to be written; a
``MeshRouter``'s computes ``owner_of`` once and either hands the push to its own owner's
``take_plain`` or forwards it (``rawsse.node.mesh.Mesh.submit_plain``). What this worker's
owner decides comes back as the call's value, for the routes to answer at once; what goes
elsewhere is answered when its owner holds it.
"""

from __future__ import annotations

import enum
import zlib
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from rawsse.server.documents import node_document

if TYPE_CHECKING:
    from rawsse.apns.delivery import Delivery
    from rawsse.server.worker import Worker


def owner_of(token: bytes, workers: int) -> int:
    """The worker of a node that owns ``token``: stable across processes and restarts (not
    ``hash()``). A push's is computed once, by its router (``Mesh.submit_plain`` writes it out)."""
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
# ``Router.submit_plain`` and ``Owner.take_plain``: (token, frame, expires, received, delay,
# answer, request, apns_id) -> the Accepted the caller answers, or None once it is answered
# later. ``answer`` is a ``PlainAnswer`` with a ``request``, else (request None) a
# ``PushAnswer``: ``push_answer`` makes the one-argument answer of either.
PlainSubmit = Callable[[bytes, bytes, float, float, float, Any, Any, bytes], "Accepted | None"]


def push_answer(answer: Any, request: Any, apns_id: bytes) -> PushAnswer:
    """The one-argument answer of a push submitted plain, where one is needed (a push asked of
    its owner, one an owner answers later): ``answer`` itself when ``request`` is None."""
    return answer if request is None else partial(answer, request, apns_id)


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
    """The owning worker's half of a push: where every push for a token this worker owns ends,
    the routes' own or one a peer forwarded."""

    def take_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                   delay: float, answer: Any, request: Any, apns_id: bytes) -> "Accepted | None":
        """Deliver the push now or after ``delay``, or let it wait (no ``Push`` made for one
        written at once); the ``Accepted`` returned is the caller's to answer, or None: it is
        answered later (``push_answer(answer, request, apns_id)``), once an owner that asks
        elsewhere first (Redis) knows."""


class Router(Protocol):
    """What the routes need from the worker's place in the node and the cluster."""

    # The token owner's half, where this worker owns the token: set it (a cluster swaps its
    # own in) and ``submit_plain`` follows.
    owner: Owner
    # The one call the routes make for every push (``PlainSubmit``): written or kept here by
    # ``owner.take_plain`` when this worker owns the token (its Accepted returned), else sent
    # to the owner and answered once it holds it (None returned). A 200 the router writes
    # itself, with a ``request``, is ``Channel.answer_ok(request, apns_id)``, counted in
    # ``pushes_ok`` (no --response-delay, no sandbox id); anything else it answers is
    # ``push_answer(answer, request, apns_id)(accepted)``.
    submit_plain: PlainSubmit

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
    """This worker's own queues (``Delivery.take_plain``), called with no frame of ours between."""

    __slots__ = ("delivery", "take_plain")

    def __init__(self, delivery: "Delivery") -> None:
        self.delivery = delivery
        self.take_plain: PlainSubmit = delivery.take_plain


class LocalRouter:
    """One process owns every token: everything happens here, at once."""

    __slots__ = ("worker", "_owner", "submit_plain")

    def __init__(self, worker: "Worker", owner: Owner) -> None:
        self.worker = worker
        self.owner = owner

    @property
    def owner(self) -> Owner:
        return self._owner

    @owner.setter
    def owner(self, owner: Owner) -> None:
        self._owner = owner
        # The routes call the owner itself: no router frame on the hot path.
        self.submit_plain: PlainSubmit = owner.take_plain

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
