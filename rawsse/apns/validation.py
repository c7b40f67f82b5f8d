"""The APNs push request: validate path, headers and payload, in Apple's terms. No I/O.

``validate_push`` turns one ``POST /3/device/<token>`` into a ``PushRequest`` or raises
``PushRejected(status, reason)``. The order of the checks follows Fleet's mock (apns-id,
push type, expiration, token, body: fleetdm/fleet ``cmd/apple-apns-mock/handlers.go``), with the
checks Apple has and Fleet lacks (priority, collapse id, duplicate headers, voip size) slotted in
where Apple's tables put them (Apple, "Sending notification requests to APNs" and "Handling
notification responses from APNs").
"""

from __future__ import annotations

import binascii
import os

from rawsse.apns import apple as apns
from rawsse.config import ConfigError, Distribution, parse_distribution

# Canonical UUID (Apple, "Sending notification requests to APNs", apns-id). Apple documents
# lowercase; Fleet's README (fleetdm/fleet ``cmd/apple-apns-mock/README.md``) shows Apple echoing
# uppercase, so both cases are accepted and echoed as sent. Checked by its shape: every hex digit
# translated to "x", any other byte but "-" to "?", so a UUID reads as ``_UUID_FORM``. One
# translate costs ~400 instructions per push where the equivalent regex
# ``[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-…{12}`` cost ~2,000 (callgrind, bench/push_probe.py).
_UUID_SHAPE = bytes(b"x"[0] if chr(c) in "0123456789abcdefABCDEF" else c if c == 0x2D else 0x3F
                    for c in range(256))
_UUID_FORM = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"

MAX_EXPIRATION_DIGITS = 19

# rawsse's own per-push override of --delivery-delay (not an Apple header).
DELAY_HEADER = b"rawsse-delivery-delay"


class PushRejected(Exception):
    """A push Apple would refuse: ``status`` and ``reason`` from Apple's table."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def reject(reason: str) -> PushRejected:
    return PushRejected(apns.REASON_STATUS[reason], reason)


class PushRequest:
    """A validated push, before routing."""

    __slots__ = ("token", "apns_id", "payload", "expires", "delay")

    def __init__(self, token: bytes, apns_id: bytes, payload: bytes, expires: float,
                 delay: Distribution | None) -> None:
        self.token = token  # raw bytes of the hex token: case-insensitive by construction
        self.apns_id = apns_id
        self.payload = payload
        self.expires = expires  # unix seconds; <= now means "deliver now or discard"
        self.delay = delay


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
    return value.translate(_UUID_SHAPE) == _UUID_FORM


def parse_token(text: bytes, strict: bool) -> bytes:
    """Hex token → raw bytes. Empty → MissingDeviceToken; odd length, non-hex, over
    ``MAX_TOKEN_BYTES``, or (strict) not 32 bytes → BadDeviceToken. ``unhexlify`` accepts either
    case, so tokens are normalised."""
    if not text:
        raise reject("MissingDeviceToken")
    if len(text) > 2 * apns.MAX_TOKEN_BYTES:
        raise reject("BadDeviceToken")
    try:
        raw = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise reject("BadDeviceToken") from None
    if strict and len(raw) != apns.STRICT_TOKEN_BYTES:
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


def validate_push(token_text: bytes, headers: dict[bytes, bytes], duplicate: bool,
                  body: bytes, now: float, default_ttl: float, strict: bool,
                  ids: IdGenerator) -> tuple[bytes, PushRequest | PushRejected]:
    """Returns (apns_id to answer with, request or rejection). Never raises.

    The answer echoes the ``apns-id`` sent even when it is not a UUID (``400 BadMessageId``):
    clients match answers to requests by it (aioapns waits for its own id, so a fresh one
    left it waiting for ever); only a request without one gets a fresh id."""
    given_id = headers.get(b"apns-id")
    apns_id = ids.new() if given_id is None else given_id
    try:
        if duplicate:
            raise reject("DuplicateHeaders")
        if given_id is not None and given_id.translate(_UUID_SHAPE) != _UUID_FORM:
            raise reject("BadMessageId")
        push_type = headers.get(b"apns-push-type")
        if push_type is not None and push_type not in apns.PUSH_TYPES:
            raise reject("InvalidPushType")
        expiration = headers.get(b"apns-expiration")
        expires = (now + default_ttl if expiration is None  # most pushes: no call
                   else parse_expiration(expiration, now, default_ttl))
        priority = headers.get(b"apns-priority")
        if priority is not None and priority not in apns.PRIORITIES:
            raise reject("BadPriority")
        collapse_id = headers.get(b"apns-collapse-id")
        if collapse_id is not None and len(collapse_id) > apns.MAX_COLLAPSE_ID:
            raise reject("BadCollapseId")
        token = parse_token(token_text, strict)
        if not body:
            raise reject("PayloadEmpty")
        if len(body) > apns.PAYLOAD_LIMITS.get(push_type, apns.MAX_PAYLOAD):
            raise reject("PayloadTooLarge")
        delay_text = headers.get(DELAY_HEADER)
        delay = parse_delay(delay_text) if delay_text is not None else None
    except PushRejected as rejected:
        return apns_id, rejected
    return apns_id, PushRequest(token, apns_id, body, expires, delay)
