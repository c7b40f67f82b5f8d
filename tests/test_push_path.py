"""A push written at once to its device (``Delivery.take_plain``) and what it skips.

The worker is real (loop, registry, delivery log) and nothing listens: a device is a socketpair
whose server end the worker accepted, as ``bench/push_probe.py`` does, and pushes are requests
handed to the routes as in ``test_routes.py``. What is checked is what the hot path must keep
from the general one: a frame the kernel takes only part of is still a push the stream holds, a
device gone before the worker noticed leaves the push pending, a router's owner swapped in
later is followed, a push's unix time follows the wall clock through the tick, and a plain 200
written without an ``Answer`` is the bytes one serializes to.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Iterator

import pytest

from rawsse.apns.routing import HELD, push_answer
from rawsse.config import ServeConfig
from rawsse.server.exchange import Answer, Request
from rawsse.server.http1_wire import serialize
from rawsse.server.worker import Worker
from test_routes import Recorder, request

TOKEN = "0123abcd" * 8
RAW = bytes.fromhex(TOKEN)
APNS_ID = b"6f1a2b3c-0000-4000-8000-00000000abcd"


DEVICES: list[socket.socket] = []  # the test's device ends, closed after it


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker(ServeConfig(keepalive=0))
    yield w
    w.loop.close()
    while DEVICES:
        DEVICES.pop().close()


def device(worker: Worker, send_buffer: int = 0) -> socket.socket:
    """A device's end of a socketpair whose other end is the worker's stream for TOKEN."""
    ours, theirs = socket.socketpair()
    if send_buffer:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    worker.accept(os.dup(ours.fileno()), False)
    ours.close()
    theirs.sendall(f"GET /events?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for _ in range(20):
        if RAW in worker.registry.streams:
            break
        worker.loop.run_once()
    assert RAW in worker.registry.streams
    theirs.setblocking(False)
    DEVICES.append(theirs)
    return theirs


def push(worker: Worker, body: bytes, apns_id: bytes = APNS_ID) -> Answer:
    channel = Recorder()
    worker.routes.handle(request(channel, b"POST", f"/3/device/{TOKEN}".encode(), body,
                                 {b"apns-id": apns_id}))
    assert len(channel.answers) == 1, channel.answers
    return channel.answers[0]


def run_until(worker: Worker, done: object) -> None:
    deadline = time.monotonic() + 2
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        worker.loop.run_once()


def test_a_frame_the_kernel_takes_part_of_is_held_and_goes_back_to_pending(worker: Worker) -> None:
    reader = device(worker, send_buffer=4096)  # never read: the kernel fills up
    stream = worker.registry.streams[RAW]
    for n in range(1, 21):  # the first push the kernel does not take whole is the last one
        apns_id = b"6f1a2b3c-0000-4000-8000-%012d" % n
        assert push(worker, b"y" * 4000, apns_id).status == 200
        if stream.out is not None:
            break
    assert stream.out is not None, "the kernel took every frame whole: nothing to test"
    assert worker.stats.delivered_live == n
    reader.close()  # the device goes away before the rest is written
    run_until(worker, lambda: RAW not in worker.registry.streams)
    held = worker.registry.pending.get(RAW)
    assert held is not None, "the push the stream held was lost"
    assert held.frame.startswith(b"id: " + apns_id + b"\n")
    assert worker.stats.requeued == 1


def test_a_device_gone_before_the_worker_noticed_leaves_the_push_pending(
        worker: Worker) -> None:
    device(worker).close()  # the worker has not read the close yet: the stream is still there
    assert RAW in worker.registry.streams
    assert push(worker, b'{"aps":{}}').status == 200
    assert RAW not in worker.registry.streams
    assert worker.registry.pending[RAW].frame.startswith(b"id: " + APNS_ID + b"\n")


def test_a_push_written_at_once_is_counted_logged_and_arrives_whole(worker: Worker) -> None:
    reader = device(worker)
    reader.recv(65536)  # the stream's head
    assert push(worker, b'{"aps":{}}').status == 200
    frame = b'id: %s\nevent: ping\ndata: {"aps":{}}\n\n' % APNS_ID
    assert reader.recv(65536) == frame
    stats = worker.snapshot()
    assert stats["delivered_live"] == stats["pushes_ok"] == 1
    # received and written in one loop turn: the first bucket (10 us), once
    assert stats["delivery_latency"] == {**dict.fromkeys(stats["delivery_latency"], 0),
                                         "1e-05": 1}
    [entry] = worker.deliveries_answer({"ids": [APNS_ID.decode()]})["entries"]
    assert (entry["event"], entry["token"], entry["bytes"]) == ("delivered", TOKEN, len(frame))


class KeepingOwner:
    """An owner swapped into the router after pushes went through (a cluster node does this
    at start): it keeps what it is given and says HELD through the push's answer, as an owner
    that asks elsewhere first (Redis) does once it knows."""

    def __init__(self) -> None:
        self.taken: list[bytes] = []

    def take_plain(self, token: bytes, frame: bytes, expires: float, received: float,
                   delay: float, answer: Any, request: Any, apns_id: bytes) -> None:
        self.taken.append(token)
        push_answer(answer, request, apns_id)(HELD)


def test_an_owner_swapped_into_the_router_later_gets_the_pushes(worker: Worker) -> None:
    device(worker)
    assert push(worker, b'{"aps":{}}').status == 200  # written here, by this worker's queues
    owner = KeepingOwner()
    worker.router.owner = owner
    assert push(worker, b'{"aps":{}}').status == 200
    assert owner.taken == [RAW]
    assert worker.stats.delivered_live == 1


def test_a_push_reads_the_wall_clock_the_tick_follows(worker: Worker) -> None:
    """Unix time is the loop's monotonic clock plus an offset the tick resets, so a wall clock
    that moved (here: an offset gone wrong by a day) is followed within a tick."""
    worker.routes.wall_offset += 86_400.0
    worker._tick()
    expires = int(time.time()) + 3600
    channel = Recorder()
    worker.routes.handle(request(channel, b"POST", f"/3/device/{TOKEN}".encode(), b"{}",
                                 {b"apns-expiration": b"%d" % expires}))
    assert channel.answers[0].status == 200
    assert worker.registry.pending[RAW].expires == expires, "kept as an hour from now"


def test_a_plain_200_is_the_bytes_an_answer_serializes_to(worker: Worker) -> None:
    """``answer_ok`` writes a push's 200 with no ``Answer``: its bytes are what ``serialize``
    writes for ``Answer(200, headers=apns-id)``, as the 200 of a push kept pending (the general
    path) is, alone on a kept-alive connection and pipelined."""
    device(worker)
    ours, sender = socket.socketpair()
    worker.accept(os.dup(ours.fileno()), False)
    ours.close()
    DEVICES.append(sender)  # closed after the test, as the devices are
    ids = [b"6f1a2b3c-0000-4000-8000-%012d" % n for n in range(4)]
    offline = "ff" * 32  # no stream: kept pending, answered through Answer

    def post(token: str, apns_id: bytes) -> bytes:
        return (f"POST /3/device/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                f"Apns-Id: {apns_id.decode()}\r\n\r\n{{}}").encode()

    def answers(count: int) -> bytes:
        got = b""
        deadline = time.monotonic() + 2
        while got.count(b"\r\n\r\n") < count and time.monotonic() < deadline:
            worker.loop.run_once()
            try:
                got += sender.recv(65536)
            except (BlockingIOError, TimeoutError):
                pass
        return re.sub(rb"Date: [^\r]*\r\n", b"", got)

    def expected(*apns_ids: bytes) -> bytes:
        return re.sub(rb"Date: [^\r]*\r\n", b"", b"".join(
            serialize(Answer(200, b"", None, ((b"apns-id", i),))) for i in apns_ids))

    sender.setblocking(False)
    sender.sendall(post(TOKEN, ids[0]))
    assert answers(1) == expected(ids[0])
    sender.sendall(post(TOKEN, ids[1]) + post(offline, ids[2]) + post(TOKEN, ids[3]))
    assert answers(3) == expected(ids[1], ids[2], ids[3])
    assert worker.stats.delivered_live == 3
