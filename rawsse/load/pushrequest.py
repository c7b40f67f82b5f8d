"""What ``rawsse push`` sends: the targets (``--tokens`` schemes) and the bytes of one request.

Requests with ``--headers fleet`` are byte-for-byte what Go's net/http writes for Fleet's client
(Host, User-Agent, Content-Length, then headers sorted by canonical name, then the transport's
Accept-Encoding): ``Content-Type: application/json`` and no apns-* header, besides the stamp's
``Apns-Id`` and ``--expiration``'s ``Apns-Expiration`` (fleetdm/fleet
``server/mdm/nanomdm/push/nanopush/provider.go``).
"""

from __future__ import annotations

import argparse
import re
import time

from rawsse.config import ConfigError
from rawsse.load import loadgen
from rawsse.load.stamp import new_stamped_id

DEFAULT_PAYLOAD = '{"mdm":"pushmagic<serial>"}'
SERIAL_MARK = b"<serial>"

class Targets:
    """Device tokens to push to, in order, and the serial each one's payload names."""

    def __init__(self, tokens: list[str], first_index: int) -> None:
        self.paths = [token.encode() for token in tokens]
        self.first_index = first_index

    def __len__(self) -> int:
        return len(self.paths)

    def serial(self, k: int) -> bytes:
        return loadgen.fleet_serial(self.first_index + k).encode()


def parse_targets(spec: str, seed: int) -> Targets:
    """``fleet:A-B`` | ``fleet:I`` | ``random:N`` | ``file:PATH[:A-B]`` → Targets."""
    flag = "--tokens"
    kind, _, rest = spec.partition(":")
    if kind == "fleet":
        first, last = _index_range(rest, flag, spec)
        return Targets(loadgen.tokens_for("fleet", first, last - first + 1, flag=flag), first)
    if kind == "random":
        if not rest.isdigit() or int(rest) < 1:
            raise ConfigError(flag, f"{spec!r}: random:N needs a count")
        return Targets(loadgen.tokens_for("random", 0, int(rest), seed, flag=flag), 0)
    if kind == "file":
        path, _, span = rest.rpartition(":")
        if not path or not re.fullmatch(r"\d+(-\d+)?", span):
            path, span = rest, ""
        tokens = loadgen.read_token_file(path, flag)
        first, last = _index_range(span, flag, spec) if span else (0, len(tokens) - 1)
        if not tokens or last >= len(tokens):
            raise ConfigError(flag, f"{path} holds {len(tokens)} tokens; {spec!r} needs more")
        return Targets(tokens[first:last + 1], first)
    raise ConfigError(flag, f"{spec!r}: use fleet:A-B, random:N or file:PATH[:A-B]")


def _index_range(text: str, flag: str, spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not match:
        raise ConfigError(flag, f"{spec!r}: expected an index range A-B (inclusive)")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    if last < first:
        raise ConfigError(flag, f"{spec!r}: the range ends below its start")
    return first, last


class RequestBuilder:
    """The bytes of one push request: a Fleet-shaped POST, optionally stamped."""

    def __init__(self, args: argparse.Namespace, host: str, base_path: str) -> None:
        self.fleet_headers = args.headers == "fleet"
        self.stamp = not args.no_stamp
        self.expiration: float | None = args.expiration
        self.payload = args.payload.encode()
        self.templated = SERIAL_MARK in self.payload
        self.host = host.encode()
        query = f"?prefix={args.prefix}" if args.broadcast and args.prefix else ""
        self.broadcast_path = f"{base_path}/broadcast{query}".encode()
        self.device_prefix = f"{base_path}/3/device/".encode()

    def build(self, path_token: bytes | None, serial: bytes, stamp_at: float) -> bytes:
        """``path_token`` None → the broadcast route. ``stamp_at``: Unix time for the apns-id."""
        body = self.payload.replace(SERIAL_MARK, serial) if self.templated else self.payload
        path = self.broadcast_path if path_token is None else self.device_prefix + path_token
        apns = []
        if self.expiration is not None:
            value = 0 if self.expiration == 0 else int(time.time() + self.expiration)
            apns.append(b"Apns-Expiration: %d\r\n" % value if self.fleet_headers
                        else b"apns-expiration: %d\r\n" % value)
        if self.stamp:
            apns_id = new_stamped_id(stamp_at).encode()
            apns.append(b"Apns-Id: %s\r\n" % apns_id if self.fleet_headers
                        else b"apns-id: %s\r\n" % apns_id)
        if self.fleet_headers:  # Go net/http's order (see the module doc)
            return b"".join((b"POST ", path, b" HTTP/1.1\r\nHost: ", self.host,
                             b"\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: %d\r\n"
                             % len(body), *apns,
                             b"Content-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n",
                             body))
        return b"".join((b"POST ", path, b" HTTP/1.1\r\nHost: ", self.host,
                         b"\r\nContent-Length: %d\r\n" % len(body), *apns, b"\r\n", body))
