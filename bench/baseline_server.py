"""The comparison baseline: the same routes and wire format as rawsse, on asyncio + uvloop.

Theory of operation
-------------------
This is what uvloop and httptools lead one to write without a hand-made epoll loop: one
``asyncio.Protocol`` per connection (not streams: a StreamReader/Writer and a task per connection
cost ~4 KB more, measured as RSS growth over 15,000 idle connections, 5.2-5.8 KB against
1.35-2.6 KB, and would make the comparison unfair), the
httptools parser as the request callbacks, and preformatted, shared frame bytes. It is kept lean on
purpose so that the bench compares two honest designs, not a strawman:

- ``__slots__`` on the Protocol (asyncio's BaseProtocol declares ``__slots__ = ()``, so they work);
- the httptools parser is dropped once a connection becomes an SSE stream (+0.66 KB if kept,
  the RSS growth of 50,000 parsers), exactly as rawsse does;
- one keepalive sweep for all streams every ``--keepalive`` seconds instead of a timer per stream;
- a broadcast frame is one bytes object written to every transport.

What it leaves out (not needed to compare memory, fan-out and push cost): apns-* header checks other
than apns-id/apns-expiration, faults, delays, admin routes, /metrics, slow-reader caps (uvloop
buffers without bound), and routing between workers. With ``--workers N`` each forked worker binds
its own ``SO_REUSEPORT`` listener and keeps its own registry, so a push reaches a device only when
the kernel happened to give both connections to the same worker; memory per connection does not
depend on that, delivery figures do, so the bench measures fan-out on one worker only.

Run: ``python bench/baseline_server.py --listen 127.0.0.1:8379 [--workers N] [--keepalive 15]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import sys
import time
import uuid
from typing import Any, Callable

import httptools

new_event_loop: Callable[[], asyncio.AbstractEventLoop]
try:
    import uvloop
    new_event_loop = uvloop.new_event_loop
    LOOP_NAME = "uvloop"
except ImportError:  # pragma: no cover - the [bench] extra installs it; /stats says which ran
    new_event_loop = asyncio.new_event_loop
    LOOP_NAME = "asyncio"

# ---- preformatted bytes (shared by every connection) ----

SSE_HEAD = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\n"
            b"Connection: close\r\n\r\n")
KEEPALIVE_FRAME = b": keepalive\n\n"
RETRY_MS = 5000
# Jittered reconnection times, preformatted: a device picks one at connect, so a restart does not
# bring every device back in the same second, without formatting bytes per connection.
SSE_PREAMBLES = tuple(SSE_HEAD + b"retry: %d\n\n" % (RETRY_MS + jitter)
                      for jitter in range(0, RETRY_MS // 2, RETRY_MS // 16))
HEALTHZ = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
DEFAULT_TTL_SECONDS = 24 * 3600.0
MAX_PAYLOAD = 4096
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
STATUS_TEXT = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
               413: b"Payload Too Large"}


def encode_event(apns_id: bytes, payload: bytes) -> bytes:
    """One SSE event: ``id:``, ``event: ping``, a ``data:`` line per payload line, blank line."""
    lines = payload.replace(b"\r\n", b"\n").split(b"\n")
    return (b"id: " + apns_id + b"\nevent: ping\n"
            + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n")


def json_response(status: int, body: dict[str, Any], apns_id: bytes | None = None,
                  keep_alive: bool = True) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = [b"HTTP/1.1 %d %s" % (status, STATUS_TEXT.get(status, b"Error")),
            b"Content-Type: application/json", b"Content-Length: %d" % len(data)]
    if apns_id:
        head.append(b"apns-id: " + apns_id)
    if not keep_alive:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + data


def push_ok(apns_id: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\napns-id: " + apns_id + b"\r\nContent-Length: 0\r\n\r\n"


def normalise_token(raw: bytes) -> bytes | None:
    """Non-empty, even-length hex, lower-cased; ``None`` when malformed."""
    if not raw or len(raw) % 2 or not HEX_DIGITS.issuperset(raw):
        return None
    return raw.lower()


# ---- node state (one per process) ----

class Node:
    """Streams by token, pending pushes, counters. No I/O beyond ``transport.write``."""

    __slots__ = ("streams", "pending", "counters", "started")

    def __init__(self) -> None:
        self.streams: dict[bytes, Connection] = {}
        # token -> (frame, expires_at monotonic); one per token, newest wins (APNs coalescing:
        # Apple, "Sending notification requests to APNs").
        self.pending: dict[bytes, tuple[bytes, float]] = {}
        self.counters = {"pushes": 0, "delivered_live": 0, "delivered_on_connect": 0,
                         "stored": 0, "broadcasts": 0, "broadcast_writes": 0, "takeovers": 0,
                         "broadcast_write_us": 0}  # time in the write loop, as rawsse counts it
        self.started = time.time()

    def attach(self, token: bytes, conn: "Connection") -> None:
        previous = self.streams.get(token)
        if previous is not None:
            self.counters["takeovers"] += 1
            previous.transport.close()
        self.streams[token] = conn
        stored = self.pending.pop(token, None)
        if stored is not None and stored[1] > time.monotonic():
            conn.transport.write(stored[0])
            self.counters["delivered_on_connect"] += 1

    def detach(self, token: bytes, conn: "Connection") -> None:
        if self.streams.get(token) is conn:
            del self.streams[token]

    def push(self, token: bytes, frame: bytes, ttl: float) -> None:
        self.counters["pushes"] += 1
        conn = self.streams.get(token)
        if conn is not None:
            conn.transport.write(frame)
            self.counters["delivered_live"] += 1
        elif ttl > 0:
            self.pending[token] = (frame, time.monotonic() + ttl)
            self.counters["stored"] += 1

    def broadcast(self, frame: bytes, prefix: bytes) -> int:
        written = 0
        started = time.perf_counter()
        for token, conn in self.streams.items():
            if token.startswith(prefix):
                conn.transport.write(frame)
                written += 1
        self.counters["broadcast_write_us"] += int((time.perf_counter() - started) * 1e6)
        self.counters["broadcasts"] += 1
        self.counters["broadcast_writes"] += written
        return written

    def stats(self) -> dict[str, Any]:
        return {"server": f"baseline-asyncio-{LOOP_NAME}", "pid": os.getpid(),
                "connections": len(self.streams), "pending": len(self.pending),
                "uptime_s": round(time.time() - self.started, 3), **self.counters}

    async def keepalive_sweep(self, interval: float) -> None:
        """One timer for every stream (a timer per stream would cost a handle each)."""
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.streams.values()):
                conn.transport.write(KEEPALIVE_FRAME)


NODE = Node()


# ---- the connection: asyncio Protocol + httptools callbacks ----

class Connection(asyncio.Protocol):
    """A client connection: HTTP/1.1 requests until it asks for ``/events``, then a stream."""

    # per connection
    __slots__ = ("transport", "parser", "token",
                 # per request (cleared after each message)
                 "url", "headers", "body")

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at connect
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.token: bytes | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.token is not None:
            NODE.detach(self.token, self)
        self.parser = None

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # a stream: whatever the device sends is ignored
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reply_and_close(json_response(400, {"reason": "BadRequest"}, keep_alive=False))
        except httptools.HttpParserError:
            self.reply_and_close(json_response(400, {"reason": "BadRequest"}, keep_alive=False))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser is None:
            return
        method = parser.get_method()
        url = httptools.parse_url(self.url)
        path, query = url.path, url.query or b""
        keep_alive = parser.should_keep_alive()
        if path == b"/events" and method == b"GET":
            self.start_stream(query)
        elif path.startswith(b"/3/device/"):
            self.answer(self.handle_push(method, path[len(b"/3/device/"):]), keep_alive)
        elif path == b"/broadcast" and method == b"POST":
            self.answer(self.handle_broadcast(query), keep_alive)
        elif path == b"/stats" and method == b"GET":
            self.answer(json_response(200, NODE.stats()), keep_alive)
        elif path == b"/healthz":
            self.answer(HEALTHZ, keep_alive)
        else:
            self.answer(json_response(404, {"reason": "BadPath"}), keep_alive)
        self.headers, self.body = {}, []

    # routes
    def start_stream(self, query: bytes) -> None:
        raw = b""
        for pair in query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if name == b"token":
                raw = value
        token = normalise_token(raw)
        if token is None:
            reason = "MissingDeviceToken" if not raw else "BadDeviceToken"
            self.reply_and_close(json_response(400, {"reason": reason}, keep_alive=False))
            return
        self.parser = None  # a stream never parses again: drop the parser's memory
        self.url, self.headers, self.body = b"", {}, []
        self.token = token
        self.transport.write(random.choice(SSE_PREAMBLES))
        NODE.attach(token, self)

    def handle_push(self, method: bytes, raw_token: bytes) -> bytes:
        apns_id = self.headers.get(b"apns-id") or str(uuid.uuid4()).encode()
        if method != b"POST":
            return json_response(405, {"reason": "MethodNotAllowed"}, apns_id)
        token = normalise_token(raw_token)
        if token is None:
            reason = "MissingDeviceToken" if not raw_token else "BadDeviceToken"
            return json_response(400, {"reason": reason}, apns_id)
        payload = b"".join(self.body)
        if not payload:
            return json_response(400, {"reason": "PayloadEmpty"}, apns_id)
        if len(payload) > MAX_PAYLOAD:
            return json_response(413, {"reason": "PayloadTooLarge"}, apns_id)
        expiration = self.headers.get(b"apns-expiration")
        ttl = DEFAULT_TTL_SECONDS
        if expiration is not None and expiration.isdigit():
            ttl = 0.0 if expiration == b"0" else int(expiration) - time.time()
        NODE.push(token, encode_event(apns_id, payload), ttl)
        return push_ok(apns_id)

    def handle_broadcast(self, query: bytes) -> bytes:
        apns_id = self.headers.get(b"apns-id") or str(uuid.uuid4()).encode()
        prefix = b""
        for pair in query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if name == b"prefix":
                prefix = value.lower()
        payload = b"".join(self.body) or b"{}"
        written = NODE.broadcast(encode_event(apns_id, payload), prefix)
        return json_response(200, {"apns_id": apns_id.decode(), "streams": written})

    def answer(self, response: bytes, keep_alive: bool) -> None:
        self.transport.write(response)
        if not keep_alive:
            self.transport.close()

    def reply_and_close(self, response: bytes) -> None:
        self.parser = None
        self.transport.write(response)
        self.transport.close()


# ---- process model ----

def bind_listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(65535)
    sock.setblocking(False)
    return sock


def raise_fd_limit() -> None:
    """Soft limit up to the hard limit: 1024 by default would cap us at ~1k streams (systemd ≥ 240
    sets soft 1024, hard 524288 and expects programs to raise the soft one:
    0pointer.net/blog/file-descriptor-limits.html)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(sock: socket.socket, keepalive: float) -> None:
    """Run one worker's event loop on ``sock`` until SIGTERM/SIGINT."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop)

    async def main() -> None:
        server = await loop.create_server(Connection, sock=sock, backlog=65535)
        if keepalive > 0:
            loop.create_task(NODE.keepalive_sweep(keepalive))
        # Same reasoning as rawsse: a full collection walking 300k objects stalls every stream;
        # nothing here makes reference cycles worth collecting after start-up.
        gc.collect()
        gc.freeze()
        await stop
        server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def run_workers(host: str, port: int, workers: int, keepalive: float) -> int:
    """Fork ``workers`` children, each with its own SO_REUSEPORT listener; wait for them."""
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                serve(bind_listener(host, port, reuse_port=True), keepalive)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="asyncio + uvloop baseline speaking rawsse's routes")
    parser.add_argument("--listen", default="127.0.0.1:8379", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="forked workers, each with its own SO_REUSEPORT listener and registry "
                             "(no routing between them; default %(default)s)")
    parser.add_argument("--keepalive", type=float, default=15.0,
                        help="seconds between ': keepalive' comments, 0 = off (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    raise_fd_limit()
    if args.workers <= 1:
        serve(bind_listener(host or "0.0.0.0", int(port), reuse_port=True), args.keepalive)
        return 0
    return run_workers(host or "0.0.0.0", int(port), args.workers, args.keepalive)


if __name__ == "__main__":
    sys.exit(main())
