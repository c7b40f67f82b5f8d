"""CPU per push through one in-process worker: a probe for hot-path changes.

One worker (no listener), device streams and senders on socketpairs; prints CPU microseconds
per push (or per stream written, for a broadcast). Three modes:

- ``pipelined`` (default): one sender, pushes sent 16 per write with at most 64 in flight.
- ``keepalive``: ``--senders`` connections (5, like Fleet's), each with one push in flight: a
  request per read and an answer per read, the bench's "5 keep-alive senders".
- ``broadcast``: ``--devices`` streams (1,000 by default) and one sender posting
  ``/broadcast`` with one request in flight; the figure is per stream written.

Wall and CPU times are noisy on a shared VM; instruction counts are not, so compare two trees
with callgrind, subtracting a short run to leave out start-up::

    for n in 100 3100; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/push_probe.py --root TREE --mode keepalive --count $n 2>&1 | grep Collected; done
    # (instructions at 3100 - instructions at 100) / 3000 = instructions per push

``--root`` may name a checkout from before the package layout (``rawsse/worker.py``).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from typing import Any

BATCH = 16
IN_FLIGHT = 64
TOKEN = "ab" * 32


def push_request(token: str, extra: str = "") -> bytes:
    """The bytes ``rawsse push`` sends by default: Go net/http's request for Fleet's client
    (``rawsse/load/pushrequest.py``), stamped with an ``Apns-Id``; ``extra``: more header lines."""
    return (f"POST /3/device/{token} HTTP/1.1\r\nHost: 127.0.0.1:8378\r\n{extra}"
            "User-Agent: Go-http-client/1.1\r\nContent-Length: 25\r\n"
            "Apns-Id: 0190f5c2-7a6b-7c3d-8e9f-0a1b2c3d4e5f\r\n"
            "Content-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
            '{"mdm":"pushmagicABC123"}').encode()


BROADCAST_REQUEST = (b"POST /broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 22\r\n\r\n"
                     b'{"aps":{"alert":"hi"}}')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--mode", choices=("pipelined", "keepalive", "broadcast"),
                        default="pipelined")
    parser.add_argument("--count", type=int, default=20_000,
                        help="pushes to answer (broadcast mode: broadcasts)")
    parser.add_argument("--senders", type=int, default=5, help="keepalive mode's connections")
    parser.add_argument("--devices", type=int, default=1_000, help="broadcast mode's streams")
    parser.add_argument("--auth", choices=["off", "token"],
                        help="send a provider token and a topic with each push; check them or not")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    try:
        from rawsse.server.worker import Worker
    except ImportError:  # a tree from before the package layout
        from rawsse.worker import Worker  # type: ignore[no-redef]
    from rawsse.config import ServeConfig

    request = push_request(TOKEN)
    auth: dict = {}
    if args.auth:
        kid, pem, jwt = _provider_token()
        request = push_request(TOKEN, f"authorization: bearer {jwt.decode()}\r\n"
                                      "apns-topic: com.example.app\r\n")
        if args.auth == "token":
            auth = {"auth": "token", "auth_keys": ((kid, pem),), "topics": ("com.example.app",)}
    worker = Worker(ServeConfig(keepalive=0, max_pending=10**7, **auth))
    # The garbage collector as Worker.start sets it (without its once-a-second tick, whose count
    # would depend on how slowly the run goes, as under callgrind).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)
    if args.mode == "broadcast":
        tokens = ["%064x" % (i + 1) for i in range(args.devices)]
    else:
        tokens = [TOKEN]
    devices = [connect(worker) for _ in tokens]
    for device, token in zip(devices, tokens):
        device.send(f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for _ in range(5):
        worker.loop.run_once()
    for device in devices:
        _read(device)
    start = time.process_time()
    if args.mode == "pipelined":
        done = _pipelined(worker, connect(worker), devices[0], request, args.count)
    elif args.mode == "keepalive":
        senders = [connect(worker) for _ in range(args.senders)]
        done = _keepalive(worker, senders, devices[0], request, args.count)
    else:
        done = _broadcast(worker, connect(worker), devices, args.count)
    cpu = time.process_time() - start
    what = "stream written" if args.mode == "broadcast" else "push"
    print(f"{cpu / done * 1e6:.2f} us CPU per {what} ({done} in {args.mode} mode)")
    return 0


def _provider_token() -> tuple[str, bytes, bytes]:
    """(key id, .p8 PEM, ES256 JWT signed with it)."""
    import base64
    import json

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signed = (b64(json.dumps({"alg": "ES256", "kid": "PROBEKEY01"}).encode()) + b"."
              + b64(json.dumps({"iss": "PROBETEAM1", "iat": int(time.time())}).encode()))
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA256())))
    return "PROBEKEY01", pem, signed + b"." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _pipelined(worker: Any, sender: socket.socket, device: socket.socket, request: bytes,
               count: int) -> int:
    request *= BATCH
    sent = answered = 0
    while answered < count:
        if sent - answered < IN_FLIGHT:
            sender.send(request)
            sent += BATCH
        worker.loop.run_once()
        answered += _answers(sender)
        _read(device)
    return answered


def _keepalive(worker: Any, senders: list[socket.socket], device: socket.socket,
               request: bytes, count: int) -> int:
    """Each sender sends its next push only once its previous one is answered."""
    for sender in senders:
        sender.send(request)
    answered = 0
    waiting = len(senders)
    while answered < count:
        worker.loop.run_once()
        for sender in senders:
            got = _answers(sender)
            answered += got
            waiting -= got
            if got and answered + waiting < count:
                sender.send(request)
                waiting += 1
        _read(device)
    return answered


def _broadcast(worker: Any, sender: socket.socket, devices: list[socket.socket],
               count: int) -> int:
    written = 0
    for _ in range(count):
        sender.send(BROADCAST_REQUEST)
        answer = b""
        while b"streams" not in answer:
            worker.loop.run_once()
            answer += bytes(_BUFFER[:_read(sender)])
        written += int(answer.rsplit(b'"streams":', 1)[1].split(b",", 1)[0].rstrip(b"}"))
        for device in devices:
            _read(device)
    return written


def connect(worker: Any) -> socket.socket:
    """A client socket whose other end ``worker`` has accepted."""
    ours, theirs = socket.socketpair()
    worker.accept(os.dup(ours.fileno()), False)
    ours.close()
    theirs.setblocking(False)
    return theirs


# The client side reads into one buffer, once per socket per turn (a socketpair's recv takes
# everything queued), so that its share of the instructions counted stays small and the same.
_BUFFER = bytearray(1 << 20)


def _read(sock: socket.socket) -> int:
    try:
        return sock.recv_into(_BUFFER)
    except BlockingIOError:
        return 0


def _answers(sock: socket.socket) -> int:
    return _BUFFER.count(b"HTTP/1.1 200", 0, _read(sock))


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
