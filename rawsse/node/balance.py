"""Push senders' connections spread evenly over a node's workers (``--balance-senders``).

Why
---
SO_REUSEPORT picks a worker per connection by a hash of its 4-tuple (``socket(7)``). Devices are
many, so they spread evenly; senders are few (Fleet and Forza's GenStage sender open 5-10
keep-alive connections), and the hash draw decides how many each worker parses: 5 over 2 workers
all land on one in 1 draw of 16, 4-1 in 5 of 16. Measured, two workers pushed 6,355/s with all
five on one and ~9,000/s balanced (``bench/results/issue14-two-workers.md``).

What
----
A connection whose first read shows a push sender, on a plain socket of ``--listen``
(``POST /3/device/`` or the HTTP/2 prior-knowledge preface, RFC 9113 §3.3), is counted here,
unless this worker already holds more sender connections than the least-loaded live sibling:
then it goes to that sibling, fd (``SCM_RIGHTS``, ``unix(7)``) and the bytes read so far in a
``CONNECTION`` record, before anything was answered on it. The sibling adopts it as a fresh
connection fed those bytes (``Worker.adopt_connection``) and counts it. The decision is made
once per connection, on its first read (``Http1Connection._sniff_preface``): no cost per push.

The rule, ``mine > least`` (counts before this connection): after it no worker holds more than
one above the least, the tightest spread whole connections allow when they arrive one at a
time; 10 senders over 16 workers end one each on 10 workers (``mine > least + 1`` would leave
two on one worker while others have none). A connection moves at most once (an adopted one is
never offered again), so two workers cannot bounce one between them. Connections handed to a
sibling count for it until its slot shows them (``in_flight``), so a sender's five connections
sniffed in one loop turn still end 3-2. A race (two workers handing to the same sibling within
one mesh hop) can leave it one over; the senders arriving next go to the others.

Counts: the board
-----------------
``SenderBoard`` is a small array in memory shared by the node (``mmap`` with ``MAP_SHARED |
MAP_ANONYMOUS``, made by the master before it forks, so every worker maps the same pages): one
slot per worker, its sender connections and the loop clock of its last tick
(``CLOCK_MONOTONIC`` is one clock for all processes). Each worker writes its own slot only; the
master clears the slot of a worker it reaped, and a respawned worker resets its slot when it
starts. Counts carried on mesh traffic were the other choice: links are made on first use and
idle links carry nothing, so a worker that forwards nothing would never tell its count, and
asking every sibling when a connection arrives would hold its first answer for a round trip.
A slot is two 8-byte values written with one ``struct.pack_into`` and read without a lock: a
torn read can only misjudge one connection's placement.

A sibling is live while its stamp is younger than ``LIVE_TICKS`` of its ticks and it is not
draining (a draining worker sets its stamp to 0). A worker stopped (``SIGSTOP``) or wedged is
left out once its stamp is that old; until then a connection handed to it waits in its mesh
queue until it runs again. A sender's closes reach the board within a tick: the board counts
the transports of the sender connections held here that still have an fd (``SocketTransport``
sets -1 when the connection closes or becomes a device stream; an HTTP/2 switch keeps it).

Nothing lost, nothing answered twice
------------------------------------
The record leaves with one ``sendmsg`` at once, outside the turn's batch and only if nothing
else waits for that sibling's socket (``Mesh.send_now``); the connection leaves this worker only
once the kernel took it, and then the sibling's queue holds the fd. Anything else (the sibling
not listening: killed, respawning; its socket busy or full) keeps the connection here, served as
if it had never been offered (``sender_handoff_failures``). The batched path devices use is not
enough here: a link that breaks before its flush closes the fds it holds, which a device
survives (it reconnects) but a sender whose request was read would see as a silent close.
Once the kernel took it the connection is the sibling's: a ``kill -9`` of the sibling ends it
unanswered, as any connection the sibling had accepted itself.

TLS connections are neither handed over nor counted: their session lives in this worker's
``ssl`` object, which an fd cannot carry (``rawsse/server/tls.py``). Nor are operator
connections (``--admin-listen``).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from typing import TYPE_CHECKING, Any

from rawsse.h2.frames import PREFACE
from rawsse.node.wire import CONNECTION, MAX_MESSAGE, encode
from rawsse.server.connection import detach_connection
from rawsse.server.transport import SocketTransport

if TYPE_CHECKING:
    from rawsse.node.mesh import Mesh
    from rawsse.server.http1 import Http1Connection
    from rawsse.server.worker import Worker

log = logging.getLogger(__name__)

PUSH_REQUEST = b"POST /3/device/"
_SNIFF = max(len(PUSH_REQUEST), len(PREFACE))
LIVE_TICKS = 3  # a sibling whose last tick is older than this many ticks is passed over
_SLOT = struct.Struct("=qd")  # sender connections held, loop clock of the last tick (0: away)


class SenderBoard:
    """Each worker's sender connections and liveness stamp, in memory the node's processes
    share (module docstring). Made by the master before it forks its workers."""

    __slots__ = ("memory", "workers")

    def __init__(self, workers: int) -> None:
        self.memory = mmap.mmap(-1, _SLOT.size * workers)  # MAP_SHARED | MAP_ANONYMOUS
        self.workers = workers

    def write(self, index: int, senders: int, stamp: float) -> None:
        _SLOT.pack_into(self.memory, index * _SLOT.size, senders, stamp)

    def read(self, index: int) -> tuple[int, float]:
        senders, stamp = _SLOT.unpack_from(self.memory, index * _SLOT.size)
        return senders, stamp

    def clear(self, index: int) -> None:
        """The worker in slot ``index`` is gone (reaped): no one hands connections to it."""
        self.write(index, 0, 0.0)


class Balancer:
    """One worker's part: counts its sender connections, hands new ones to a less-loaded
    sibling, adopts the ones handed to it."""

    def __init__(self, worker: "Worker", mesh: "Mesh", board: SenderBoard) -> None:
        self.worker = worker
        self.mesh = mesh
        self.board = board
        self.index = worker.index
        # Transports of the sender connections held here; one whose fd is -1 has ended.
        self.held: list[SocketTransport] = []
        # Siblings in the order ties are broken: the next index first, so that workers with the
        # same view do not all pick the same sibling.
        self.siblings = [(worker.index + k) % worker.count for k in range(1, worker.count)]
        # sibling -> when connections were handed to it (monotonic, just before each send) that
        # its slot may not show yet: a sender opens its connections at once, and they are
        # sniffed in one loop turn, before any sibling has read its CONNECTION record.
        self.in_flight: dict[int, list[float]] = {}
        worker.balance_sender = self.offer
        mesh.adopt = self.adopt
        worker.tick_hooks.append(self.tick)
        worker.snapshot_hooks.append(self.snapshot)
        board.write(self.index, 0, time.monotonic())  # a respawned worker starts from nothing

    def offer(self, conn: "Http1Connection", first: Any) -> bool:
        """The hook on a connection's first bytes (``Worker.balance_sender``): True when a
        sibling took the connection, False when it stays here."""
        if (conn.operator or conn.transport.__class__ is not SocketTransport
                or not _is_sender(first)):
            return False
        mine = self._count()
        peer = self._least_loaded(mine)
        if peer >= 0 and self._hand(conn, peer, first):
            return True
        self.held.append(conn.transport)
        self._publish(mine + 1)
        return False

    def adopt(self, fd: int, received: bytes) -> None:
        """A sibling's sender connection (a ``CONNECTION`` record): served and counted here."""
        conn = self.worker.adopt_connection(fd, received)
        self.held.append(conn.transport)
        self._publish(self._count())

    def tick(self) -> None:
        self._publish(self._count())

    def snapshot(self, doc: dict[str, Any]) -> None:
        """``/stats`` shows what the board holds: the count is published as it is reported."""
        doc["sender_connections"] = senders = self._count()
        self._publish(senders)

    def leave(self) -> None:
        """This worker drains: siblings stop handing it connections now."""
        self.board.write(self.index, self._count(), 0.0)

    # -- inside ---------------------------------------------------------------------------

    def _count(self) -> int:
        """Sender connections held here, the ended ones dropped (a few: 5-10 per node)."""
        held = self.held
        if any(t.fd < 0 for t in held):
            self.held = held = [t for t in held if t.fd >= 0]
        return len(held)

    def _publish(self, senders: int) -> None:
        stamp = 0.0 if self.worker.draining else self.worker.loop.now
        self.board.write(self.index, senders, stamp)

    def _least_loaded(self, mine: int) -> int:
        """The live sibling holding the fewest sender connections if it holds fewer than this
        worker, else -1."""
        board, best, fewest = self.board, -1, mine
        oldest = self.worker.loop.now - LIVE_TICKS * self.worker.tick_seconds
        for peer in self.siblings:
            senders, stamp = board.read(peer)
            if stamp <= oldest:
                continue
            if peer in self.in_flight:
                senders += self._not_shown(peer, stamp)
            if senders < fewest:
                best, fewest = peer, senders
        return best

    def _not_shown(self, peer: int, stamp: float) -> int:
        """Connections handed to ``peer`` that its slot, written at ``stamp``, does not count:
        it writes its slot in the loop turn it adopts one, with that turn's clock, so a slot
        written after a hand-off left counts it (a slot written by a turn that began during the
        send, before the record arrived, would be taken as counting it: a misjudged placement
        at worst)."""
        pending = [sent for sent in self.in_flight[peer] if sent >= stamp]
        if pending:
            self.in_flight[peer] = pending
        else:
            del self.in_flight[peer]
        return len(pending)

    def _hand(self, conn: "Http1Connection", peer: int, first: Any) -> bool:
        """Send the connection to ``peer`` now; False (it stays here) when it cannot leave."""
        body = encode(CONNECTION, bytes(first))
        # Before the send: the sibling may wake and read the clock before this process returns
        # from sendmsg (two cores), and its slot, written then, must count as showing this one.
        sent_at = time.monotonic()
        if len(body) > MAX_MESSAGE or not self.mesh.send_now(peer, CONNECTION, body, conn.fd):
            self.worker.stats.sender_handoff_failures += 1
            log.debug("a sender connection stays on worker %d: worker %d did not take it",
                      self.index, peer)
            return False
        self.in_flight.setdefault(peer, []).append(sent_at)
        os.close(detach_connection(conn))  # the sibling's copy is in its queue
        self.worker.stats.senders_handed_over += 1
        return True


def _is_sender(first: Any) -> bool:
    head = bytes(first[:_SNIFF])
    return head.startswith(PUSH_REQUEST) or head.startswith(PREFACE)
