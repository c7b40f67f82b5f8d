"""The mesh wire in one process: record codecs, message packing, the ordered send queue and fds
passed with SCM_RIGHTS, over real AF_UNIX SOCK_SEQPACKET socket pairs."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from rawsse.cluster import records
from rawsse.node import wire
from rawsse.node.sendqueue import SendQueue
from rawsse.node.wire import (
    ACK, ADMIN, ANSWER, ASK, BCAST, BCAST_DONE, CLAIM, CLAIMED, CLUSTER, CLUSTER_VIEW, CONNECTION,
    DELIVER, DELIVERIES, EVICT, FIND, FOUND, HANDOFF, MAX_FDS, MAX_MESSAGE, NODE_STATS, PUSH, RELEASE, REPLY,
    ROUTE, ROUTED, STATE, STATS, TAKEN,
)

TOKEN = bytes(range(32))
FRAME = b'data: {"aps":{"alert":"hi"}}\n\n'

# kind -> (fields in LAYOUTS order, the body as the hand-written codecs packed it before wire.py)
SAMPLES: dict[int, tuple[tuple[object, ...], bytes]] = {
    PUSH: ((7, 2**40 + 3, 1.7e9, 4.5, 0.5, TOKEN, FRAME),
           struct.pack("!IQdddB", 7, 2**40 + 3, 1.7e9, 4.5, 0.5, 32) + TOKEN + FRAME),
    ACK: ((7, -1), struct.pack("!Ib", 7, -1)),
    TAKEN: ((2**40 + 3, 256, 1 << 20, 2), struct.pack("!QIII", 2**40 + 3, 256, 1 << 20, 2)),
    HANDOFF: ((TOKEN, b"GET /events"), struct.pack("!B", 32) + TOKEN + b"GET /events"),
    CONNECTION: ((b"POST /3/device/",), b"POST /3/device/"),
    BCAST: ((9, b"ab", FRAME), struct.pack("!IB", 9, 2) + b"ab" + FRAME),
    BCAST_DONE: ((9, 18000, 3), struct.pack("!III", 9, 18000, 3)),
    STATS: ((3, b""), struct.pack("!I", 3)),
    REPLY: ((3, b'{"streams":1}'), struct.pack("!I", 3) + b'{"streams":1}'),
    ADMIN: ((4, b'{"op":"x"}'), struct.pack("!I", 4) + b'{"op":"x"}'),
    ROUTE: ((5, 1, 1.7e9, 0.0, TOKEN, FRAME),
            struct.pack("!IBddB", 5, 1, 1.7e9, 0.0, 32) + TOKEN + FRAME),
    CLAIM: ((6, 0, TOKEN), struct.pack("!IBB", 6, 0, 32) + TOKEN),
    RELEASE: ((TOKEN,), TOKEN),
    NODE_STATS: ((b'{"pushes":2}',), b'{"pushes":2}'),
    CLUSTER: ((8, b""), struct.pack("!I", 8)),
    ROUTED: ((5, -2), struct.pack("!Ib", 5, -2)),
    CLAIMED: ((6, 2**40, b"value"), struct.pack("!Iq", 6, 2**40) + b"value"),
    DELIVER: ((1.7e9, 0.25, TOKEN, FRAME), struct.pack("!ddB", 1.7e9, 0.25, 32) + TOKEN + FRAME),
    EVICT: ((-1, TOKEN), struct.pack("!qB", -1, 32) + TOKEN),
    STATE: ((True, False), struct.pack("!??", True, False)),
    CLUSTER_VIEW: ((8, b'{"nodes":{}}'), struct.pack("!I", 8) + b'{"nodes":{}}'),
    records.CLUSTER_BCAST: ((9, b"ab", FRAME), struct.pack("!IB", 9, 2) + b"ab" + FRAME),
    records.CLUSTER_BCAST_DONE: ((9, b'{"nodes":{}}'), struct.pack("!I", 9) + b'{"nodes":{}}'),
    DELIVERIES: ((10, b'{"ids":[]}'), struct.pack("!I", 10) + b'{"ids":[]}'),
    FIND: ((11, b'{"tokens":[]}'), struct.pack("!I", 11) + b'{"tokens":[]}'),
    ANSWER: ((12, b"[]"), struct.pack("!I", 12) + b"[]"),
    FOUND: ((13, b'{"nodes":{}}'), struct.pack("!I", 13) + b'{"nodes":{}}'),
    ASK: ((14, b"{}"), struct.pack("!I", 14) + b"{}"),
}


def seqpacket_pair(sndbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if sndbuf:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    left.setblocking(False)
    right.setblocking(False)
    return left, right


def receive_all(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(wire.RECV_SIZE))
        except BlockingIOError:
            return got


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- codecs -----------------------------------------------------------------------------------

def test_every_kind_has_a_sample_and_keeps_its_number() -> None:
    assert set(SAMPLES) == set(wire.LAYOUTS)
    assert (PUSH, ACK, HANDOFF, BCAST, BCAST_DONE, STATS, REPLY, ADMIN) == tuple(range(1, 9))
    assert TAKEN == 16 and CONNECTION == 9
    assert (records.ROUTE, records.CLAIM, records.RELEASE, records.STATS, records.CLUSTER,
            records.CLUSTER_BCAST) == (32, 33, 34, 35, 36, 37)
    assert (records.ROUTED, records.CLAIMED, records.DELIVER, records.EVICT, records.STATE,
            records.CLUSTER_VIEW, records.CLUSTER_BCAST_DONE) == (40, 41, 42, 43, 44, 45, 46)
    assert DELIVERIES == 20 and (FIND, ANSWER, FOUND, ASK) == (50, 51, 52, 53)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_codec_keeps_the_byte_layout_and_round_trips(kind: int) -> None:
    fields, body = SAMPLES[kind]
    assert wire.encode(kind, *fields) == body
    assert wire.decode(kind, body) == fields
    assert wire.decoder(kind)(memoryview(b"xx" + body)[2:]) == fields  # a view into a message


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_a_framer_is_the_record_of_the_encoded_body(kind: int) -> None:
    fields, body = SAMPLES[kind]
    assert wire.framer(kind)(*fields) == wire.record(kind, body)


def test_a_trailing_byte_string_may_be_left_out() -> None:
    assert wire.encode(CLAIMED, 6, 1) == wire.encode(CLAIMED, 6, 1, b"")
    assert records.request(8) == wire.encode(CLUSTER, 8, b"")
    assert wire.decode(PUSH, wire.encode(PUSH, 1, 5, 2.0, 2.5, 3.0, TOKEN)) == (1, 5, 2.0, 2.5, 3.0, TOKEN, b"")


def test_records_names_are_the_wire_codecs() -> None:
    fields, body = SAMPLES[ROUTE]
    assert records.route(*fields) == body
    assert records.parse_route(memoryview(body)) == fields
    assert records.parse_claimed(memoryview(records.claimed(6, -1))) == (6, -1, b"")
    assert records.parse_state(memoryview(records.state(False, True))) == (False, True)


def test_a_layout_whose_struct_does_not_match_its_fields_is_refused() -> None:
    with pytest.raises(ValueError):
        wire._codecs(wire.Layout("!IB", ("rid",)))  # B would be a length with no sized field


# -- messages ---------------------------------------------------------------------------------

def test_records_come_back_in_order_with_their_sender() -> None:
    framed = [(wire.record(kind, body), -1) for kind, (_, body) in SAMPLES.items()]
    [(message, fds)] = wire.pack_messages(3, framed)
    assert fds == [] and wire.sender_of(message) == 3
    assert [(kind, bytes(body)) for kind, body in wire.iter_records(message)] == \
        [(kind, body) for kind, (_, body) in SAMPLES.items()]


def test_a_messages_pushes_read_in_one_call_are_what_the_push_decoder_reads() -> None:
    """``read_pushes`` (the owner's read of a message of forwarded pushes) between other
    records: each PUSH as ``decoder(PUSH)`` gives it, their frames' bytes, asked or not."""
    promised = (0, 11, 1.7e9, 4.5, 0.0, TOKEN[:8], FRAME)
    asked = (9, 12, 0.0, 4.5, 0.5, TOKEN, FRAME + b"x")
    records = [wire.framer(PUSH)(*promised), wire.record(ACK, struct.pack("!Ib", 7, 1)),
               wire.framer(PUSH)(*asked)]
    [(message, _)] = wire.pack_messages(3, [(framed, -1) for framed in records])
    assert wire.read_pushes(message) == ([promised, asked], 2 * len(FRAME) + 1, True, True)
    [(alone, _)] = wire.pack_messages(3, [(records[0], -1)])
    assert wire.read_pushes(alone) == ([promised], len(FRAME), False, False)
    decode = wire.decoder(PUSH)
    assert [decode(body) for kind, body in wire.iter_records(message) if kind == PUSH] == \
        [promised, asked]


def test_packing_splits_at_max_message_bytes() -> None:
    body = b"x" * 10_000
    framed = [(wire.record(REPLY, body[:-len(str(i))] + str(i).encode()), -1) for i in range(20)]
    messages = wire.pack_messages(0, framed)
    assert len(messages) == 4  # six 10 kB records fit in 60 KiB, a seventh does not
    assert all(len(message) <= MAX_MESSAGE for message, _ in messages)
    # every message but the last says the batch goes on; the sender index is unchanged
    assert [wire.more_follows(message) for message, _ in messages] == [True, True, True, False]
    assert {wire.sender_of(message) for message, _ in messages} == {0}
    got = [bytes(body) for message, _ in messages for _, body in wire.iter_records(message)]
    assert got == [f[len(wire.record(REPLY, b"")):] for f, _ in framed]


def test_a_record_over_the_limit_travels_alone() -> None:
    big = wire.record(REPLY, b"y" * (MAX_MESSAGE + 1))
    small = wire.record(ACK, wire.encode(ACK, 1, 1))
    messages = wire.pack_messages(0, [(small, -1), (big, -1), (small, -1)])
    assert [len(wire.iter_records(message)) for message, _ in messages] == [1, 1, 1]


def test_packing_splits_at_max_fds_and_keeps_each_fd_with_its_message() -> None:
    handoff = wire.record(HANDOFF, wire.encode(HANDOFF, TOKEN, b""))
    ack = wire.record(ACK, wire.encode(ACK, 1, 1))
    framed = []
    for fd in range(1000, 1150):  # numbers only: nothing is sent
        framed += [(handoff, fd), (ack, -1)]
    messages = wire.pack_messages(1, framed)
    assert [len(fds) for _, fds in messages] == [MAX_FDS, MAX_FDS, 150 - 2 * MAX_FDS]
    assert [fd for _, fds in messages for fd in fds] == list(range(1000, 1150))
    for message, fds in messages:
        kinds = [kind for kind, _ in wire.iter_records(message)]
        assert kinds.count(HANDOFF) == len(fds)


# -- the send queue ---------------------------------------------------------------------------

def fill(queue: SendQueue, size: int = 1000) -> list[bytes]:
    """Send numbered messages until the socket is full; the messages sent, in order."""
    sent: list[bytes] = []
    while True:
        message = str(len(sent)).encode().rjust(size, b".")
        sent.append(message)
        if queue.send(message):
            return sent
        assert len(sent) < 100_000, "the socket never filled"


def test_send_queue_keeps_order_and_counts_queued_bytes() -> None:
    left, right = seqpacket_pair(sndbuf=4096)
    with left, right:
        queue = SendQueue(left)
        sent = fill(queue)
        assert not queue.drained
        later = [b"later-%d" % i for i in range(5)]
        for message in later:
            assert not queue.send(message)  # already waiting: not newly full
        waiting = [m for m, _ in queue.messages]
        assert queue.queued == sum(map(len, waiting)) and waiting[-5:] == later
        got: list[bytes] = []
        while not queue.flush():
            got += receive_all(right)
        got += receive_all(right)
        assert got == sent + later
        assert queue.drained and queue.queued == 0


def test_close_hands_back_what_was_not_sent_with_fds_open() -> None:
    left, right = seqpacket_pair(sndbuf=4096)
    read_end, write_end = os.pipe()
    try:
        with left, right:
            queue = SendQueue(left)
            sent = fill(queue)
            queue.push(b"with-fd", [write_end])
            unsent = queue.close()
            assert queue.drained and queue.queued == 0
            assert unsent[-1] == (b"with-fd", [write_end]) and is_open(write_end)
            assert [m for m, _ in unsent[:-1]] == sent[-len(unsent) + 1:]
            delivered = receive_all(right)
            assert delivered + [m for m, _ in unsent[:-1]] == sent
    finally:
        os.close(read_end)
        os.close(write_end)


def test_fds_pass_with_scm_rights_and_the_sender_copy_is_closed() -> None:
    left, right = seqpacket_pair()
    read_end, write_end = os.pipe()
    try:
        with left, right:
            queue = SendQueue(left)
            message = wire.pack_messages(0, [(wire.record(HANDOFF, b"\0"), write_end)])[0]
            assert not queue.send(*message)
            assert not is_open(write_end)  # checked before recvmsg can reuse the number
            data, ancdata, flags, _ = right.recvmsg(wire.RECV_SIZE, wire.ANCILLARY_SIZE)
            assert data == message[0] and not flags & wire.TRUNCATED
            [received] = wire.received_fds(ancdata)
            os.write(received, b"through the mesh")
            os.close(received)
            assert os.read(read_end, 100) == b"through the mesh"
    finally:
        os.close(read_end)


def test_a_failed_socket_raises_and_keeps_the_message_for_close() -> None:
    left, right = seqpacket_pair()
    right.close()
    with left:
        queue = SendQueue(left)
        with pytest.raises(OSError):
            queue.send(b"lost")
        assert queue.close() == [(b"lost", ())]


def test_hot_path_constants_are_precomputed() -> None:
    assert wire.ANCILLARY_SIZE == socket.CMSG_SPACE(MAX_FDS * 4)
    assert type(wire.TRUNCATED) is int
    assert wire.TRUNCATED == socket.MSG_TRUNC | socket.MSG_CTRUNC
