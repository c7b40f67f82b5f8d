"""CPU per pipelined push through one in-process worker: a probe for hot-path changes.

One worker (no listener), a device stream and a sender on socketpairs, N pushes sent 16 per write
with at most 64 in flight; prints CPU microseconds per push. Wall and CPU times are noisy on a
shared VM; instruction counts are not, so compare two trees with callgrind, subtracting a short
run to leave out start-up::

    for n in 100 3100; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/push_probe.py --root TREE --count $n 2>&1 | grep Collected; done
    # (instructions at 3100 - instructions at 100) / 3000 = instructions per push

``--root`` may name a checkout from before the package layout (``rawsse/worker.py``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

BATCH = 16
IN_FLIGHT = 64
TOKEN = "ab" * 32
REQUEST = (f"POST /3/device/{TOKEN} HTTP/1.1\r\nHost: x\r\napns-push-type: alert\r\n"
           "Content-Length: 22\r\n\r\n" '{"aps":{"alert":"hi"}}').encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    try:
        from rawsse.server.worker import Worker
    except ImportError:  # a tree from before the package layout
        from rawsse.worker import Worker  # type: ignore[no-redef]
    from rawsse.config import ServeConfig

    worker = Worker(ServeConfig(keepalive=0, max_pending=10**7))

    device = connect(worker)
    device.send(f"GET /events?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for _ in range(5):
        worker.loop.run_once()
    sender = connect(worker)
    sent = answered = 0
    start = time.process_time()
    while answered < args.count:
        if sent - answered < IN_FLIGHT:
            sender.send(REQUEST * BATCH)
            sent += BATCH
        worker.loop.run_once()
        answered += drain(sender).count(b"HTTP/1.1 200")
        drain(device)
    cpu = time.process_time() - start
    print(f"{cpu / answered * 1e6:.2f} us CPU per push ({answered} pushes)")
    return 0


def connect(worker: Any) -> socket.socket:
    """A client socket whose other end ``worker`` has accepted."""
    ours, theirs = socket.socketpair()
    worker.accept(os.dup(ours.fileno()), False)
    ours.close()
    theirs.setblocking(False)
    return theirs


def drain(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


if __name__ == "__main__":
    raise SystemExit(main())
