"""Facts of Apple's provider API that rawsse reproduces: reasons, statuses, push types, limits.

Sources: Apple "Handling notification responses from APNs" (status/reason table) and "Sending
notification requests to APNs" (headers, push types, payload limits, storage); sideshow/apns2
``response.go`` carries the same table.
"""

from __future__ import annotations

# reason -> HTTP status: Apple, "Handling notification responses from APNs" (sideshow/apns2
# ``response.go``, jchambers/pushy ``RejectionReason.java``: the same mapping).
REASON_STATUS: dict[str, int] = {
    "BadCollapseId": 400,
    "BadDeviceToken": 400,
    "BadExpirationDate": 400,
    "BadMessageId": 400,
    "BadPriority": 400,
    "BadTopic": 400,
    "DeviceTokenNotForTopic": 400,
    "DuplicateHeaders": 400,
    "IdleTimeout": 400,
    "InvalidPushType": 400,
    "MissingDeviceToken": 400,
    "MissingTopic": 400,
    "PayloadEmpty": 400,
    "TopicDisallowed": 400,
    "BadCertificate": 403,
    "BadCertificateEnvironment": 403,
    "ExpiredProviderToken": 403,
    "Forbidden": 403,
    "InvalidProviderToken": 403,
    "MissingProviderToken": 403,
    "UnrelatedKeyIdInToken": 403,
    "BadEnvironmentKeyIdInToken": 403,
    "BadPath": 404,
    "MethodNotAllowed": 405,
    "ExpiredToken": 410,
    "Unregistered": 410,
    "PayloadTooLarge": 413,
    "TooManyProviderTokenUpdates": 429,
    "TooManyRequests": 429,
    "InternalServerError": 500,
    "ServiceUnavailable": 503,
    "Shutdown": 503,
}

# The reason used when a fault rule names only a status.
DEFAULT_REASON: dict[int, str] = {
    400: "BadDeviceToken",
    403: "Forbidden",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}

# apns-push-type values Apple accepts (Apple, "Sending notification requests to APNs";
# sideshow/apns2 ``notification.go``), including the iOS 18 widgets/controls types.
PUSH_TYPES = frozenset({
    b"alert", b"background", b"location", b"voip", b"complication", b"fileprovider", b"mdm",
    b"liveactivity", b"pushtotalk", b"widgets", b"controls",
})

PRIORITIES = frozenset({b"1", b"5", b"10"})

# Payload limits (Apple, "Sending notification requests to APNs"): 4 KB for every type but VoIP,
# 5 KB for VoIP.
MAX_PAYLOAD = 4096
MAX_PAYLOAD_VOIP = 5120
# apns-push-type (None when absent) -> payload limit; MAX_PAYLOAD for every other type.
PAYLOAD_LIMITS: dict[bytes | None, int] = {b"voip": MAX_PAYLOAD_VOIP}
MAX_COLLAPSE_ID = 64
# APNs stores a notification for at most 30 days (Apple, "Sending notification requests to APNs",
# apns-expiration).
MAX_STORAGE_SECONDS = 30 * 24 * 3600
# Apple's tokens are 32 bytes; --strict-tokens enforces it (Fleet's test tokens are shorter).
STRICT_TOKEN_BYTES = 32
# The longest token accepted without --strict-tokens (pushes, /events, admin tokens; a broadcast
# prefix is at most this many bytes of hex). Apple documents device tokens as of variable length
# and warns against hard-coding their size (Apple, "Registering your app with APNs"), so a
# simulator must take more than 32 bytes; 100 leaves three times today's size, fits the
# one-byte length fields of the node's mesh records (255) and keeps a stored token small. Longer
# is BadDeviceToken, Apple's reason for a token it cannot use.
MAX_TOKEN_BYTES = 100

# Headers an APNs request may not repeat: a repeated one is 400 DuplicateHeaders (Apple, "Sending
# notification requests to APNs"; the reason is in "Handling notification responses from APNs").
SINGLE_HEADERS = frozenset({
    b"apns-id", b"apns-push-type", b"apns-expiration", b"apns-priority", b"apns-topic",
    b"apns-collapse-id", b"authorization",
})

# The request headers a route reads: Apple's above, the body's framing (content-length, expect)
# and rawsse's own per-push delay.
REQUEST_HEADERS = SINGLE_HEADERS | {b"content-length", b"expect", b"rawsse-delivery-delay"}

# Canonical UUID (Apple, "Sending notification requests to APNs", apns-id). Apple documents
# lowercase; Fleet's README (fleetdm/fleet ``cmd/apple-apns-mock/README.md``) shows Apple echoing
# uppercase, so both cases are accepted and echoed as sent. Checked by its shape: every hex digit
# translated to "x", any other byte but "-" to "?", so a UUID reads as ``UUID_FORM``; once per
# request, by the parser (``Request.bad_id``: ``exchange.py``, ``http1_fast.py``). One
# translate costs ~400 instructions per push where the equivalent regex
# ``[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-…{12}`` cost ~2,000 (callgrind, bench/push_probe.py).
UUID_SHAPE = bytes(b"x"[0] if chr(c) in "0123456789abcdefABCDEF" else c if c == 0x2D else 0x3F
                    for c in range(256))
UUID_FORM = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
