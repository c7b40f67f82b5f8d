"""CPU per push of ``rawsse push`` itself: a probe for the load generator's hot path.

The push driver of ``--root`` (``rawsse.load.driver``) runs in this process against a peer in
the same loop that answers every request at once with the bytes of rawsse's own 200 (status
line, ``Date``, ``apns-id``, ``Content-Length: 0``), so what is counted is the sender's work plus
a peer's few calls per read, the same for every tree. Two modes, the bench's:

- ``keepalive`` (default): ``--senders`` connections (5, like Fleet's), one push in flight each.
- ``pipelined``: ``--senders`` 1 with ``--pipeline`` 16 in flight.

Prints CPU microseconds per push; noisy on a shared VM. Instruction counts are not: compare two
trees with callgrind, subtracting a short run to leave out start-up::

    for n in 1000 21000; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/sender_probe.py --root TREE --count $n 2>&1 | grep Collected; done
    # (instructions at 21000 - instructions at 1000) / 20000 = instructions per push
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

ANSWER = (b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 12:15:18 GMT\r\n"
          b"apns-id: 44ec9ec7-d937-4ece-bf7b-c752ccc312f2\r\nContent-Length: 0\r\n\r\n")
REQUEST_START = b"POST "


class Peer:
    """The server end of one connection: each read's requests answered with one send."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def handle_events(self, events: int) -> None:
        data = self.sock.recv(1 << 16)
        if data:
            self.sock.send(ANSWER * data.count(REQUEST_START))

    def close(self, reason: str = "") -> None:
        self.sock.close()


class Listener:
    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.peers: list[Peer] = []

    def handle_events(self, events: int) -> None:
        conn, _ = self.sock.accept()
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = Peer(conn)
        self.peers.append(peer)
        self.loop.add(conn.fileno(), peer)

    def close(self, reason: str = "") -> None:
        self.sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--mode", choices=("keepalive", "pipelined"), default="keepalive")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--senders", type=int, default=5, help="keepalive mode's connections")
    probe = parser.parse_args()
    sys.path.insert(0, probe.root)
    from rawsse.load import driver
    from rawsse.server.loop import Loop
    try:
        from rawsse.load import push as command  # the command line, since issue 14
    except ImportError:  # a tree from before: the driver's module held it
        command = driver  # type: ignore[no-redef]

    loop = Loop()
    listener = Listener(loop)
    loop.add(listener.sock.fileno(), listener)
    port = listener.sock.getsockname()[1]
    senders, pipeline = (probe.senders, 1) if probe.mode == "keepalive" else (1, 16)
    push = argparse.ArgumentParser()
    command.add_arguments(push)
    args = push.parse_args(["--url", f"http://127.0.0.1:{port}", "--tokens", "fleet:0-999",
                            "--count", str(probe.count), "--senders", str(senders),
                            "--pipeline", str(pipeline), "--quiet"])
    command.validate(args)
    run = driver.Driver(args, loop)
    loop.call_soon(run.begin)
    start = time.process_time()
    loop.run()
    cpu = time.process_time() - start
    run.finish()
    listener.close()
    for peer in listener.peers:
        peer.close()
    accepted = run.accepted
    if accepted != probe.count:
        print(f"only {accepted} of {probe.count} pushes answered 200", file=sys.stderr)
        return 1
    print(f"{cpu / accepted * 1e6:.2f} us CPU per push ({accepted} in {probe.mode} mode, "
          "the peer's share included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
