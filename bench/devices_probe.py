"""CPU per event read by ``rawsse devices``: a probe for the device side of a broadcast.

One process runs one ``DeviceGroup`` whose devices hold the client ends of socketpairs (no
connect, no server): the probe writes each stream's SSE head, then ``--count`` rounds of one
stamped broadcast event to every stream (the bytes rawsse's ``sse.encode_event`` makes), and
turns the devices' loop until every event of the round was counted. It prints CPU microseconds
per event, the devices' own figure in every fan-out measurement (``bench/run.py`` runs them on
the same cores as the server). ``--burst K`` writes K events to each stream before the devices
read, as when a device process falls behind (several events in one read).

Wall and CPU times are noisy on a shared VM; instruction counts are not, so compare two trees
with callgrind, subtracting a short run to leave out start-up::

    for n in 2 12; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/devices_probe.py --root TREE --count $n 2>&1 | grep Collected; done
    # (instructions at 12 - instructions at 2) / (10 x --devices) = instructions per event

The probe's own writes are in the count too (one ``os.write`` per stream per round, the same in
both trees).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 1000\n\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--count", type=int, default=20, help="broadcast rounds")
    parser.add_argument("--devices", type=int, default=1_000, help="streams")
    parser.add_argument("--burst", type=int, default=1, help="events per stream per round")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    from rawsse.load import devices as devices_module
    from rawsse.load.stamp import new_stamped_id
    from rawsse.server.loop import Loop

    loop = Loop()
    plan = devices_module.Plan(host="127.0.0.1", port=1, base_path="", scheme="fleet",
                               token_start=0, token_seed=0, count=args.devices, processes=1,
                               sources=(), ramp=0.0, jitter=0.0, duration=3600.0,
                               connect_timeout=10.0, backoff_min=1.0, backoff_max=30.0,
                               timeline_bin=1.0, start=time.monotonic())
    group = devices_module.DeviceGroup(loop, plan, 0, args.devices)
    servers = [_attach(device, loop) for device in group.devices]
    for fd in servers:
        os.write(fd, HEAD)
    while group.connected < args.devices:
        loop.run_once()
    gc.collect()
    gc.freeze()
    start = time.process_time()
    expected = 0
    for _ in range(args.count):
        frames = b"".join(b'id: %s\nevent: ping\ndata: {"mdm":"bench"}\n\n'
                          % new_stamped_id().encode() for _ in range(args.burst))
        for fd in servers:
            os.write(fd, frames)
        expected += args.devices * args.burst
        while group.events < expected:
            loop.run_once()
    cpu = time.process_time() - start
    errors = {k: v for k, v in group.errors.items()}
    print(f"{cpu / expected * 1e6:.2f} us CPU per event ({expected} events, "
          f"{group.latency.count} latencies, {group.duplicates} duplicates, errors {errors})")
    return 0


def _attach(device: object, loop: object) -> int:
    """Give ``device`` the client end of a socketpair as if its GET had just been sent; return
    the server end's fd."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    device.sock = ours  # type: ignore[attr-defined]
    if hasattr(type(device), "fd"):  # a tree whose devices read their fd with os.read
        device.fd = ours.fileno()  # type: ignore[attr-defined]
    device.state = 2  # HEAD: device.py's states are IDLE, CONNECTING, HEAD, STREAM, STOPPED
    loop.add(ours.fileno(), device)  # type: ignore[attr-defined]
    fd = os.dup(theirs.fileno())
    theirs.close()
    return fd


if __name__ == "__main__":
    raise SystemExit(main())
