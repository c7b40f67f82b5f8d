"""HTTP/2 frames (RFC 9113 §4.1, §6): type and flag numbers, error codes, the 9-byte header and
the frames the server writes. No I/O, no state.

Every frame starts with length (24 bits), type, flags and a 31-bit stream id (``HEADER``,
unpacked as one byte + one short for the length). Frames the server sends are built here as
bytes; the connection appends them to its output buffer.
"""

from __future__ import annotations

import struct

import orjson

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4

HEADER = struct.Struct(">BHBBL")
HEADER_SIZE = 9

# §6: frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9

# flags
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# §6.5.2 settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

# §7 error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x4, 0x5, 0x6, 0x7
CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = 0x8, 0x9, 0xA, 0xB
INADEQUATE_SECURITY, HTTP_1_1_REQUIRED = 0xC, 0xD

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MIN_FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = 2**24 - 1


class ConnectionError_(Exception):
    """A connection error (§5.4.1): GOAWAY with ``code`` and a JSON reason, then close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def header(length: int, type_: int, flags: int, stream_id: int) -> bytes:
    return HEADER.pack(length >> 16, length & 0xFFFF, type_, flags, stream_id)


def settings(values: dict[int, int]) -> bytes:
    body = b"".join(struct.pack(">HL", key, value) for key, value in values.items())
    return header(len(body), SETTINGS, 0, 0) + body


SETTINGS_ACK = header(0, SETTINGS, ACK, 0)


def ping_ack(opaque: bytes) -> bytes:
    return header(8, PING, ACK, 0) + opaque


def rst_stream(stream_id: int, code: int) -> bytes:
    return header(4, RST_STREAM, 0, stream_id) + struct.pack(">L", code)


def window_update(stream_id: int, increment: int) -> bytes:
    return header(4, WINDOW_UPDATE, 0, stream_id) + struct.pack(">L", increment)


def goaway(last_stream_id: int, code: int, reason: str) -> bytes:
    """GOAWAY whose debug data is ``{"reason": ...}``, the shape Apple's provider API uses."""
    debug = orjson.dumps({"reason": reason})
    return (header(8 + len(debug), GOAWAY, 0, 0)
            + struct.pack(">LL", last_stream_id, code) + debug)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    return [struct.unpack_from(">HL", payload, pos) for pos in range(0, len(payload), 6)]
