"""Server CPU per push over HTTP/2: rawsse beside a Go net/http server doing the same routes.
Writes ``bench/results/h2-vs-go.md`` and ``.json``; not a timed test.

    apt-get install -y nghttp2-client       # h2load
    python bench/h2_vs_go.py                # 30,000 pushes per run, 1,000 devices
    python bench/h2_vs_go.py --rawsse-tls   # + rawsse over TLS (needs its --tls-listen)
    git worktree add /tmp/before <commit> && python bench/h2_vs_go.py --before /tmp/before

Each server has ``--devices`` Fleet-scheme devices connected (SSE over HTTP/1.1, read by
one process), and nghttp2's ``h2load`` posts pushes spread over them (``-i``, one URI per device):
``h2load -c 5 -m 100`` over TLS to Go, over h2c (and with ``--rawsse-tls`` over TLS) to one
rawsse worker, and ``h2load --h1 -c 5 -m 16`` (HTTP/1.1 pipelined) to rawsse for reference.
CPU per push = CPU time of the server's processes over the run (``/proc/PID/task/*/schedstat``,
every thread) ÷ pushes answered 2xx; it includes writing each event to its device stream.

The Go server is the seed design (``/work/shared/peers/go-seed`` by default, ``--go-seed``):
net/http with its bundled HTTP/2 over TLS (ALPN h2), one goroutine per SSE client. Its source is
copied to a temporary directory and built there with Debian's ``golang-go``, installed with
apt-get when ``go`` is missing. The certificate is a throwaway self-signed one (``openssl``);
h2load does not verify it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import time
import types

import psutil

if __package__ in (None, ""):  # ``python bench/h2_vs_go.py``: ``bench``, ``rawsse`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import load, procs  # noqa: E402
from bench.h2 import BODY, cpu_per_push, find_h2load, h2load  # noqa: E402
from rawsse.load.loadgen import fleet_token  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_SEED = "/work/shared/peers/go-seed"


def ensure_go() -> str:
    go = shutil.which("go")
    if go is None:
        print("go not found: apt-get install -y golang-go", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "golang-go"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        go = shutil.which("go")
    if go is None:
        raise RuntimeError("go still not found after installing golang-go")
    return go


def build_seed(seed: str, work: str) -> str:
    """Copy the Go source to ``work`` and build it there; the binary's path."""
    src = os.path.join(work, "go-seed")
    shutil.copytree(seed, src)
    env = dict(os.environ, GOCACHE=os.path.join(work, "gocache"), GOFLAGS="-mod=mod",
               GOPATH=os.path.join(work, "gopath"))
    subprocess.run([ensure_go(), "build", "-o", "seed", "."], cwd=src, env=env, check=True)
    return os.path.join(src, "seed")


def make_cert(work: str) -> tuple[str, str]:
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def write_uris(path: str, base: str, devices: int) -> str:
    with open(path, "w") as out:
        out.writelines(f"{base}/3/device/{fleet_token(i)}\n" for i in range(max(1, devices)))
    return path


def hold_devices(port: int, count: int) -> None:
    """In a child process: ``count`` device streams (``GET /events``), every byte read and
    dropped until SIGTERM. Not ``rawsse devices``: it does not read Go's chunked SSE streams,
    and reading is all a device must do here (one reader for both servers)."""
    selector = selectors.DefaultSelector()
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"GET /events?token={fleet_token(i)} HTTP/1.1\r\nHost: bench\r\n\r\n"
                     .encode())
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            try:
                if not key.fileobj.recv(65536):  # type: ignore[union-attr]
                    selector.unregister(key.fileobj)
            except BlockingIOError:
                pass


def connect_devices(port: int, pids: list[int],
                    count: int) -> multiprocessing.Process | None:
    if not count:
        return None
    base = load.wait_fds_steady(pids)  # after the readiness probe's connection is gone
    child = multiprocessing.get_context("fork").Process(target=hold_devices, args=(port, count),
                                                        daemon=True)
    child.start()
    held = load.wait_for_connections(pids, base, count, 60, stall=5)
    if held < count:
        child.terminate()
        raise RuntimeError(f"only {held} of {count} devices connected")
    return child


def measure(targets: list[tuple[str, list[int], list[str]]], pushes: int,
            repeat: int) -> list[dict]:
    """For each (label, server pids, h2load command): the median of ``repeat`` runs (a shared
    VM's noise moves single runs by ±20 %); several targets take turns run by run, so a
    neighbour's load falls on each alike."""
    for _, _, command in targets:
        h2load([*command, "-n", "5000"])  # warm-up: connections, caches, Go's GC sizing
    samples: list[list[tuple[float, int, float]]] = [[] for _ in targets]
    splits: list[list[tuple[float, float]]] = [[] for _ in targets]
    for _ in range(repeat):
        for (_, pids, command), runs, split in zip(targets, samples, splits):
            before = user_system_seconds(pids)
            runs.append(cpu_per_push_pids(pids, [*command, "-n", str(pushes)]))
            after = user_system_seconds(pids)
            split.append(((after[0] - before[0]) / runs[-1][1] * 1e6,
                          (after[1] - before[1]) / runs[-1][1] * 1e6))
    rows = []
    for (label, _, command), runs, split in zip(targets, samples, splits):
        us, ok, rate = sorted(runs)[len(runs) // 2]
        user = sorted(u for u, _ in split)[len(split) // 2]
        system = sorted(k for _, k in split)[len(split) // 2]
        print(f"  {label:50s} {us:6.1f} µs CPU/push (user {user:.1f}, system {system:.1f})  "
              f"{rate:8.0f} pushes/s  (runs: {', '.join(f'{s[0]:.1f}' for s in runs)})",
              flush=True)
        rows.append({"run": label, "us_cpu_per_push": round(us, 1), "pushes_per_s": round(rate),
                     "us_user": round(user, 1), "us_system": round(system, 1),
                     "pushes_2xx": ok, "samples_us": [round(s[0], 1) for s in runs],
                     "command": " ".join(os.path.basename(c) if i == 0 else c
                                         for i, c in enumerate(command))})
    return rows


def user_system_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids`` so far, every thread (10 ms clock ticks: about
    1 % of a 30,000-push run): where the time goes, beside schedstat's finer total."""
    user = system = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        user, system = user + times.user, system + times.system
    return user, system


def cpu_per_push_pids(pids: list[int], argv: list[str]) -> tuple[float, int, float]:
    """``bench.h2.cpu_per_push`` for any processes (it reads only ``.pids``)."""
    return cpu_per_push(types.SimpleNamespace(pids=pids), argv)  # type: ignore[arg-type]


def run_go(args: argparse.Namespace, tool: str, work: str, log_dir: str) -> list[dict]:
    binary = build_seed(args.go_seed, work)
    cert, key = make_cert(work)
    http_holder, http_port = procs.reserve_port()
    tls_holder, tls_port = procs.reserve_port()
    http_holder.close()  # Go binds without SO_REUSEPORT: free the ports first
    tls_holder.close()
    go = procs.Child("go-seed", [binary, "-addr", f"127.0.0.1:{http_port}",
                                 "-tls-addr", f"127.0.0.1:{tls_port}",
                                 "-tls-cert", cert, "-tls-key", key], log_dir)
    devices = None
    try:
        _wait_http(f"http://127.0.0.1:{http_port}/stats", go)
        pids = [go.pid]
        devices = connect_devices(http_port, pids, args.devices)
        uris = write_uris(os.path.join(log_dir, "go-uris.txt"), f"https://127.0.0.1:{tls_port}",
                          args.devices)
        common = ["-d", os.path.join(log_dir, "body.json"), "-i", uris]
        return measure([("Go net/http, HTTP/2 over TLS  h2load -c 5 -m 100", pids,
                         [tool, "-c", "5", "-m", "100", *common])], args.pushes, args.repeat)
    finally:
        if devices is not None:
            devices.terminate()
        go.stop()


class Rawsse:
    """One rawsse server (one worker) from the checkout ``root``, its devices and its runs."""

    def __init__(self, args: argparse.Namespace, tool: str, work: str, log_dir: str,
                 root: str, name: str) -> None:
        self.name = name
        holder, port = procs.reserve_port()
        self.holders = [holder]
        extra = ["--keepalive", "0"]
        tls_port = 0
        if args.rawsse_tls:
            cert, key = make_cert(work)
            tls_holder, tls_port = procs.reserve_port()
            tls_holder.close()
            extra += ["--tls-listen", f"127.0.0.1:{tls_port}", "--tls-cert", cert,
                      "--tls-key", key]
        self.server = procs.Server("rawsse", 1, "127.0.0.1", port, log_dir, extra,
                                   root=root).wait_ready()
        self.devices = connect_devices(port, self.server.pids, args.devices)
        body = ["-d", os.path.join(log_dir, "body.json")]
        plain = body + ["-i", write_uris(os.path.join(log_dir, f"uris-{port}.txt"),
                                         self.server.url, args.devices)]
        self.runs = [("h2c  h2load -c 5 -m 100", [tool, "-c", "5", "-m", "100", *plain])]
        if tls_port:
            tls = body + ["-i", write_uris(os.path.join(log_dir, f"tls-uris-{port}.txt"),
                                           f"https://127.0.0.1:{tls_port}", args.devices)]
            self.runs.append(("HTTP/2 over TLS  h2load -c 5 -m 100",
                              [tool, "-c", "5", "-m", "100", *tls]))
        self.runs.append(("HTTP/1.1 pipelined  h2load --h1 -c 5 -m 16",
                          [tool, "--h1", "-c", "5", "-m", "16", *plain]))

    def stop(self) -> None:
        if self.devices is not None:
            self.devices.terminate()
        self.server.stop()
        for holder in self.holders:
            holder.close()


def run_rawsse(args: argparse.Namespace, tool: str, work: str, log_dir: str) -> list[dict]:
    """Each run on this checkout's rawsse and, with ``--before TREE``, the same run on TREE's
    right after it, round by round."""
    trees = [(procs.ROOT, "rawsse")]
    if args.before:
        trees.append((os.path.abspath(args.before), f"rawsse {_revision(args.before)} (before)"))
    servers: list[Rawsse] = []
    try:
        for root, name in trees:
            servers.append(Rawsse(args, tool, work, log_dir, root, name))
        rows = []
        for i, (label, _) in enumerate(servers[0].runs):
            rows += measure([(f"{s.name}, {label}", s.server.pids, s.runs[i][1])
                             for s in servers], args.pushes, args.repeat)
        return rows
    finally:
        for server in servers:
            server.stop()


def _revision(tree: str) -> str:
    result = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)
    return result.stdout.strip() or os.path.basename(os.path.abspath(tree))


def _wait_http(url: str, child: procs.Child, timeout: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise RuntimeError(f"{child.name} exited:\n{child.output_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} not answering {url}")


def write_results(rows: list[dict], args: argparse.Namespace, argv: list[str],
                  log_dir: str) -> None:
    for row in rows:  # the run's temporary directory, named once
        row["command"] = row["command"].replace(log_dir, "$LOGS")
    command = "python bench/h2_vs_go.py " + " ".join(argv)
    doc = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
           "devices": args.devices, "pushes_per_run": args.pushes, "runs": rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "h2-vs-go.json"), "w") as out:
        json.dump(doc, out, indent=2)
        out.write("\n")
    go = next((r["us_cpu_per_push"] for r in rows if r["run"].startswith("Go")), None)
    lines = [
        "# HTTP/2 push CPU: rawsse beside Go net/http", "",
        f"`{doc['command']}` on {doc['date']}, {doc['machine']}; {args.devices} devices "
        f"connected (SSE), pushes spread over them, the median of {args.repeat} runs of "
        f"{args.pushes} pushes after a 5,000-push warm-up. CPU per push = server CPU time "
        "(every thread, schedstat) ÷ 2xx answers; rawsse runs one worker, Go uses every core "
        "it wants. `$LOGS`: the run's temporary directory (body, one URI per device).", "",
        "| run | µs CPU / push | × Go | user / system µs | pushes/s | runs (µs) | command |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['us_cpu_per_push'] / go:.2f}" if go else "-"
        runs = ", ".join(map(str, r["samples_us"]))
        lines.append(f"| {r['run'].split('  ')[0]} | {r['us_cpu_per_push']} | {ratio} | "
                     f"{r['us_user']} / {r['us_system']} | {r['pushes_per_s']} | {runs} | "
                     f"`{r['command']}` |")
    with open(os.path.join(RESULTS, "h2-vs-go.md"), "w") as out:
        out.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=30_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is kept")
    parser.add_argument("--go-seed", default=DEFAULT_SEED, help="the Go server's source directory")
    parser.add_argument("--rawsse-tls", action="store_true",
                        help="also measure rawsse over TLS (--tls-listen, --tls-cert, --tls-key)")
    parser.add_argument("--no-go", action="store_true", help="rawsse only")
    parser.add_argument("--before", metavar="TREE",
                        help="also run rawsse from the checkout TREE (a worktree of an older "
                             "commit), each run right after this checkout's: a before/after "
                             "comparison under the same neighbours' load")
    args = parser.parse_args(argv)
    tool = find_h2load()
    if tool is None:
        return 2
    log_dir = procs.make_log_dir("rawsse-h2-go-bench-")
    with open(os.path.join(log_dir, "body.json"), "wb") as out:
        out.write(BODY)
    print(f"{args.devices} devices connected, {args.pushes} pushes per run", flush=True)
    rows = [] if args.no_go else run_go(args, tool, log_dir, log_dir)
    rows += run_rawsse(args, tool, log_dir, log_dir)
    write_results(rows, args, argv, log_dir)
    print(f"results: {RESULTS}/h2-vs-go.md; logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
