"""CPU per pipelined push through one in-process worker: a probe for hot-path changes.

One worker (no listener), a device stream and a sender on socketpairs, N pushes sent 16 per write
with at most 64 in flight; prints CPU microseconds per push. Wall and CPU times are noisy on a
shared VM; instruction counts are not, so compare two trees with callgrind, subtracting a short
run to leave out start-up::

    for n in 100 3100; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/push_probe.py --root TREE --count $n 2>&1 | grep Collected; done
    # (instructions at 3100 - instructions at 100) / 3000 = instructions per push

``--root`` may name a checkout from before the package layout (``rawsse/worker.py``).

``--auth off`` and ``--auth token`` send the same pushes with an ``authorization: bearer <JWT>``
and an ``apns-topic``; ``token`` checks them (a key made on the spot, the signature verified
once on the connection), ``off`` does not: the difference is provider authentication's cost per
push.
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
    parser.add_argument("--auth", choices=["off", "token"],
                        help="send a provider token and a topic with each push; check them or not")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    try:
        from rawsse.server.worker import Worker
    except ImportError:  # a tree from before the package layout
        from rawsse.worker import Worker  # type: ignore[no-redef]
    from rawsse.config import ServeConfig

    request = REQUEST
    auth: dict = {}
    if args.auth:
        kid, pem, token = _provider_token()
        request = REQUEST.replace(b"Host: x\r\n", b"Host: x\r\nauthorization: bearer "
                                  + token + b"\r\napns-topic: com.example.app\r\n")
        if args.auth == "token":
            auth = {"auth": "token", "auth_keys": ((kid, pem),), "topics": ("com.example.app",)}
    worker = Worker(ServeConfig(keepalive=0, max_pending=10**7, **auth))

    device = connect(worker)
    device.send(f"GET /events?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for _ in range(5):
        worker.loop.run_once()
    sender = connect(worker)
    sent = answered = 0
    start = time.process_time()
    while answered < args.count:
        if sent - answered < IN_FLIGHT:
            sender.send(request * BATCH)
            sent += BATCH
        worker.loop.run_once()
        answered += drain(sender).count(b"HTTP/1.1 200")
        drain(device)
    cpu = time.process_time() - start
    print(f"{cpu / answered * 1e6:.2f} us CPU per push ({answered} pushes)")
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
