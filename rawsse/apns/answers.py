"""Answers in Apple's terms: the JSON ``{"reason"}`` error body with its ``apns-id``.

Apple, "Handling notification responses from APNs": every response carries ``apns-id``; an error
has a JSON body whose ``reason`` names it, plus ``timestamp`` (ms) on 410. rawsse answers its own
protocol errors (malformed HTTP, a slow request head) in the same shape, so a client that parses
Apple's errors parses these too.
"""

from __future__ import annotations

from typing import Any

import orjson

from rawsse.server.exchange import Answer

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


def reason_body(reason: str, timestamp_ms: int | None = None) -> bytes:
    """``{"reason":"..."}``, plus ``"timestamp"`` (ms since the epoch) on a 410."""
    if timestamp_ms is None:
        return b'{"reason":"%s"}' % reason.encode()
    return b'{"reason":"%s","timestamp":%d}' % (reason.encode(), timestamp_ms)


def error(status: int, reason: str, apns_id: bytes | None = None,
          timestamp_ms: int | None = None, close: bool = False) -> Answer:
    headers = ((b"apns-id", apns_id),) if apns_id is not None else ()
    return Answer(status, reason_body(reason, timestamp_ms), JSON, headers, close)


def json(status: int, doc: Any, indent: bool = False) -> Answer:
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n" if indent else orjson.dumps(doc)
    return Answer(status, body, JSON)
