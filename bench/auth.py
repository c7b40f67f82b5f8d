"""CPU per push with ``--auth token`` beside ``--auth off``, over h2c. Prints figures; not a test.

    python bench/auth.py                        # 30,000 pushes per run, best of 3 rounds
    python bench/auth.py --pushes 50000 --repeat 5

Two servers of one worker each, started side by side with the same flags but ``--auth``: one
``--auth off``, one ``--auth token --auth-key KEYID=AuthKey_KEYID.p8 --team-id TEAM --topics
com.example.mdm`` (a key from ``rawsse certs``). nghttp2's ``h2load -c 5 -m 100`` sends the same
requests to both, each with one ES256 JWT signed with that key in ``authorization`` and
``apns-topic``, so the bytes on the wire are identical; rounds alternate between the servers (a
shared VM's neighbours load both alike) and the lowest CPU per push of each is shown. No device
is connected (the routing and delivery CPU would only dilute the difference). CPU per push =
the server processes' CPU time over the run ÷ pushes answered 2xx (``bench/h2.py``).

On a token connection the server announces one stream until the first token is accepted, so
h2load's first wave on each connection may see a few ``REFUSED_STREAM``: those are not 2xx and
only add to the token server's CPU per push.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # ``python bench/auth.py``: make ``bench`` and ``rawsse`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import procs  # noqa: E402
from bench.h2 import BODY, cpu_per_push, find_h2load, h2load  # noqa: E402
from rawsse.load.loadgen import fleet_token  # noqa: E402

TEAM = "BENCHTEAM1"
TOPIC = "com.example.mdm"


def provider_token(p8_path: str, kid: str) -> str:
    """An ES256 JWT as client libraries build it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    with open(p8_path, "rb") as file:
        key = load_pem_private_key(file.read(), None)
    signed = (b64(json.dumps({"alg": "ES256", "kid": kid}).encode()) + b"."
              + b64(json.dumps({"iss": TEAM, "iat": int(time.time())}).encode()))
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA256())))  # type: ignore[call-arg,union-attr]
    return (signed + b"." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode()


def write_key(log_dir: str) -> tuple[str, str]:
    """(.p8 path, key id) from ``rawsse certs``."""
    certs = os.path.join(log_dir, "certs")
    subprocess.run([sys.executable, "-m", "rawsse", "certs", certs], check=True,
                   capture_output=True, env=procs.child_env())
    name = next(n for n in os.listdir(certs) if n.startswith("AuthKey_"))
    return os.path.join(certs, name), name[len("AuthKey_"):-len(".p8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    tool = find_h2load()
    if tool is None:
        return 2
    log_dir = procs.make_log_dir("rawsse-auth-bench-")
    p8, kid = write_key(log_dir)
    host = "127.0.0.1"
    variants = {"--auth off": ["--auth", "off"],
                "--auth token": ["--auth", "token", "--auth-key", f"{kid}={p8}",
                                 "--team-id", TEAM, "--topics", TOPIC]}
    holders, servers = [], {}
    try:
        for name, flags in variants.items():
            holder, port = procs.reserve_port()
            holders.append(holder)
            servers[name] = procs.Server("rawsse", 1, host, port, log_dir,
                                         ["--keepalive", "0", *flags]).wait_ready()
        body_path = os.path.join(log_dir, "body.json")
        with open(body_path, "wb") as out:
            out.write(BODY)
        headers = ["-H", f"authorization: bearer {provider_token(p8, kid)}",
                   "-H", f"apns-topic: {TOPIC}"]
        commands = {}
        for name, server in servers.items():
            uris = os.path.join(log_dir, f"uris-{len(commands)}.txt")
            with open(uris, "w") as out:
                out.writelines(f"{server.url}/3/device/{fleet_token(i)}\n" for i in range(1000))
            commands[name] = [tool, "-c", "5", "-m", "100", "-d", body_path, "-i", uris, *headers]
        print(f"rawsse, 1 worker each, no device, h2load -c 5 -m 100 over h2c, {args.pushes} "
              f"pushes per run, best of {args.repeat} alternating rounds")
        best: dict[str, tuple[float, int, float]] = {}
        for _ in range(args.repeat):
            for name, command in commands.items():
                h2load([*command, "-n", "5000"])  # warm-up
                figures = cpu_per_push(servers[name], [*command, "-n", str(args.pushes)])
                if name not in best or figures[0] < best[name][0]:
                    best[name] = figures
        for name, (us, ok, rate) in best.items():
            print(f"  {name:14s} {us:6.1f} µs CPU/push  {rate:8.0f} pushes/s  ({ok} 2xx)")
        ratio = best["--auth token"][0] / best["--auth off"][0]
        print(f"  token / off: {ratio:.3f}")
    finally:
        for server in servers.values():
            server.stop()
        for holder in holders:
            holder.close()
    print(f"logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
