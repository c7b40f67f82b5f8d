"""Validated server configuration: every flag value is parsed once, here, at startup.

A bad value raises ``ConfigError`` whose message names the flag, so the CLI can print one line.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

from rawsse.apns import apple as apns


class ConfigError(ValueError):
    """A flag value that cannot be used; ``str()`` is the one-line message for the operator."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                 None: 1.0}


def parse_duration(text: str, flag: str) -> float:
    """``"250ms"``, ``"2s"``, ``"1.5"`` (seconds), ``"24h"``, ``"30d"`` → seconds."""
    match = _DURATION.match(text)
    if not match and _DURATION.match(text.strip().removeprefix("-")):
        raise ConfigError(flag, f"{text.strip()} is below 0: a duration must be ≥ 0")
    if not match:
        raise ConfigError(flag, f"{text!r} is not a duration (examples: 250ms, 2s, 15, 24h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclasses.dataclass(frozen=True, slots=True)
class Distribution:
    """A delay: fixed, ``uniform:A-B``, ``exp:MEAN`` or ``normal:MEAN,SD`` (clamped at 0)."""

    kind: str
    a: float
    b: float = 0.0
    text: str = ""

    @property
    def is_zero(self) -> bool:
        return self.kind == "fixed" and self.a == 0.0

    def sample(self, rng: random.Random = random._inst) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return max(0.0, rng.gauss(self.a, self.b))

    def describe(self) -> str:
        return self.text or f"{self.a}s"


ZERO = Distribution("fixed", 0.0, text="0")


def parse_distribution(text: str, flag: str) -> Distribution:
    """Parse a delay: ``100ms`` | ``uniform:50ms-2s`` | ``exp:200ms`` | ``normal:300ms,50ms``."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        return Distribution("fixed", parse_duration(text, flag), text=text)
    kind = kind.lower()
    if kind == "uniform":
        low, dash, high = rest.partition("-")
        if not dash:
            raise ConfigError(flag, f"{text!r}: uniform needs LOW-HIGH, e.g. uniform:50ms-2s")
        a, b = parse_duration(low, flag), parse_duration(high, flag)
        if b < a:
            raise ConfigError(flag, f"{text!r}: the upper bound is below the lower bound")
        return Distribution("uniform", a, b, text)
    if kind == "exp":
        return Distribution("exp", parse_duration(rest, flag), text=text)
    if kind == "normal":
        mean, comma, sd = rest.partition(",")
        if not comma:
            raise ConfigError(flag, f"{text!r}: normal needs MEAN,SD, e.g. normal:300ms,50ms")
        return Distribution("normal", parse_duration(mean, flag), parse_duration(sd, flag), text)
    raise ConfigError(flag, f"{text!r}: unknown distribution {kind!r} (fixed, uniform, exp, normal)")


@dataclasses.dataclass(frozen=True, slots=True)
class FaultRule:
    """A share of pushes answered with ``status``/``reason`` instead of being accepted."""

    share: float  # 0..1
    status: int
    reason: str

    def describe(self) -> str:
        return f"{self.share * 100:g}%:{self.status}:{self.reason}"

    def as_dict(self) -> dict[str, object]:
        return {"percent": self.share * 100, "status": self.status, "reason": self.reason,
                "rule": self.describe()}


def parse_fault(text: str, flag: str = "--fault") -> FaultRule:
    """``5%:503:ServiceUnavailable``, ``1%:429`` (reason from status), ``0.5%:TooManyRequests``."""
    parts = text.strip().split(":")
    if len(parts) < 2 or len(parts) > 3 or not parts[0].endswith("%"):
        raise ConfigError(flag, f"{text!r} is not PERCENT%:STATUS[:REASON], e.g. 5%:503:ServiceUnavailable")
    try:
        percent = float(parts[0][:-1])
    except ValueError:
        raise ConfigError(flag, f"{text!r}: {parts[0]!r} is not a percentage") from None
    if not 0.0 <= percent <= 100.0 or math.isnan(percent):
        raise ConfigError(flag, f"{text!r}: the percentage must be between 0 and 100")
    status_text, reason = parts[1], parts[2] if len(parts) == 3 else ""
    if not status_text and not reason:
        raise ConfigError(flag, f"{text!r}: name a status or a reason, e.g. 5%:503:ServiceUnavailable")
    if not status_text.isdigit():  # "5%:TooManyRequests": status from the reason
        reason, status_text = status_text, ""
    if reason and reason not in apns.REASON_STATUS:
        raise ConfigError(flag, f"{text!r}: {reason!r} is not an APNs reason "
                                f"(e.g. TooManyRequests, InternalServerError, ServiceUnavailable)")
    status = int(status_text) if status_text else apns.REASON_STATUS[reason]
    if not reason:
        if status not in apns.DEFAULT_REASON:
            raise ConfigError(flag, f"{text!r}: status {status} has no APNs reason; name one")
        reason = apns.DEFAULT_REASON[status]
    if apns.REASON_STATUS[reason] != status:
        raise ConfigError(flag, f"{text!r}: APNs answers {reason} with {apns.REASON_STATUS[reason]}, "
                                f"not {status}")
    return FaultRule(percent / 100.0, status, reason)


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all addresses), ``[::1]:PORT`` → (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(flag, f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:8378, [::1]:8378, :8378)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


def parse_int(text: str, flag: str, minimum: int) -> int:
    """A whole number not below ``minimum``; ConfigError naming the flag otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(flag, f"{text!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(flag, f"{value} is below the minimum {minimum}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``rawsse serve`` needs, validated."""

    listen: tuple[str, int] = ("0.0.0.0", 8378)
    # None: the operator routes on --listen too (--admin-listen public). Not the CLI's default,
    # which is loopback on the --listen port + 1 (serve.admin_address).
    admin_listen: tuple[str, int] | None = None
    keepalive: float = 15.0
    default_ttl: float = 24 * 3600.0
    max_connections: int = 300_000
    delivery_delay: Distribution = ZERO
    response_delay: Distribution = ZERO
    faults: tuple[FaultRule, ...] = ()
    strict_tokens: bool = False
    retry_ms: int = 5000
    max_pending: int = 1_000_000
    max_delayed: int = 100_000
    delivery_log: int = 100_000  # outcomes kept per worker for /admin/deliveries; 0 = off
    max_pending_bytes: int = 256 * 1024 * 1024  # frame bytes, pending + delayed, per worker
    stream_buffer: int = 64 * 1024
    header_limit: int = 16 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 120.0
    h2_max_streams: int = 1000  # SETTINGS_MAX_CONCURRENT_STREAMS, as api.push.apple.com
    h2_idle_timeout: float = 120.0  # an HTTP/2 connection with no stream: GOAWAY IdleTimeout
    # "development": a 200 carries apns-unique-id, as Apple's sandbox answers
    environment: str = "production"
    tls_listen: tuple[str, int] | None = None  # None: no TLS listener
    tls_cert: str = ""  # PEM, checked at start (rawsse.server.tls.server_context)
    tls_key: str = ""
    # Provider authentication (rawsse/apns/auth.py): off, token, cert or any
    auth: str = "off"
    auth_keys: tuple[tuple[str, bytes], ...] = ()  # (key id, PEM of its .p8)
    team_id: str = ""  # "": any team
    token_max_age: float = 3600.0  # Apple: a token older than one hour is expired
    topics: tuple[str, ...] = ()  # (): any well-formed topic
    tls_client_ca: str = ""  # PEM CAs a client certificate must chain to; "": none asked for
    backlog: int = 65535
    workers: int = 0  # 0 = sized from --max-connections and the open-file limit
    balance_senders: bool = True  # push senders' connections spread over the workers (balance.py)
    drain_seconds: float = 10.0
    state_file: str | None = None
    log_level: str = "info"
    # Redis mode (several nodes as one service); None = a single node, no Redis at all
    redis_url: str | None = None
    node_id: str = ""
    redis_prefix: str = "rawsse:"
    # How long a broadcast waits for the other nodes' answers (rawsse/cluster/broadcast.py)
    broadcast_wait: float = 5.0
    # How long a broadcast waits for this node's other workers (rawsse/node/mesh.py)
    broadcast_worker_wait: float = 120.0
