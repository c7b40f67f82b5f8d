"""Preformatted bytes: HTTP status lines and heads, SSE frames. Pure functions, no I/O.

Every byte string a stream receives more than once is built here once: the SSE head, the
``retry:`` preambles, the keepalive comment, and each push's event (one ``bytes`` object shared by
every stream a broadcast reaches).
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from http import HTTPStatus

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ] CRLF
STATUS_LINE: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}

# The SSE response head. Close-delimited body (no Content-Length, no chunking: Fleet's mock does
# the same, chunking costs a size line per frame and WHATWG warns it harms SSE reliability, C.2).
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
    step (reconnect storms are the main hazard after a restart, ops.md §1.5)."""
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


def encode_event(apns_id: bytes, payload: bytes) -> bytes:
    """One push as an SSE event: ``id:``, ``event: ping``, one ``data:`` line per payload line."""
    if b"\n" not in payload and b"\r" not in payload:
        return b"id: %s\nevent: ping\ndata: %s\n\n" % (apns_id, payload)
    lines = _LINE_BREAK.split(payload)
    return b"id: %s\nevent: ping\n%s\n" % (apns_id, b"".join(b"data: %s\n" % line for line in lines))


# -- HTTP responses ----------------------------------------------------------------------------

_date_cache: list = [0, b""]


def date_header() -> bytes:
    """``Date:`` (RFC 9110 §6.6.1: an origin server with a clock sends it), cached per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_cache[1]


def response(status: int, body: bytes = b"", content_type: bytes | None = None,
             extra: bytes = b"", close: bool = False) -> bytes:
    """A complete HTTP/1.1 response. ``extra`` holds preformatted header lines."""
    head = [STATUS_LINE[status], date_header(), extra]
    if content_type is not None:
        head.append(b"Content-Type: " + content_type + b"\r\n")
    head.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


def json_response(status: int, body: bytes, extra: bytes = b"", close: bool = False) -> bytes:
    return response(status, body, b"application/json", extra, close)


def reason_body(reason: str, timestamp_ms: int | None = None) -> bytes:
    """Apple's error body: ``{"reason":"..."}``, plus ``"timestamp"`` (ms) on 410 only (A.6)."""
    if timestamp_ms is None:
        return b'{"reason":"%s"}' % reason.encode()
    return b'{"reason":"%s","timestamp":%d}' % (reason.encode(), timestamp_ms)


def with_connection_close(data: bytes) -> bytes:
    """The last response on a connection says so (RFC 9112 §9.6: a server that closes after a
    response SHOULD send ``Connection: close``); most already do, this covers the rest."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or b"\r\nConnection: close\r\n" in data[:head_end + 2]:
        return data
    first_line = data.find(b"\r\n")
    return data[:first_line + 2] + b"Connection: close\r\n" + data[first_line + 2:]


def with_keep_alive(data: bytes) -> bytes:
    """An answer to an HTTP/1.0 ``Connection: keep-alive`` request says it stays open."""
    first_line = data.find(b"\r\n")
    if first_line < 0:
        return data
    return data[:first_line + 2] + b"Connection: keep-alive\r\n" + data[first_line + 2:]


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
