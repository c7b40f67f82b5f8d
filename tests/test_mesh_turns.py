"""The mesh's acknowledgements turn by turn: two workers of one node in this process, joined by
their real SOCK_SEQPACKET mesh, senders on socketpairs; each test turns the loops itself, so
what one loop turn sends is what the test sees (rawsse/node/forwarding.py, Acknowledgement).

- a turn's TAKEN rides in the message carrying that turn's pushes to the same peer;
- TAKENs left on the way back are read late (credit not low), and still release what the
  sender keeps, on its tick;
- an owner grants credit again only once the sender's falls below half, then all of it;
- an owner gone after taking pushes: every TAKEN it sent, riding or on the way back, counts
  before the kept pushes are sent again, so none is sent twice;
- a forwarded push's plain 200 counts in pushes_ok; one its owner cannot take is a 503;
- a forwarded push written at once counts its latency from when it was received;
- a broadcast sent after a forwarded push's 200 reaches the device after the push, whether
  the owner takes the broadcast itself or from a peer, in the turn it reads the push;
- a push's owner is computed once, kept here or forwarded; an owner set later takes the
  worker's own shard; request ids start at random in every worker."""

from __future__ import annotations

import json
import os
import select
import socket
import time
import zlib
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from rawsse.apns import routing
from rawsse.apns.routing import HELD, Accepted
from rawsse.config import ServeConfig
from rawsse.node import mesh
from rawsse.node.forwarding import CREDIT_PUSHES
from rawsse.node.process import PEERS_GATE, NodeProcess
from rawsse.node.routing import owner_of
from rawsse.node.wire import PUSH, TAKEN, iter_records
from rawsse.server.latency import BOUNDS as LATENCY_BOUNDS
from rawsse.server.loop import EPOLLRDHUP

# The node is named after its master and a link is admitted only from a child of it
# (peercred.py): both workers are this process, whose parent plays the master.
NODE = os.getppid()


class Pair:
    """Two workers of one node, each with a device stream and a keep-alive sender."""

    def __init__(self) -> None:
        config = ServeConfig(keepalive=0, max_pending=10_000)
        self.sockets: list[socket.socket] = []
        self.procs = []
        self.dead: set[int] = set()
        self.served_by: dict[socket.socket, tuple[int, int]] = {}  # -> (worker, its fd)
        for index in range(2):
            control, master_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sockets.append(master_end)
            proc = NodeProcess(config, index, 2, NODE, control, {}, os.devnull)
            proc.mesh.listen()
            proc.worker.release(PEERS_GATE)
            self.procs.append(proc)
        self.tokens = [token_owned_by(i) for i in range(2)]
        self.devices = [self.connect(i) for i in range(2)]
        for device, token in zip(self.devices, self.tokens):
            device.send(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.senders = [self.connect(i) for i in range(2)]
        self.turn(0)
        self.turn(1)

    def connect(self, index: int) -> socket.socket:
        ours, theirs = socket.socketpair()
        fd = os.dup(ours.fileno())
        self.procs[index].worker.accept(fd, False)
        ours.close()
        theirs.setblocking(False)
        self.sockets.append(theirs)
        self.served_by[theirs] = (index, fd)
        return theirs

    def handle(self, sock: socket.socket) -> None:
        """What worker's connection for ``sock`` has to read, read now, outside a loop turn:
        the loop handling it before anything else in its next turn."""
        index, fd = self.served_by[sock]
        loop = self.procs[index].worker.loop
        loop.handlers[fd].handle_events(select.EPOLLIN)

    def turn(self, index: int, wait: float = 2.0) -> None:
        """One loop turn of worker ``index``, once it has something to do (or ``wait`` s)."""
        loop = self.procs[index].worker.loop
        if select.select([loop.epoll.fileno()], [], [], wait)[0]:
            loop.run_once()

    def push(self, at: int, owner: int, count: int = 1) -> None:
        """``count`` pipelined pushes sent to worker ``at`` for worker ``owner``'s token."""
        request = (f"POST /3/device/{self.tokens[owner]} HTTP/1.1\r\nHost: x\r\n"
                   "Content-Length: 9\r\n\r\n{\"n\": 1}\n").encode()
        self.senders[at].send(request * count)

    def answers(self, at: int) -> int:
        return received(self.senders[at]).count(b"HTTP/1.1 200")

    def pushes_on_device(self, owner: int) -> int:
        return received(self.devices[owner]).count(b"id: ")

    def warm(self) -> None:
        """A first push each way: its answer brings the owner's credit (no TAKEN waits)."""
        for at in range(2):
            self.push(at, 1 - at)
            answered = 0
            for _ in range(10):  # forwarded, asked; the link accepted, taken; the ACK read
                self.turn(at, 0.05)
                self.turn(1 - at, 0.05)
                answered += self.answers(at)
                if answered:
                    break
            assert answered == 1  # the next forwarded push, out of credit, reads the TAKEN
        for owner in range(2):
            self.pushes_on_device(owner)

    def outlink(self, index: int):  # worker index's link to the other worker
        return self.procs[index].mesh.links[1 - index]

    def kill(self, index: int) -> None:
        close_worker(self.procs[index])
        self.dead.add(index)

    def close(self) -> None:
        for index, proc in enumerate(self.procs):
            if index not in self.dead:
                close_worker(proc)
        for sock in self.sockets:
            sock.close()


def close_worker(proc: NodeProcess) -> None:
    """Everything a worker holds, closed as a kill -9 would: its peers see their links end."""
    mesh = proc.mesh
    for link in list(mesh.inbound):
        link.sock.close()
    for out in mesh.links.values():
        if out.sock is not None:
            out.sock.close()
    if mesh.listener is not None:
        mesh.listener.sock.close()
    for conn in list(proc.worker.http_conns):
        os.close(conn.fd)
    for stream in list(proc.worker.registry.streams.values()):
        os.close(stream.fd)
    proc.control.sock.close()
    proc.worker.loop.close()


def token_owned_by(owner: int) -> str:
    i = 0
    while owner_of(bytes.fromhex(f"{i:064x}"), 2) != owner:
        i += 1
    return f"{i:064x}"


def received(sock: socket.socket) -> bytes:
    """What ``sock`` holds now, up to the end if its peer closed it (a worker that failed)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def waiting_message(link_sock: socket.socket) -> bytes | None:
    """The next message queued on ``link_sock``, left there (MSG_PEEK)."""
    try:
        return link_sock.recv(1 << 18, socket.MSG_PEEK)
    except BlockingIOError:
        return None


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        p.warm()
        yield p
    finally:
        p.close()


def test_a_turns_taken_rides_in_the_message_of_that_turns_pushes_to_the_same_peer(pair):
    pair.push(0, 1, count=3)
    pair.turn(0)  # worker 0 forwards 3 pushes to worker 1, answered 200 at once
    assert pair.answers(0) == 3
    pair.push(1, 0, count=2)
    pair.turn(1)  # worker 1 takes them and forwards 2 of its own to worker 0: one message
    assert pair.pushes_on_device(1) == 3 and pair.answers(1) == 2
    back = pair.outlink(0).sock  # the way back for worker 1's TAKENs to worker 0
    assert waiting_message(back) is None, "the TAKEN did not go back on its own"
    [inbound] = pair.procs[0].mesh.inbound
    message = waiting_message(inbound.sock)
    kinds = [kind for kind, _ in iter_records(message)]
    assert kinds == [PUSH, PUSH, TAKEN], kinds
    kept = len(pair.outlink(0).outbox.kept)
    pair.turn(0)  # reads it: the 2 pushes are written, the 3 kept ones released
    assert kept == 3 and not pair.outlink(0).outbox.kept
    assert pair.pushes_on_device(0) == 2
    assert pair.outlink(0).acks_due == 0


def test_takens_read_late_still_release_the_kept_pushes_on_the_tick(pair):
    for _ in range(3):  # one-way: worker 1 has nothing for worker 0, its TAKENs go back alone
        pair.push(0, 1, count=2)
        pair.turn(0)
        pair.turn(1)
    assert pair.answers(0) == 6 and pair.pushes_on_device(1) == 6
    link = pair.outlink(0)
    assert len(link.outbox.kept) == 6, "plenty of credit: the TAKENs wait on the way back"
    assert link.acks_due == 3
    credit = link.outbox.credit
    pair.procs[0].mesh.resend_kept()  # the worker's tick
    assert not link.outbox.kept and link.acks_due == 0
    assert link.outbox.credit == credit, "no grant while the sender holds half the credit"
    assert waiting_message(link.sock) is None


def test_an_owner_grants_credit_again_once_the_senders_falls_below_half(pair):
    link = pair.outlink(0)
    pair.procs[0].mesh.resend_kept()  # the TAKEN of warm's asked push
    assert link.outbox.credit == CREDIT_PUSHES  # it granted all of it
    for _ in range(9):  # 144 pushes: the ledger passes GRANT_BELOW (128) in the 9th message
        pair.push(0, 1, count=16)
        pair.turn(0)
        pair.turn(1)
    assert pair.answers(0) == 144 and pair.pushes_on_device(1) == 144
    assert link.outbox.credit == CREDIT_PUSHES - 144  # not low yet: the TAKENs wait
    pair.procs[0].mesh.resend_kept()  # the worker's tick reads them
    assert link.outbox.credit == CREDIT_PUSHES and not link.outbox.kept
    assert pair.procs[1].mesh.ledgers.senders[0].pushes == CREDIT_PUSHES


@pytest.mark.parametrize("last", ["riding", "alone"])
def test_an_owner_gone_after_taking_pushes_gets_none_of_them_again(pair, last):
    """The last TAKEN before the owner's end rides in its message to worker 0, or goes back
    alone (each TAKEN covers every push before it: the last one must be read)."""
    for how in (["alone", "riding"] if last == "riding" else ["riding", "alone"]):
        pair.push(0, 1, count=2)
        pair.turn(0)
        if how == "riding":
            pair.push(1, 0)
        pair.turn(1)  # taken; the TAKEN rides with worker 1's push to worker 0, or not
    assert pair.answers(0) == 4 and pair.pushes_on_device(1) == 4
    link = pair.outlink(0)
    # kept until a TAKEN is read: worker 0's second turn read the riding one, if it came first
    assert len(link.outbox.kept) == (4 if last == "riding" else 2)
    pair.kill(1)  # dies with both TAKENs unread by worker 0
    # Worker 0 learns of it from its link to worker 1 first (its turn might read the other
    # link first, which would hide a close that forgot the TAKENs riding there).
    link.handle_events(EPOLLRDHUP)
    assert link.sock is None
    assert not link.outbox.kept, "pushes worker 1 took would be sent again to its replacement"


def test_a_forwarded_push_submitted_plain_is_counted_ok_or_answered_503_by_the_routes(pair):
    """A forwarded push's plain 200 is written by the mesh (``Outbox.sent``), not the routes,
    and still counts in ``pushes_ok``; one its owner cannot take is the routes' 503."""
    stats = pair.procs[0].worker.stats
    ok = stats.pushes_ok
    pair.push(0, 1, count=3)
    pair.turn(0)
    assert pair.answers(0) == 3 and stats.pushes_ok == ok + 3
    pair.kill(1)
    pair.outlink(0).handle_events(EPOLLRDHUP)  # worker 0 sees its link to worker 1 end
    pair.push(0, 1)
    pair.turn(0)
    answer = received(pair.senders[0])
    assert answer.startswith(b"HTTP/1.1 503") and b"ServiceUnavailable" in answer
    assert b"apns-id: " in answer
    assert stats.pushes_ok == ok + 3 and stats.owner_unavailable == 1


def test_a_forwarded_push_written_at_once_counts_its_latency_from_when_it_was_received(pair):
    """The owner writes a forwarded push to its live stream as the local hot path does
    (``Delivery.take_plain``), but dates it from when the receiving worker took it."""
    latency = pair.procs[1].worker.stats.latency
    before = list(latency)
    pair.push(0, 1)
    pair.turn(0)
    assert pair.answers(0) == 1
    time.sleep(0.25)  # the push waits in the owner's socket queue at least this long
    pair.turn(1)
    assert pair.pushes_on_device(1) == 1
    grown = [bound for bound, old, new in zip(LATENCY_BOUNDS + (float("inf"),), before, latency)
             if new != old]
    assert len(grown) == 1 and grown[0] > 0.25, grown


BROADCAST = b"POST /broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\neveryone"


def forward_one_push_answered(pair) -> None:
    """A push for worker 1's token, taken by worker 0 and answered 200; its message now waits
    in worker 1's socket queue."""
    pair.push(0, 1)
    pair.turn(0)
    assert pair.answers(0) == 1


def assert_broadcast_after_the_push(pair, sender: int) -> None:
    """Both workers turn until ``sender``'s broadcast is answered; worker 1's device has the
    push, then the broadcast."""
    answer = b""
    for _ in range(10):  # each worker writes its part; worker 0's BCAST_DONE, read
        pair.turn(1, 0.05)
        pair.turn(0, 0.05)
        answer += received(pair.senders[sender])
        if answer:
            break
    assert answer.startswith(b"HTTP/1.1 200"), answer
    events = received(pair.devices[1])
    assert b"data: everyone" in events and b'data: {"n": 1}' in events, events
    assert events.index(b'data: {"n": 1}') < events.index(b"data: everyone"), events


def test_a_broadcast_sent_after_a_forwarded_pushs_200_reaches_the_device_after_the_push(pair):
    """The push's message waits in its owner's socket queue when the sender, answered 200,
    sends a broadcast that the owner takes itself and handles before it reads that link: the
    device still gets the push first (``peer_requests.py``: a broadcast is written after the
    pushes the peers sent before it)."""
    forward_one_push_answered(pair)
    pair.senders[1].send(BROADCAST)
    pair.handle(pair.senders[1])  # the broadcast first, the link from worker 0 after it
    assert_broadcast_after_the_push(pair, 1)


def test_a_peers_broadcast_read_in_the_turn_of_a_forwarded_push_comes_after_it(pair):
    """The owner reads a forwarded push (written in the turn's flush, after its TAKEN) and, in
    the same turn, a peer's ``BCAST`` sent after the push's 200, as when a third worker's link
    is ready beside the sender's: the broadcast still reaches the device after the push."""
    forward_one_push_answered(pair)
    pair.senders[0].send(BROADCAST)
    pair.turn(0)  # worker 0 sends BCAST to worker 1, behind the push's message
    link = next(iter(pair.procs[1].mesh.inbound))
    link.handle_events(select.EPOLLIN)  # the push's message (a batch of its own)...
    link.handle_events(select.EPOLLIN)  # ...then the BCAST, both before the turn's flush
    pair.procs[1].worker.loop.run_once()  # the turn they were read in ends (nothing is ready)
    assert_broadcast_after_the_push(pair, 0)


def test_each_workers_request_ids_start_at_random(pair):
    """A reply meant for a dead worker can reach its replacement over a rebuilt link; ids
    that started at the same number in every process would match one of its requests."""
    first = [proc.mesh._new_id() for proc in pair.procs]
    assert first[0] != first[1]


def test_a_push_has_its_owner_computed_once_whether_kept_here_or_forwarded(pair, monkeypatch):
    """The routes make one call per push (``Router.submit_plain``): the mesh finds the token's
    owner there, one CRC-32 a push, for this worker's own shard as for a forwarded push."""
    hashed: list[bytes] = []

    def counting_crc32(data: bytes) -> int:
        hashed.append(data)
        return zlib.crc32(data)

    monkeypatch.setattr(mesh, "crc32", counting_crc32)
    monkeypatch.setattr(routing, "zlib", SimpleNamespace(crc32=counting_crc32))  # owner_of's
    pair.push(0, 0)  # worker 0's own token: written here
    pair.push(0, 1)  # worker 1's: forwarded
    pair.turn(0)
    assert pair.answers(0) == 2 and pair.pushes_on_device(0) == 1
    assert sorted(hashed) == sorted(bytes.fromhex(pair.tokens[i]) for i in range(2)), hashed


class KeepingOwner:
    """An owner a prefork worker's router is given while it runs (a cluster node gives its own
    at start): it keeps the pushes it is given, HELD at once."""

    def __init__(self) -> None:
        self.taken: list[bytes] = []

    def take_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                   delay: float, answer: Any, request: Any, apns_id: bytes) -> Accepted:
        self.taken.append(token)
        return HELD


def test_an_owner_set_on_a_prefork_workers_router_takes_its_own_shards_pushes(pair):
    owner = KeepingOwner()
    pair.procs[0].router.owner = owner
    pair.push(0, 0, count=2)
    pair.turn(0)
    assert pair.answers(0) == 2
    assert owner.taken == [bytes.fromhex(pair.tokens[0])] * 2
    assert pair.pushes_on_device(0) == 0, "written by the owner set before"


def test_a_request_id_is_never_0_which_on_a_push_means_promised(pair):
    """Id 0 on a PUSH asks for no ACK (wire.py): an asked push given it would be written by
    its owner and never answered, then 503 after the timeout, then sent again by the sender."""
    mesh = pair.procs[0].mesh
    mesh._next_id = 0xFFFFFFFF
    assert mesh._new_id() == 1


def test_a_broadcast_whose_write_fails_names_the_worker_and_is_still_answered(pair):
    """Writing to one worker's streams raises (logged): the sender still gets its answer, with
    that worker in ``missing_workers`` and the other worker's streams counted."""
    def fail(frame: bytes, prefix: str) -> tuple[int, int]:
        raise OSError("writing failed")

    pair.procs[1].worker.broadcast_local = fail
    pair.senders[1].send(BROADCAST)
    answer = b""
    for _ in range(10):
        pair.turn(1, 0.05)
        pair.turn(0, 0.05)
        answer += received(pair.senders[1])
        if answer:
            break
    assert answer.startswith(b"HTTP/1.1 200"), answer
    doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert doc["streams"] == 1 and doc["missing_workers"] == [1], doc
    assert b"data: everyone" in received(pair.devices[0])
