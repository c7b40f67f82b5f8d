"""CPU per push through two in-process workers joined by the real mesh: a forwarded push beside
a local one, counted without a scheduler in the way.

Two ``NodeProcess`` workers of one node (``rawsse/node/process.py``) live in this process, each
with its own loop, joined by their real ``SOCK_SEQPACKET`` mesh; senders and one device stream
are socketpairs (no listener), and the probe turns each worker's loop when its epoll fd is ready
(``select`` on the two epoll fds: one more syscall per turn than a real worker's ``epoll_wait``,
paid per turn in every mode). ``--senders`` keep-alive senders (5, like Fleet's), one push in
flight each. Modes:

- ``local``: every sender on worker 0, the token owned by worker 0: no mesh.
- ``forwarded``: every sender on worker 0, the token owned by worker 1: every push crosses.
- ``both``: senders on both workers, each pushing to a token the other owns: PUSH and TAKEN
  records flow both ways.
- ``single``: one worker (``--workers 1``): what the mesh costs a node that has no peer.

Instructions are deterministic where CPU time is not; compare two trees (``--root``) with
callgrind, subtracting a short run to leave out start-up::

    for n in 100 3100; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/mesh_probe.py --root TREE --mode forwarded --count $n 2>&1 | grep Collected
    done   # (instructions at 3100 - instructions at 100) / 3000 = instructions per push

and syscalls the same way with ``strace -f -c``. Forwarded ÷ local is the cost ratio issue 14
asks about.
"""

from __future__ import annotations

import argparse
import gc
import os
import select
import socket
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # ``python bench/mesh_probe.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

# the bytes ``rawsse push`` sends, and the client side's socketpairs (no rawsse import)
from bench.push_probe import _answers, _read, connect, push_request  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--mode", choices=("local", "forwarded", "both", "single"),
                        default="forwarded")
    parser.add_argument("--count", type=int, default=20_000, help="pushes to answer")
    parser.add_argument("--senders", type=int, default=5, help="keep-alive connections")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    from rawsse.config import ServeConfig
    from rawsse.node.process import PEERS_GATE, NodeProcess
    from rawsse.node.routing import owner_of

    count = 1 if args.mode == "single" else 2
    config = ServeConfig(keepalive=0, max_pending=10**7)
    # The node is named after its master, and a link is admitted only from a child of it
    # (peercred.py): here both ends are this process, whose parent plays the master.
    node = os.getppid()
    part_dir = tempfile.mkdtemp(prefix="rawsse-mesh-probe-")
    workers = []
    for index in range(count):
        control, _master_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = NodeProcess(config, index, count, node, control, {},
                              f"{part_dir}/part{index}")
        process.mesh.listen()
        process.worker.release(PEERS_GATE)
        workers.append((process, _master_end))
    loops = [process.worker.loop for process, _ in workers]
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)

    def token_owned_by(owner: int) -> str:
        i = 0
        while owner_of(bytes.fromhex(f"{i:064x}"), count) != owner:
            i += 1
        return f"{i:064x}"

    # (worker a sender is on, the worker that owns its token)
    if args.mode == "local" or args.mode == "single":
        routes = [(0, 0)] * args.senders
    elif args.mode == "forwarded":
        routes = [(0, 1)] * args.senders
    else:
        routes = [(n % 2, 1 - n % 2) for n in range(args.senders)]
    tokens = {owner: token_owned_by(owner) for _, owner in routes}
    devices = []
    for owner, token in tokens.items():
        device = connect(workers[owner][0].worker)
        device.send(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        devices.append(device)
    senders = [(connect(workers[at][0].worker), push_request(tokens[owner]))
               for at, owner in routes]
    turn(loops, 0.2)
    for device in devices:
        _read(device)
    # Warm up: the first forwarded pushes of a link wait for the owner's credit.
    answered = _keepalive(loops, senders, devices, 50)
    start = time.process_time()
    answered = _keepalive(loops, senders, devices, args.count)
    cpu = time.process_time() - start
    print(f"{cpu / answered * 1e6:.2f} us CPU per push ({answered} in {args.mode} mode, "
          f"{count} workers)")
    for process, _ in workers:
        stats = process.worker.stats
        print(f"  worker {process.worker.index}: received {stats.pushes_received}, forwarded "
              f"{stats.forwarded} ({stats.forwarded_promised} promised)")
    return 0


def turn(loops: list[Any], timeout: float) -> None:
    """Turn each loop whose epoll fd has events (its poll then returns at once)."""
    ready, _, _ = select.select([loop.epoll.fileno() for loop in loops], [], [], timeout)
    for loop in loops:
        if loop.epoll.fileno() in ready:
            loop.run_once()


def _keepalive(loops: list[Any], senders: list[tuple[socket.socket, bytes]],
               devices: list[socket.socket], count: int) -> int:
    """Each sender sends its next push only once its previous one is answered."""
    for sender, request in senders:
        sender.send(request)
    answered = 0
    waiting = len(senders)
    deadline = time.monotonic() + 600
    while answered < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"stuck after {answered} pushes")
        turn(loops, 1.0)
        for sender, request in senders:
            got = _answers(sender)
            answered += got
            waiting -= got
            if got and answered + waiting < count:
                sender.send(request)
                waiting += 1
        for device in devices:
            _read(device)
    while waiting:  # the last answers, so the next run starts from none in flight
        turn(loops, 1.0)
        for sender, _ in senders:
            waiting -= _answers(sender)
    return answered


if __name__ == "__main__":
    raise SystemExit(main())
