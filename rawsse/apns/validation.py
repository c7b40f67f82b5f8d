"""The APNs push request: validate path, headers and payload, in Apple's terms. No I/O.

``check_push`` turns one ``POST /3/device/<token>`` into what routing needs (the raw token, the
absolute expiry, the delivery delay) or raises ``PushRejected(status, reason)``; ``answer_id``
is the apns-id its answer carries either way. The order of the checks follows Fleet's mock (apns-id,
push type, expiration, token, body: fleetdm/fleet ``cmd/apple-apns-mock/handlers.go``), with the
checks Apple has and Fleet lacks (priority, collapse id, duplicate headers, voip size) slotted in
where Apple's tables put them (Apple, "Sending notification requests to APNs" and "Handling
notification responses from APNs").
"""

from __future__ import annotations

import binascii
import os
from typing import TYPE_CHECKING

from rawsse.apns import apple as apns
from rawsse.apns.apple import UUID_FORM, UUID_SHAPE
from rawsse.config import ConfigError, Distribution, parse_distribution

if TYPE_CHECKING:
    from rawsse.server.exchange import Request


MAX_EXPIRATION_DIGITS = 19

# Apple's limits as plain names, and unhexlify bound: read per push, a global each rather than
# a module attribute lookup on top (Python 3.11).
_MAX_TOKEN_HEX = 2 * apns.MAX_TOKEN_BYTES
_STRICT_TOKEN_BYTES = apns.STRICT_TOKEN_BYTES
_STRICT_TOKEN_HEX = 2 * _STRICT_TOKEN_BYTES
_MAX_PAYLOAD = apns.MAX_PAYLOAD
_unhexlify = binascii.unhexlify
_NOT_HEX = (binascii.Error, ValueError)

# rawsse's own per-push override of --delivery-delay (not an Apple header).
DELAY_HEADER = b"rawsse-delivery-delay"

# The headers ``check_push`` reads. A push carrying none of them (Fleet's:
# apns-id and content-length) skips their checks after one C call over its few kept header
# names: ~850 instructions, where a ``dict.get`` for each of the five costs ~470 (callgrind);
# or with none, when its parser says so (``Request.plain``, once per header block: the HTTP/1.1
# fast path's memo).
CHECKED_HEADERS = frozenset({
    b"apns-push-type", b"apns-expiration", b"apns-priority", b"apns-collapse-id", DELAY_HEADER,
})
_HAS_NO_CHECKED_HEADER = CHECKED_HEADERS.isdisjoint


class PushRejected(Exception):
    """A push Apple would refuse: ``status`` and ``reason`` from Apple's table."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def reject(reason: str) -> PushRejected:
    return PushRejected(apns.REASON_STATUS[reason], reason)


class IdGenerator:
    """Fresh lowercase version-4 UUIDs without ``uuid.uuid4()``'s per-call urandom: 74 random
    bits per process in the first four groups, a 48-bit counter from a random start in the last
    (a push costs one bytes format)."""

    __slots__ = ("_form", "_count")

    def __init__(self) -> None:
        value = int.from_bytes(os.urandom(16), "big")
        # version 4 and RFC 4122 variant bits, so every id parses as a UUID everywhere.
        value = (value & ~(0xF << 76) | (4 << 76)) & ~(0x3 << 62) | (0x2 << 62)
        h = b"%032x" % value
        self._form = b"%s-%s-%s-%s-%%012x" % (h[:8], h[8:12], h[12:16], h[16:20])
        self._count = value & 0xFFFFFFFFFFFF

    def new(self) -> bytes:
        self._count = count = (self._count + 1) & 0xFFFFFFFFFFFF
        return self._form % count


def is_apns_id(value: bytes) -> bool:
    """A canonical UUID, as Apple requires of ``apns-id``."""
    return value.translate(UUID_SHAPE) == UUID_FORM


def parse_token(text: bytes, strict: bool) -> bytes:
    """Hex token → raw bytes. Empty → MissingDeviceToken; odd length, non-hex, over
    ``MAX_TOKEN_BYTES``, or (strict) not 32 bytes → BadDeviceToken. ``unhexlify`` accepts either
    case, so tokens are normalised."""
    if not text:
        raise reject("MissingDeviceToken")
    if len(text) > _MAX_TOKEN_HEX:
        raise reject("BadDeviceToken")
    try:
        raw = _unhexlify(text)
    except _NOT_HEX:
        raise reject("BadDeviceToken") from None
    if strict and len(raw) != _STRICT_TOKEN_BYTES:
        raise reject("BadDeviceToken")
    return raw


def parse_broadcast_prefix(text: bytes) -> bytes:
    """A broadcast's token prefix: hex, at most a whole token long, lowercased; else
    BadDeviceToken (the same reason as a token that cannot be one)."""
    prefix = text.lower()
    if len(prefix) > 2 * apns.MAX_TOKEN_BYTES or prefix.translate(None, b"0123456789abcdef"):
        raise reject("BadDeviceToken")
    return prefix


def parse_expiration(value: bytes | None, now: float, default_ttl: float) -> float:
    """apns-expiration → absolute unix seconds. Absent: now + default TTL. ``0`` or a past time:
    deliver now or discard (returned as 0). Capped at Apple's 30-day storage limit."""
    if value is None:
        return now + default_ttl
    text = value.strip()
    digits = text[1:] if text.startswith(b"-") else text
    # Unix seconds fit 19 digits (a signed 64-bit value, as Apple's own parser would hold
    # them). Longer would reach int()'s 4300-digit limit (ValueError) or float() (OverflowError).
    if not digits.isdigit() or len(digits) > MAX_EXPIRATION_DIGITS:
        raise reject("BadExpirationDate")
    expires = int(text)
    if expires <= now:
        return 0.0
    return min(float(expires), now + apns.MAX_STORAGE_SECONDS)


_delay_cache: dict[bytes, Distribution] = {}


def parse_delay(value: bytes) -> Distribution:
    cached = _delay_cache.get(value)
    if cached is None:
        try:
            cached = parse_distribution(value.decode("ascii", "replace"), "rawsse-delivery-delay")
        except ConfigError:
            raise PushRejected(400, "BadDeliveryDelay") from None
        if len(_delay_cache) < 256:  # a sender uses a handful of values; bound the cache
            _delay_cache[value] = cached
    return cached


def payload_limit(headers: dict[bytes, bytes]) -> int:
    """The largest body a push may carry: 5120 bytes for VoIP, 4096 for every other type."""
    return apns.PAYLOAD_LIMITS.get(headers.get(b"apns-push-type"), apns.MAX_PAYLOAD)


def check_push(request: "Request", token_text: bytes, now: float, default_ttl: float,
               strict: bool, ids: IdGenerator) -> tuple[bytes, bytes, float, Distribution | None]:
    """(apns-id, raw token, expiry in unix seconds, ``rawsse-delivery-delay`` or None) of a push
    Apple would accept; else raises ``PushRejected`` with the first reason in the module's
    order (its answer carries ``answer_id``). An expiry <= now means "deliver now or discard"."""
    if request.duplicate:
        raise reject("DuplicateHeaders")
    apns_id = request.apns_id
    if apns_id is None:
        apns_id = ids.new()
    elif request.bad_id:  # (its shape checked once, by the parser)
        raise reject("BadMessageId")
    # Most pushes: nothing more to read in the headers.
    if request.plain or _HAS_NO_CHECKED_HEADER(request.headers):
        expires = now + default_ttl
        limit = _MAX_PAYLOAD
        delay_text = None
    else:
        expires, limit, delay_text = _check_headers(request.headers, now, default_ttl)
    # A good token is taken here without parse_token's call (one per push): with
    # --strict-tokens a 64-digit one (hex of 64 digits is 32 bytes); any other goes to
    # parse_token, which raises its reason.
    size = len(token_text)
    try:
        token = (_unhexlify(token_text) if size == _STRICT_TOKEN_HEX
                 or not strict and 0 < size <= _MAX_TOKEN_HEX else None)
    except _NOT_HEX:
        token = None
    if token is None:
        token = parse_token(token_text, strict)
    body = request.body
    if not body:
        raise reject("PayloadEmpty")
    if len(body) > limit:
        raise reject("PayloadTooLarge")
    return apns_id, token, expires, (None if delay_text is None else parse_delay(delay_text))


def answer_id(given: bytes | None, ids: IdGenerator) -> bytes:
    """The apns-id a push's answer carries: the one sent (``given``), as sent, even when it is
    not a UUID (``400 BadMessageId``): clients match answers to requests by it (aioapns waits
    for its own id, so a fresh one left it waiting for ever); only a request without one gets a
    fresh id."""
    return ids.new() if given is None else given


def _check_headers(headers: dict[bytes, bytes], now: float,
                   default_ttl: float) -> tuple[float, int, bytes | None]:
    """Push type, expiration, priority, collapse id: (expiry, payload limit, delay header)."""
    push_type = headers.get(b"apns-push-type")
    if push_type is not None and push_type not in apns.PUSH_TYPES:
        raise reject("InvalidPushType")
    expires = parse_expiration(headers.get(b"apns-expiration"), now, default_ttl)
    priority = headers.get(b"apns-priority")
    if priority is not None and priority not in apns.PRIORITIES:
        raise reject("BadPriority")
    collapse_id = headers.get(b"apns-collapse-id")
    if collapse_id is not None and len(collapse_id) > apns.MAX_COLLAPSE_ID:
        raise reject("BadCollapseId")
    return (expires, apns.PAYLOAD_LIMITS.get(push_type, apns.MAX_PAYLOAD),
            headers.get(DELAY_HEADER))
