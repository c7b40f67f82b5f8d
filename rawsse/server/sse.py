"""Server-Sent Events bytes: the stream's head, ``retry:`` preambles, keepalives, events. No I/O.

Every byte string a stream receives more than once is built here once: the SSE head, the
``retry:`` preambles, the keepalive comment, and each push's event (one ``bytes`` object shared by
every stream a broadcast reaches). The wire format is WHATWG HTML §9.2 "Server-sent events".
"""

from __future__ import annotations

import random
import re

# The SSE response head. Close-delimited body (no Content-Length, no chunking: Fleet's mock,
# fleetdm/fleet cmd/apple-apns-mock, does the same; chunking costs a size line per frame, and
# WHATWG HTML §9.2.7 "Authoring notes" cautions that chunking can harm the stream's reliability).
# X-Accel-Buffering: no stops nginx buffering the stream (nginx/nginx#1505).
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Connection: close\r\n"
    b"\r\n"
)

# A comment line is ignored by every SSE parser (WHATWG §9.2.6); Fleet's client and tests expect
# exactly the text "keepalive".
SSE_KEEPALIVE = b": keepalive\n\n"

# Number of distinct preformatted connect preambles: enough spread for the reconnect jitter while
# every stream still shares one of a few dozen bytes objects.
_RETRY_VARIANTS = 32


def retry_preambles(retry_ms: int) -> tuple[bytes, ...]:
    """SSE head + ``retry:`` field, jittered ±50% so clients that honour it do not reconnect in
    step (after a restart every device reconnects at once otherwise)."""
    if retry_ms <= 0:
        return (SSE_HEAD,)
    rng = random.Random(retry_ms)
    out = []
    for _ in range(_RETRY_VARIANTS):
        ms = int(retry_ms * rng.uniform(0.5, 1.5))
        out.append(SSE_HEAD + b"retry: %d\n\n" % ms)
    return tuple(out)


# WHATWG: a line ends at CRLF, LF or a lone CR. Every one of them must start a new data: line or
# the payload would be cut (or a stray "\r" would end a field early).
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# The bytes as ints: ``b"\n" in payload`` first tries its operand as an integer and raises (and
# clears) a TypeError inside, ~2,000 instructions a test (callgrind); an int is one memchr.
LF, CR = ord("\n"), ord("\r")
# The event of a payload with neither LF nor CR (nearly every one): ``% (apns_id, payload)``.
# The push route formats it itself (``LF not in payload and CR not in payload``): a call less.
ONE_LINE_EVENT = b"id: %s\nevent: ping\ndata: %s\n\n"


def encode_event(apns_id: bytes, payload: bytes) -> bytes:
    """One push as an SSE event: ``id:``, ``event: ping``, one ``data:`` line per payload line."""
    if LF not in payload and CR not in payload:
        return ONE_LINE_EVENT % (apns_id, payload)
    lines = _LINE_BREAK.split(payload)
    return b"id: %s\nevent: ping\n%s\n" % (apns_id, b"".join(b"data: %s\n" % line for line in lines))
