"""CPU per HTTP/2 push through one in-process worker: a probe for changes to ``rawsse/h2``.

One worker (no listener), ``--devices`` device streams and ``--connections`` HTTP/2 senders on
socketpairs. Each sender keeps ``--streams`` pushes in flight, spread over the devices, and
encodes its requests the way its client does (``--client``):

- ``h2load``: nghttp2's shape (captured from ``h2load`` 1.52): ``:path`` a Huffman-coded literal
  *without* indexing, every other field an index (static, or the dynamic entry its first
  request added), ``content-length`` a plain literal.
- ``go``: Go's ``golang.org/x/net/http2/hpack`` shape: every field, ``:path`` too, a literal
  *with* incremental indexing, so each new token is inserted and the dynamic table turns over.
  (Before the warm-up and the replay below, every block was encoded up front, which put the
  encoder's own ~317k instructions per block into the figure: 437.7k per push, now 120.9k.)

Both come from the ``hpack`` library's encoder (an independent implementation). Prints CPU
microseconds per push, the sender's parsing included (the same in any tree). Wall and CPU times
are noisy on a shared VM; instruction counts are not, so compare two trees with callgrind,
subtracting a short run to leave out start-up::

    for n in 1000 11000; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/h2_probe.py --root TREE --count $n 2>&1 | grep Collected; done
    # (instructions at 11000 - instructions at 1000) / 10000 = instructions per push

``--profile`` prints cProfile's top functions instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import socket
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from push_probe import connect, drain  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME = struct.Struct(">BHBBL")
BODY = b'{"aps":{"alert":"bench"},"mdm":"magic"}'


class Sender:
    """One HTTP/2 client connection: requests encoded up front, answers counted."""

    def __init__(self, sock: socket.socket, paths: list[bytes], client: str) -> None:
        self.sock = sock
        self.stream_id = 1
        self.inbuf = b""
        self.in_flight = 0
        self.next_block = 0
        # Blocks encoded once (warm-up: the server's table follows), then the ones after it
        # replayed in a loop: the encoder's table is the same at both ends of them.
        warm_up, self.blocks = _encode_cycles(paths, client)
        sock.sendall(PREFACE + FRAME.pack(0, 0, 4, 0, 0))
        self.pending = collections.deque(warm_up)

    def request(self) -> bytes:
        if self.pending:
            block = self.pending.popleft()
        else:
            block = self.blocks[self.next_block]
            self.next_block = (self.next_block + 1) % len(self.blocks)
        sid = self.stream_id
        self.stream_id += 2
        self.in_flight += 1
        return (FRAME.pack(0, len(block), 1, 4, sid) + block
                + FRAME.pack(0, len(BODY), 0, 1, sid) + BODY)

    def answered(self) -> int:
        """Read what came back; how many 200 answers it held."""
        data = self.inbuf + drain(self.sock)
        pos, ok = 0, 0
        while len(data) - pos >= 9:
            high, low, type_, flags, _ = FRAME.unpack_from(data, pos)
            end = pos + 9 + (high << 16 | low)
            if end > len(data):
                break
            if type_ == 1 and flags & 1:
                if data[pos + 9] != 0x88:
                    raise RuntimeError(f"not a 200: {data[pos:end]!r}")
                ok += 1
            pos = end
        self.inbuf = data[pos:]
        self.in_flight -= ok
        return ok


def _fields(path: bytes, client: str) -> list:
    import hpack

    if client == "h2load":
        return [hpack.NeverIndexedHeaderTuple(b":path", path), (b":scheme", b"http"),
                (b":authority", b"127.0.0.1:8378"), (b":method", b"POST"),
                (b"user-agent", b"h2load nghttp2/1.52.0"), (b"content-length", b"%d" % len(BODY))]
    return [(b":authority", b"127.0.0.1:8378"), (b":method", b"POST"), (b":path", path),
            (b":scheme", b"https"), (b"apns-topic", b"com.apple.mgmt.External.abc"),
            (b"content-length", b"%d" % len(BODY)), (b"accept-encoding", b"gzip"),
            (b"user-agent", b"Go-http-client/2.0")]


def _encode_cycles(paths: list[bytes], client: str) -> tuple[list[bytes], list[bytes]]:
    """(blocks to send first, blocks to replay after them, over and over). The encoder's
    table at the end of a cycle over the paths repeats one it had at the end of an earlier
    cycle (nghttp2's shape from the first cycle on: only ``:path`` is not indexed; Go's after
    a period of a few cycles, its table turning over): the cycles up to that earlier end are
    the warm-up, the ones since are replayed. The encoding, the ``hpack`` library's Python,
    is then the same whatever ``--count`` is: the subtraction of two runs leaves it out."""
    import hpack

    encoder = hpack.Encoder()
    blocks: list[bytes] = []
    seen: dict[tuple, int] = {}
    while True:
        state = tuple(encoder.header_table.dynamic_entries)
        if state in seen:
            return blocks[:seen[state]], blocks[seen[state]:]
        seen[state] = len(blocks)
        blocks += [encoder.encode(_fields(path, client), huffman=True) for path in paths]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--client", choices=("h2load", "go"), default="h2load")
    parser.add_argument("--profile", action="store_true", help="cProfile's top 25 functions")
    parser.add_argument("--memory", action="store_true",
                        help="instead of pushes: each connection opens --streams streams whose "
                             "body never comes; Python bytes allocated per open stream "
                             "(tracemalloc)")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    from rawsse.config import ServeConfig
    from rawsse.h2 import huffman
    from rawsse.load.loadgen import fleet_token
    from rawsse.server.worker import Worker

    huffman.prepare()  # as the server's master does before it forks: not a push's cost
    worker = Worker(ServeConfig(keepalive=0, max_pending=10**7))

    tokens = [fleet_token(i) for i in range(args.devices)]
    devices = select.epoll()
    device_socks = {}
    for token in tokens:
        device = connect(worker)
        device.send(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        devices.register(device.fileno(), select.EPOLLIN)
        device_socks[device.fileno()] = device
    paths = [b"/3/device/" + token.encode() for token in tokens]
    senders = [Sender(connect(worker), paths[i::args.connections] or paths, args.client)
               for i in range(args.connections)]
    for _ in range(5):
        worker.loop.run_once()
        _drain_devices(devices, device_socks)

    if args.memory:
        return _memory(worker, senders, args.streams)

    def run() -> int:
        answered = 0
        while answered < args.count:
            for sender in senders:
                room = args.streams - sender.in_flight
                if room > 0:
                    sender.sock.sendall(b"".join(sender.request() for _ in range(room)))
            worker.loop.run_once()
            for sender in senders:
                answered += sender.answered()
            _drain_devices(devices, device_socks)
        return answered

    start = time.process_time()
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        answered = profiler.runcall(run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        answered = run()
    cpu = time.process_time() - start
    print(f"{cpu / answered * 1e6:.2f} us CPU per push ({answered} pushes, {args.client})")
    return 0


def _memory(worker: Any, senders: list[Sender], streams: int) -> int:
    """Bytes per open stream: each sender's requests without their DATA (HEADERS without
    END_STREAM), read by the worker, tracemalloc's traced bytes before and after."""
    import gc
    import tracemalloc

    tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for sender in senders:
        for _ in range(streams):
            sender.sock.sendall(sender.request()[:-(9 + len(BODY))])  # HEADERS alone
            if sender.in_flight % 100 == 0:
                worker.loop.run_once()
    for _ in range(5):
        worker.loop.run_once()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    opened = sum(len(getattr(handler, "streams", ())) for handler in worker.loop.handlers
                 if type(handler).__name__ == "H2Connection")
    print(f"{(after - before) / opened:.0f} B per open stream ({opened} streams, "
          f"{len(senders)} connections)")
    return 0


def _drain_devices(devices: select.epoll, socks: dict[int, socket.socket]) -> None:
    for fd, _ in devices.poll(0):
        drain(socks[fd])


if __name__ == "__main__":
    raise SystemExit(main())
