"""``rawsse serve``: flags → ``ServeConfig`` → a prefork node (a master and its workers)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from typing import Any

from rawsse.apns import auth_flags
from rawsse.apns.admin import MAX_TOKEN_STATES, TOKEN_STATE_BYTES
from rawsse.apns.deliverylog import ENTRY_BYTES
from rawsse.config import (ConfigError, ServeConfig, parse_address, parse_distribution, parse_duration,
                     parse_fault, parse_int)
from rawsse.node.mesh import BROADCAST_TIMEOUT

log = logging.getLogger(__name__)

ADMIN_ON_PUBLIC = "public"  # --admin-listen public: the operator routes on --listen too
# A node answering another's broadcast waits this long for its own workers: waiting longer for
# its answer would gain nothing.
MAX_BROADCAST_WAIT = BROADCAST_TIMEOUT

EPILOG = """\
delays (--delivery-delay, --response-delay, and the per-push header rawsse-delivery-delay):
  250ms | 2s            fixed
  uniform:50ms-2s       uniform between the bounds
  exp:200ms             exponential with that mean
  normal:300ms,50ms     normal (mean, standard deviation), clamped at 0

fault rules (--fault, repeatable; also POST /admin/faults at run time):
  PERCENT%:STATUS[:REASON]   e.g. 5%:503:ServiceUnavailable, 1%:429:TooManyRequests, 2%:500

routes on --listen (default 0.0.0.0:8378), for senders and devices:
  POST /3/device/<token> (APNs), GET /events?token=<hex> (SSE), POST /broadcast, GET /healthz
  on --tls-listen (https, HTTP/2 or 1.1) the same but GET /events, which gets 421: devices
  use --listen; rawsse certs DIR writes a CA and a certificate to try it with
operator routes on --admin-listen, by default 127.0.0.1 on the --listen port + 1
(127.0.0.1:8379), so two nodes on one host do not collide:
  GET /healthz, /stats, /metrics, /admin/tokens[/<hex>], /admin/faults, /admin/auth,
  /admin/deliveries?token=<hex>, /admin/deliveries/<apns-id> (--delivery-log)
  GET /dashboard: the live view in a browser (over ssh -L 8379:127.0.0.1:8379 from afar),
  fed by GET /stats/events (SSE, one JSON event a second, at most 16 viewers per node)
  --admin-listen public serves them on --listen too, where any sender can reach them;
  request bodies and answers: docs/runbook.md, "Admin routes"

several nodes as one service (Redis >= 6.2, pip install 'rawsse[redis]'):
  rawsse serve --listen :8378 --redis redis://redis.internal:6379 --node-id a
  rawsse serve --listen :8378 --redis redis://redis.internal:6379 --node-id b
  A push accepted by any node reaches the node holding the device; pending pushes live in Redis.
  POST /broadcast on any node reaches every node's streams; its answer sums their counts and
  names in "missing" the nodes that did not answer within --broadcast-wait.

""" + auth_flags.EPILOG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    add = parser.add_argument
    add("--listen", default="0.0.0.0:8378", metavar="HOST:PORT",
        help="push API and device streams (default: %(default)s, the port of Fleet's mock)")
    add("--admin-listen", metavar="HOST:PORT",
        help="serve the operator routes (/stats, /metrics, /dashboard, /admin/*) here only "
             "(default: 127.0.0.1 on the --listen port + 1); 'public' serves them on --listen, "
             "open to "
             f"every sender; at most {MAX_TOKEN_STATES:,} token states (/admin/tokens), about "
             f"{MAX_TOKEN_STATES * TOKEN_STATE_BYTES // 1_000_000} MB per process")
    add("--keepalive", default="15", metavar="SECONDS",
        help="SSE comment interval so proxies never see an idle stream; 0 disables (default: 15)")
    add("--default-ttl", default="24h", metavar="DURATION",
        help="how long a push without apns-expiration waits for an offline device (default: 24h)")
    add("--max-connections", default=str(d.max_connections), metavar="N",
        help="connections the node is sized for; each worker refuses connections past its "
             "share plus 10%% (tokens hash unevenly over workers): HTTP/1.1 gets 503, an "
             "HTTP/2 preface GOAWAY REFUSED_STREAM (default: %(default)s)")
    add("--delivery-delay", default="0", metavar="DELAY",
        help="delay between accepting a push and writing it to the device (default: 0)")
    add("--response-delay", default="0", metavar="DELAY",
        help="delay before answering a push (default: 0)")
    add("--fault", action="append", default=[], metavar="RULE",
        help="answer a share of pushes with an error, e.g. 5%%:503:ServiceUnavailable (repeatable)")
    add("--strict-tokens", action="store_true",
        help="require Apple's 32-byte (64 hex) tokens; default accepts any even-length hex of at "
             "most 100 bytes (200 hex)")
    add("--retry", default=str(d.retry_ms), metavar="MS",
        help="SSE retry: hint sent at connect, jittered ±50%% (default: %(default)s; 0 omits it)")
    add("--max-pending", default=str(d.max_pending), metavar="N",
        help="offline devices' pending pushes held per worker before pushes get 503 "
             "(default: %(default)s)")
    add("--max-pending-bytes", default=str(d.max_pending_bytes), metavar="BYTES",
        help="SSE frame bytes of the pending and delayed pushes held per worker before pushes "
             "get 503 (a frame is its payload + ~60 B, the payload at most Apple's 4 KB; each "
             "push also costs ~200 B of bookkeeping, bounded by --max-pending; the default 256 "
             "MiB holds ~60,000 pushes of 4 KB a worker) (default: %(default)s)")
    add("--max-delayed", default=str(d.max_delayed), metavar="N",
        help="pushes waiting out a delivery delay per worker before pushes get 503 "
             "(default: %(default)s)")
    add("--delivery-log", default=str(d.delivery_log), metavar="N",
        help="push outcomes (delivered, pending, expired, discarded, rejected) each worker "
             "keeps for GET /admin/deliveries and rawsse push --verify: the last N, about "
             f"{ENTRY_BYTES} B each, preallocated (the default: about "
             f"{d.delivery_log * ENTRY_BYTES // 1_000_000} MB per worker; at most "
             f"{MAX_DELIVERY_LOG:,}); 0 turns it off (default: %(default)s)")
    add("--stream-buffer", default=str(d.stream_buffer), metavar="BYTES",
        help="unsent bytes a stream may hold before it is closed as a slow reader "
             "(its push is kept) (default: %(default)s)")
    add("--header-limit", default=str(d.header_limit), metavar="BYTES",
        help="largest request head, else 431 (default: %(default)s)")
    add("--header-timeout", default="10", metavar="SECONDS",
        help="time to send a request head, and then its body, else 408 (default: 10)")
    add("--idle-timeout", default="120", metavar="SECONDS",
        help="idle keep-alive connection lifetime (default: 120)")
    add("--h2-max-streams", default=str(d.h2_max_streams), metavar="N",
        help="HTTP/2: concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS); "
             "more are refused with REFUSED_STREAM (default: %(default)s, as Apple)")
    add("--h2-idle-timeout", metavar="SECONDS",
        help="HTTP/2: a connection with no open stream this long gets GOAWAY NO_ERROR "
             '{"reason":"IdleTimeout"} and is closed (default: --idle-timeout)')
    add("--environment", default=d.environment, choices=["production", "development"],
        help="which APNs to act as: development (api.sandbox.push.apple.com) adds "
             "apns-unique-id (a UUID) to every 200, as Apple's sandbox does (default: %(default)s)")
    add("--tls-listen", metavar="HOST:PORT",
        help="also serve the push API over TLS here (https://, ALPN h2 and http/1.1, TLS 1.2+), "
             "as api.push.apple.com; device streams stay on --listen (default: off)")
    add("--tls-cert", metavar="FILE",
        help="PEM certificate chain for --tls-listen (rawsse certs DIR writes a throwaway one); "
             "SIGHUP (systemctl reload) checks the files and rolls workers onto them")
    add("--tls-key", metavar="FILE", help="PEM private key of --tls-cert, unencrypted")
    auth_flags.add_arguments(parser)
    add("--workers", default="auto", metavar="N",
        help="worker processes; auto = enough to hold --max-connections under the open-file "
             "limit, and at least one per CPU; the start log says how many and why "
             "(default: auto)")
    add("--balance-senders", default="on", choices=["on", "off"],
        help="hand a push sender's connection (POST /3/device/ or h2c, not TLS), after its "
             "first read, to the worker holding the fewest, so that a node's 5-10 sender "
             "connections spread evenly instead of where the kernel's hash puts them; off "
             "leaves each on the worker that accepted it (default: %(default)s)")
    add("--drain-seconds", default="10", metavar="SECONDS",
        help="on SIGTERM, close streams spread over this window so devices do not reconnect "
             "at once (default: 10)")
    add("--state-file", metavar="PATH",
        help="save pending pushes here (0600) on stop and load them on start; its directory "
             "must be writable (checked at start); after a kill -9 of the master, its workers' "
             "saved pushes are merged at the next start")
    add("--redis", metavar="URL", dest="redis_url",
        help="Redis mode: cooperate with the other nodes using this Redis (redis://[:PASSWORD@]"
             "HOST:PORT[/DB], rediss://, unix:///PATH); pending pushes and device ownership "
             "live there (default: off, a single node needs no Redis)")
    add("--node-id", metavar="ID",
        help="this node's name in Redis, unique per node (default: HOSTNAME-PID)")
    add("--redis-prefix", default=d.redis_prefix, metavar="P",
        help="prefix of every Redis key and channel; nodes of one service share it, separate "
             "services or test runs use different ones (default: %(default)s)")
    add("--broadcast-wait", metavar="SECONDS",
        help="Redis mode: how long POST /broadcast waits for the other nodes' counts; a node "
             "that has not answered by then is named in the answer's \"missing\" (it may still "
             f"write the event) (default: {d.broadcast_wait:g}, at most {MAX_BROADCAST_WAIT:g})")
    add("--broadcast-worker-wait", default=f"{d.broadcast_worker_wait:g}", metavar="SECONDS",
        help="how long POST /broadcast waits for each of this node's workers to write the event "
             "to its streams and give its count; a worker that has not by then (or is down) is "
             "named in the answer's \"missing_workers\" and its streams are not in \"streams\" "
             "(it may still write the event); checked each second. Redis mode: also when this "
             "node answers another node's broadcast (there by node: {\"b\": [1]}); keep it under "
             "the asking node's --broadcast-wait, or a late worker gets this whole node named "
             f"missing (default: %(default)s, at most {BROADCAST_TIMEOUT:g})")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)")


def build_config(args: argparse.Namespace) -> ServeConfig:
    """Validate every flag once; raises ConfigError naming the flag."""
    listen = parse_address(args.listen, "--listen")
    return ServeConfig(
        listen=listen,
        admin_listen=admin_address(args.admin_listen, listen),
        keepalive=parse_duration(args.keepalive, "--keepalive"),
        default_ttl=parse_duration(args.default_ttl, "--default-ttl"),
        max_connections=parse_int(args.max_connections, "--max-connections", 1),
        delivery_delay=parse_distribution(args.delivery_delay, "--delivery-delay"),
        response_delay=parse_distribution(args.response_delay, "--response-delay"),
        faults=tuple(parse_fault(rule, "--fault") for rule in args.fault),
        strict_tokens=args.strict_tokens,
        retry_ms=parse_int(args.retry, "--retry", 0),
        max_pending=parse_int(args.max_pending, "--max-pending", 1),
        max_delayed=parse_int(args.max_delayed, "--max-delayed", 1),
        delivery_log=_delivery_log(args.delivery_log),
        max_pending_bytes=parse_int(args.max_pending_bytes, "--max-pending-bytes", 4096),
        stream_buffer=parse_int(args.stream_buffer, "--stream-buffer", 256),
        header_limit=parse_int(args.header_limit, "--header-limit", 1024),
        header_timeout=_positive(args.header_timeout, "--header-timeout"),
        idle_timeout=_positive(args.idle_timeout, "--idle-timeout"),
        h2_max_streams=parse_int(args.h2_max_streams, "--h2-max-streams", 1),
        h2_idle_timeout=_positive(args.h2_idle_timeout, "--h2-idle-timeout")
        if args.h2_idle_timeout is not None else _positive(args.idle_timeout, "--idle-timeout"),
        environment=args.environment,
        workers=0 if args.workers == "auto" else parse_int(args.workers, "--workers", 1),
        balance_senders=args.balance_senders == "on",
        drain_seconds=parse_duration(args.drain_seconds, "--drain-seconds"),
        state_file=_writable_state_file(args.state_file),
        log_level=args.log_level,
        broadcast_worker_wait=_broadcast_worker_wait(args.broadcast_worker_wait),
        **_redis_options(args),
        **auth_flags.auth_options(args),
        **_tls_options(args, [("--listen", listen),
                              ("--admin-listen", admin_address(args.admin_listen, listen))]),
    )


MAX_DELIVERY_LOG = 10_000_000  # 1.4 GB per worker: beyond it a typo, not a plan


def _delivery_log(text: str) -> int:
    """``--delivery-log``: entries per worker, preallocated at start, so bounded here."""
    size = parse_int(text, "--delivery-log", 0)
    if size > MAX_DELIVERY_LOG:
        raise ConfigError("--delivery-log", f"{size:,} entries would take "
                          f"{size * ENTRY_BYTES / 1e9:.1f} GB per worker; at most "
                          f"{MAX_DELIVERY_LOG:,}")
    return size


def admin_address(text: str | None, listen: tuple[str, int]) -> tuple[str, int] | None:
    """Where the operator routes listen; None = on ``--listen`` (``--admin-listen public``).

    Not on the push listener by default: any sender could mark devices unregistered or add
    fault rules there. Loopback on the next port lets two nodes share a host (8378/8379 and
    8388/8389) without naming the operator port each time."""
    if text is not None and text.strip().lower() == ADMIN_ON_PUBLIC:
        return None
    if text is None:
        port = listen[1] + 1 if listen[1] else 0  # --listen :0 (a kernel-picked port): the same
        if port > 65535:
            raise ConfigError("--admin-listen", f"the default, the --listen port + 1, would be "
                                                f"{port}: name one, e.g. 127.0.0.1:8379")
        return "127.0.0.1", port
    address = parse_address(text, "--admin-listen")
    if _same_socket(address, listen):
        raise ConfigError("--admin-listen", f"{text.strip()} overlaps --listen "
                          f"{listen[0]}:{listen[1]}: each connection would land on one of them "
                          f"at random; choose another port, or --admin-listen {ADMIN_ON_PUBLIC} "
                          f"to serve the operator routes on --listen")
    return address


def _same_socket(admin: tuple[str, int], listen: tuple[str, int]) -> bool:
    """Would the two listeners share connections (same port, overlapping addresses)?"""
    from rawsse.node import portcheck

    if admin[1] != listen[1] or admin[1] == 0:
        return False
    ours, theirs = portcheck.resolve(*admin), portcheck.resolve(*listen)
    if ours is None or theirs is None:  # unresolvable: the bind reports it
        return admin[0] == listen[0]
    return portcheck.overlaps(ours, theirs)


def _redis_options(args: argparse.Namespace) -> dict[str, Any]:
    """--redis, --node-id, --redis-prefix: checked here, Redis itself is reached later (by
    the node's agent, which keeps retrying), so a node may start before its Redis."""
    if not args.redis_url:
        for flag, value in (("--node-id", args.node_id), ("--broadcast-wait", args.broadcast_wait)):
            if value:
                raise ConfigError(flag, "only means something with --redis")
        return {}
    url = args.redis_url.strip()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("--redis", f"{url!r} is not a redis://, rediss:// or unix:// URL")
    if importlib.util.find_spec("redis") is None:  # found, not imported: the agent imports it
        raise ConfigError("--redis", "needs the redis extra: pip install 'rawsse[redis]'")
    node_id = (args.node_id or f"{socket.gethostname()}-{os.getpid()}").strip()
    if not node_id or any(c.isspace() or c == "|" for c in node_id):
        raise ConfigError("--node-id", f"{node_id!r}: use a non-empty name without spaces or '|'")
    prefix = args.redis_prefix
    if any(c.isspace() for c in prefix):
        raise ConfigError("--redis-prefix", f"{prefix!r} contains whitespace")
    options: dict[str, Any] = {"redis_url": url, "node_id": node_id, "redis_prefix": prefix}
    if args.broadcast_wait is not None:
        wait = _positive(args.broadcast_wait, "--broadcast-wait")
        if wait > MAX_BROADCAST_WAIT:
            raise ConfigError("--broadcast-wait", f"{args.broadcast_wait.strip()} is over "
                              f"{MAX_BROADCAST_WAIT:g} s, the longest a node waits for its own "
                              "workers' part of a broadcast")
        options["broadcast_wait"] = wait
    return options


def _tls_options(args: argparse.Namespace,
                 others: list[tuple[str, tuple[str, int] | None]]) -> dict[str, Any]:
    """--tls-listen with its certificate and key, loaded once here so a bad file is one line at
    start, not a failure in every worker."""
    if not args.tls_listen:
        for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            if value:
                raise ConfigError(flag, "only means something with --tls-listen")
        return {}
    address = parse_address(args.tls_listen, "--tls-listen")
    for flag, other in others:
        if other is not None and _same_socket(address, other):
            raise ConfigError("--tls-listen", f"{args.tls_listen.strip()} overlaps {flag} "
                                              f"{other[0]}:{other[1]}: choose another port")
    for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if not value:
            raise ConfigError(flag, "needed with --tls-listen (rawsse certs DIR writes one)")
    from rawsse.server.tls import server_context

    server_context(args.tls_cert, args.tls_key, args.tls_client_ca or "")
    return {"tls_listen": address, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def _writable_state_file(path: str | None) -> str | None:
    """Found now, not at the stop that would fail to save: try a file beside it."""
    if not path:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".rawsse-probe-")
    except OSError as exc:
        raise ConfigError("--state-file", f"cannot write in {directory}: {exc.strerror}") from None
    probe.close()
    if os.path.isdir(path):
        raise ConfigError("--state-file", f"{path} is a directory")
    return path


def _broadcast_worker_wait(text: str) -> float:
    wait = _positive(text, "--broadcast-worker-wait")
    if wait > BROADCAST_TIMEOUT:
        raise ConfigError("--broadcast-worker-wait", f"{text.strip()} is over "
                          f"{BROADCAST_TIMEOUT:g} s")
    return wait


def _positive(text: str, flag: str) -> float:
    value = parse_duration(text, flag)
    if value <= 0:
        raise ConfigError(flag, "must be more than 0")
    return value


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    setup_logging(config.log_level)
    from rawsse.node.arbiter import Arbiter
    from rawsse.node.process import BOOT_ERROR

    refusal = shared_port_refusal(config) or bind_refusal(config)
    if refusal:
        print(f"rawsse serve: {refusal}", file=sys.stderr)
        return BOOT_ERROR  # what a worker that cannot bind would make the master exit with
    if config.tls_listen is not None:
        log.info("TLS on %s:%d (ALPN h2, http/1.1), certificate %s", *config.tls_listen,
                 config.tls_cert)
    return Arbiter(config).run()


def shared_port_refusal(config: ServeConfig) -> str | None:
    """Checked here, in the master before any worker exists, and never by a worker: during a
    HUP rolling restart new workers bind beside the old ones on purpose. A second server on
    the port would not fail to bind but silently take a share of the connections
    (``portcheck.py``)."""
    from rawsse.node import portcheck

    return portcheck.check_addresses(_addresses(config))


def _addresses(config: ServeConfig) -> list[tuple[str, tuple[str, int] | None]]:
    return [("--listen", config.listen), ("--admin-listen", config.admin_listen),
            ("--tls-listen", config.tls_listen)]


def bind_refusal(config: ServeConfig) -> str | None:
    """After the listener check: bind each address once here, as the workers will."""
    from rawsse.node import portcheck

    return portcheck.bind_refusal(_addresses(config), config.backlog)
