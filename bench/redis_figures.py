"""Redis mode figures: Redis commands and round trips per push, cross-node pushes/s, memory per
pending push and per connected device, and what a broadcast to both nodes costs.

    python bench/redis_figures.py                      # ~1 minute on 2 cores
    python bench/redis_figures.py --devices 2000 --pushes 20000 --pending 100000

Starts its own ``redis-server`` (``--save '' --appendonly no``, a free loopback port), two nodes
``a`` and ``b`` (``rawsse serve --redis … --workers 2``), ``rawsse devices`` on node b and
``rawsse push`` to node a (5 keep-alive senders), and reads Redis's ``INFO commandstats`` /
``INFO memory`` and each agent's batch counters (``/stats`` ``redis.batches``: one batch = one
round trip) around each phase. Every child is ended by its PID; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from typing import Any

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.procs import Child, Server, make_log_dir, reserve_port, run_to_end  # noqa: E402

PREFIX = "bench:"


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def start_redis(log_dir: str) -> tuple[Child, redis.Redis]:
    port = free_port()
    server = Child("redis", [shutil.which("redis-server") or "/usr/bin/redis-server",
                             "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], log_dir)
    client = redis.Redis(port=port, socket_timeout=10)
    wait(lambda: client.ping(), "redis-server up", exceptions=(redis.RedisError,))
    return server, client


def wait(predicate: Any, what: str, timeout: float = 60.0,
         exceptions: tuple[type[BaseException], ...] = (OSError,)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except exceptions:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for: {what}")


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): fields["calls"]
            for name, fields in client.info("commandstats").items()}


def agent(node: Server) -> dict[str, Any]:
    return node.stats()["redis"]


class Phase:
    """Redis commands (by name) and each agent's round trips (batches) over one phase, less the
    agents' own 2-second bookkeeping (stats writes, node list) measured while idle."""

    background: dict[str, float] = {}  # per second: "cmd:<name>" and "rt:<node>"

    def __init__(self, client: redis.Redis, nodes: dict[str, Server]) -> None:
        self.client, self.nodes = client, nodes
        self.calls = commandstats(client)
        self.batches = {name: agent(node)["batches"] for name, node in nodes.items()}
        self.started = time.monotonic()

    def deltas(self) -> tuple[dict[str, int], dict[str, int], float]:
        calls = commandstats(self.client)
        commands = {k: v - self.calls.get(k, 0) for k, v in calls.items()
                    if v != self.calls.get(k, 0) and k != "config|resetstat" and k != "info"}
        batches = {name: agent(node)["batches"] - self.batches[name]
                   for name, node in self.nodes.items()}
        return commands, batches, time.monotonic() - self.started

    @classmethod
    def calibrate(cls, client: redis.Redis, nodes: dict[str, Server], seconds: float) -> None:
        phase = cls(client, nodes)
        time.sleep(seconds)
        commands, batches, elapsed = phase.deltas()
        cls.background = {**{f"cmd:{k}": v / elapsed for k, v in commands.items()},
                          **{f"rt:{k}": v / elapsed for k, v in batches.items()}}

    def end(self, count: int) -> dict[str, Any]:
        commands, batches, elapsed = self.deltas()
        bg = self.background
        net = {k: max(0.0, v - bg.get(f"cmd:{k}", 0.0) * elapsed) for k, v in commands.items()}
        trips = {k: max(0.0, v - bg.get(f"rt:{k}", 0.0) * elapsed) for k, v in batches.items()}
        return {"count": count, "seconds": round(elapsed, 1),
                "redis_commands_per_item": {k: round(v / count, 3) for k, v in net.items()
                                            if v / count >= 0.001},
                "round_trips_per_item": {f"node {k}": round(v / count, 4) for k, v in trips.items()}}


def push(url: str, tokens: str, count: int, log_dir: str, name: str, pipeline: int = 1,
         extra: list[str] | None = None) -> dict[str, Any]:
    report = os.path.join(log_dir, f"{name}.json")
    code, tail = run_to_end(name, [sys.executable, "-m", "rawsse", "push", "--url", url,
                                   "--tokens", tokens, "--senders", "5", "--pipeline",
                                   str(pipeline), "--count", str(count), "--quiet",
                                   "--report", report, *(extra or [])], log_dir, timeout=300)
    with open(report) as f:
        result = json.load(f)
    if code != 0 or result.get("statuses", {}).get("200") != count:
        raise RuntimeError(f"{name}: exit {code}, {result.get('statuses')}\n{tail}")
    return {"per_second": result["per_second"], "p50_ms": result["latency_ms"]["p50"],
            "p99_ms": result["latency_ms"]["p99"]}


def broadcasts(taker: Server, count: int, devices: int) -> dict[str, Any]:
    """``count`` broadcasts taken by ``taker``, one at a time, each answered only once both
    nodes wrote it (every device is on node b); answer latency and what every answer said."""
    latencies = []
    for n in range(count):
        request = urllib.request.Request(taker.url + "/broadcast", data=b'{"aps":{}}',
                                         method="POST")
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
        latencies.append(time.perf_counter() - started)
        if answer["missing"] or answer["nodes"]["b"]["streams"] != devices:
            raise RuntimeError(f"broadcast {n} from {taker.url}: {answer}")
    latencies.sort()
    return {"answer_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
            "answer_max_ms": round(1000 * latencies[-1], 2), "streams_each": devices}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=10000)
    parser.add_argument("--pending", type=int, default=100000)
    parser.add_argument("--broadcasts", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", help="write the JSON here too")
    args = parser.parse_args()
    log_dir = make_log_dir("rawsse-redis-figures-")
    children: list[Child] = []
    holders = []
    try:
        redis_server, client = start_redis(log_dir)
        children.append(redis_server)
        url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}"
        nodes: dict[str, Server] = {}
        for name in ("a", "b"):
            holder, port = reserve_port()
            holders.append(holder)
            node = Server("rawsse", args.workers, "127.0.0.1", port, log_dir,
                          ["--keepalive", "0", "--redis", url, "--node-id", name,
                           "--redis-prefix", PREFIX, "--max-connections", "100000"])
            children.append(node)
            nodes[name] = node.wait_ready()
            wait(lambda node=node: agent(node)["up"] == 1, f"node {name} connected to Redis")
        a, b = nodes["a"], nodes["b"]
        Phase.calibrate(client, nodes, 6.0)
        figures: dict[str, Any] = {"devices": args.devices, "workers": args.workers}

        memory0, keys0 = client.info("memory")["used_memory"], client.dbsize()
        phase = Phase(client, nodes)
        devices = Child("devices", [sys.executable, "-m", "rawsse", "devices", "--url", b.url,
                                    "--count", str(args.devices), "--ramp", "0", "--duration",
                                    "600", "--quiet"], log_dir)
        children.append(devices)
        wait(lambda: b.stats()["node"]["redis_routing"]["claimed"] >= args.devices,
             "devices claimed")
        figures["connect"] = phase.end(args.devices)
        owner_bytes = client.info("memory")["used_memory"] - memory0
        figures["redis_bytes_per_connected_device"] = round(owner_bytes / args.devices)
        figures["owner_keys"] = client.dbsize() - keys0

        for name, taker in (("broadcast_from_a", a), ("broadcast_from_b", b)):
            phase = Phase(client, nodes)
            figures[name] = {**broadcasts(taker, args.broadcasts, args.devices),
                             **phase.end(args.broadcasts)}

        tokens = f"fleet:0-{args.devices - 1}"
        phase = Phase(client, nodes)
        figures["cross_node"] = {**push(a.url, tokens, args.pushes, log_dir, "push-cross"),
                                 **phase.end(args.pushes)}
        phase = Phase(client, nodes)
        figures["cross_node_pipelined_16"] = {
            **push(a.url, tokens, args.pushes, log_dir, "push-cross-p16", pipeline=16),
            **phase.end(args.pushes)}
        phase = Phase(client, nodes)
        figures["same_node"] = {**push(b.url, tokens, args.pushes, log_dir, "push-local"),
                                **phase.end(args.pushes)}

        memory0, keys0 = client.info("memory")["used_memory"], client.dbsize()
        phase = Phase(client, nodes)
        stored = push(a.url, f"random:{args.pending}", args.pending, log_dir, "push-offline",
                      pipeline=32, extra=["--token-seed", "7"])
        figures["offline_store"] = {**stored, **phase.end(args.pending)}
        keys = client.dbsize() - keys0
        figures["pending_keys"] = keys
        figures["redis_bytes_per_pending_push"] = round(
            (client.info("memory")["used_memory"] - memory0) / max(1, keys))
        sample = next(client.scan_iter(f"{PREFIX}pending:*", count=100))
        figures["pending_sample"] = {"key_bytes": len(sample),
                                     "value_bytes": client.strlen(sample)}
        print(json.dumps(figures, indent=2))
        if args.report:
            with open(args.report, "w") as f:
                json.dump(figures, f, indent=2)
        return 0
    finally:
        for child in reversed(children):
            child.stop(signal.SIGTERM, timeout=20)
        for holder in holders:
            holder.close()
        print(f"logs: {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
