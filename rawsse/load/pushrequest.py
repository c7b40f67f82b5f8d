"""What ``rawsse push`` sends: the targets (``--tokens`` schemes) and the bytes of its requests.

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
from random import getrandbits

from rawsse.config import ConfigError
from rawsse.load import loadgen
from rawsse.load.stamp import ID_PREFIX, ID_RANDOM, RAND_HIGH, RAND_LOW, new_stamped_id, stamp_fields

DEFAULT_PAYLOAD = '{"mdm":"pushmagic<serial>"}'
SERIAL_MARK = b"<serial>"
FLEET_SERIAL_DIGITS = loadgen.FLEET_SERIAL_DIGITS
SERIAL_LIMIT = 10 ** FLEET_SERIAL_DIGITS  # from here on a serial is longer than the template's


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
    """The bytes of one push request: a Fleet-shaped POST, optionally stamped.

    ``build`` makes any request; ``batch`` makes the requests of consecutive pushes to the
    targets (``bind``) with one ``%`` format each from a template made once (``template``: the
    constant bytes, with slots for the token, the ``--expiration`` line, the apns-id and the
    serial), the same bytes as ``build``'s. A request ``template`` cannot make (a payload naming ``<serial>``
    more than once, serials of more than 12 digits) is ``build``'s.
    """

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
        self.serial_slots = self.payload.count(SERIAL_MARK)
        self.template = self._template() if self.serial_slots <= 1 else None
        # rate-paced runs (``pace``): push k is stamped origin + k / rate
        self.origin = 0.0
        self.rate = 0.0
        self.stamped_at = -1.0  # the apns-id's time fields of the last batch, as bytes
        self.stamp_prefix = b""
        self.slots = 5 + self.serial_slots  # the template's fields when stamped
        self.targets = Targets([], 0)
        self.fast = False  # ``bind``: the template makes every request

    def pace(self, origin: float, rate: float) -> None:
        """Push ``k`` is due ``k / rate`` seconds after the Unix time ``origin`` (rate > 0)."""
        self.origin, self.rate = origin, rate

    def build(self, path_token: bytes | None, serial: bytes, stamp_at: float) -> bytes:
        """``path_token`` None → the broadcast route. ``stamp_at``: Unix time for the apns-id."""
        body = self.payload.replace(SERIAL_MARK, serial) if self.templated else self.payload
        path = self.broadcast_path if path_token is None else self.device_prefix + path_token
        apns = [self.expiration_line()]
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

    def expiration_line(self) -> bytes:
        """The ``--expiration`` header line (``now + SECONDS``), or nothing without the flag."""
        if self.expiration is None:
            return b""
        value = 0 if self.expiration == 0 else int(time.time() + self.expiration)
        return (b"Apns-Expiration: %d\r\n" if self.fleet_headers
                else b"apns-expiration: %d\r\n") % value

    def _template(self) -> bytes:
        """``build``'s request as a ``%`` format of (token, expiration line[, the apns-id's time
        prefix (``stamp.ID_PREFIX``) and two random numbers (``stamp.ID_RANDOM``)][, serial
        index]); serials are ``%012d`` (Fleet's)."""
        body = b"%012d".join(_escaped(part) for part in self.payload.split(SERIAL_MARK))
        length = len(self.payload) + self.serial_slots * (FLEET_SERIAL_DIGITS - len(SERIAL_MARK))
        stamp = b""
        if self.stamp:
            stamp = (b"Apns-Id: %s" if self.fleet_headers else b"apns-id: %s") + ID_RANDOM + b"\r\n"
        start = b"POST " + _escaped(self.device_prefix) + b"%s HTTP/1.1\r\nHost: " + \
            _escaped(self.host)
        if self.fleet_headers:
            return (start + b"\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: %d\r\n%%s"
                    % length + stamp + b"Content-Type: application/json\r\n"
                    b"Accept-Encoding: gzip\r\n\r\n" + body)
        return start + b"\r\nContent-Length: %d\r\n%%s" % length + stamp + b"\r\n" + body

    def bind(self, targets: Targets) -> None:
        """``batch`` makes requests to ``targets``."""
        self.targets = targets
        self.fast = self.template is not None and targets.first_index + len(targets) <= SERIAL_LIMIT

    def batch(self, k: int, take: int, stamp_at: float) -> bytes:
        """The requests of pushes ``k`` … ``k + take - 1`` to the targets (``bind``, cycling),
        one after the other; stamped ``stamp_at`` (unpaced: sent now) or as ``pace`` says."""
        if not self.fast or self.rate > 0 or not self.stamp:
            return self._batch(k, take, stamp_at)
        if stamp_at != self.stamped_at:  # the pushes of one loop turn share the time fields
            self.stamped_at = stamp_at
            self.stamp_prefix = ID_PREFIX % stamp_fields(stamp_at)
        template, paths, first = self.template, self.targets.paths, self.targets.first_index
        n, prefix = len(paths), self.stamp_prefix
        expiration = b"" if self.expiration is None else self.expiration_line()
        assert template is not None  # self.fast says so
        if take == 1:  # one push in flight per connection: the keep-alive senders
            i = k % n
            r = getrandbits(62)
            return template % ((paths[i], expiration, prefix, RAND_HIGH | r >> 48, r & RAND_LOW,
                                first + i)[:self.slots])
        requests = []
        for j in range(k, k + take):
            i = j % n
            r = getrandbits(62)
            requests.append(template % ((paths[i], expiration, prefix, RAND_HIGH | r >> 48,
                                         r & RAND_LOW, first + i)[:self.slots]))
        return b"".join(requests)

    def _batch(self, k: int, take: int, stamp_at: float) -> bytes:
        """``batch`` when rate-paced (each push its own stamp), unstamped, or beyond the
        template: one ``build`` per push unless the template does."""
        targets, rate = self.targets, self.rate
        paths, first, n = targets.paths, targets.first_index, len(targets)
        requests = []
        for j in range(k, k + take):
            if rate > 0:
                stamp_at = self.origin + j / rate
            i = j % n
            if not self.fast:
                requests.append(self.build(paths[i], targets.serial(i), stamp_at))
                continue
            expiration = b"" if self.expiration is None else self.expiration_line()
            assert self.template is not None
            if not self.stamp:
                fields: tuple = (paths[i], expiration, first + i)
            else:
                r = getrandbits(62)
                fields = (paths[i], expiration, ID_PREFIX % stamp_fields(stamp_at),
                          RAND_HIGH | r >> 48, r & RAND_LOW, first + i)
            requests.append(self.template % fields[:len(fields) - 1 + self.serial_slots])
        return b"".join(requests)


def _escaped(literal: bytes) -> bytes:
    """Bytes that stand for themselves in a ``%`` format."""
    return literal.replace(b"%", b"%%")
