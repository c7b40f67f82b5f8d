"""What ``rawsse push --http2`` sends on a stream: the HPACK header block (RFC 7541) and the body.

The encoder never Huffman-codes, and the fields that never change on a connection go into the
server's dynamic table once (§6.2.1, literals with incremental indexing in the first block) and
are one-byte indexed fields (§6.1) in every later block, as Go's and nghttp2's encoders do:
``:authority`` and, with ``--headers fleet`` (what Go's HTTP/2 transport sends for Fleet),
``content-type: application/json``, ``user-agent: Go-http-client/2.0``, ``accept-encoding: gzip``.
``:method POST`` and ``:scheme`` are static-table indexes (Appendix A: 3, 6/7). Per push only
``:path`` (static name 4), ``content-length`` (static name 28) and the ``apns-id`` /
``apns-expiration`` literals are encoded, without indexing: a few small concatenations, no field
list. A server whose SETTINGS_HEADER_TABLE_SIZE cannot hold the constant fields gets them as
literals without indexing in every block (``LITERAL``).
"""

from __future__ import annotations

import argparse
import time
from random import getrandbits

from rawsse.h2.hpack import STATIC_COUNT, STATIC_TABLE, integer, literal_indexed_name
from rawsse.load.pushrequest import SERIAL_MARK, RequestBuilder
from rawsse.load.stamp import ID_PREFIX, ID_RANDOM, RAND_HIGH, RAND_LOW, stamp_fields

METHOD_POST = integer(3, 7, 0x80)  # §6.1 indexed field: static entry 3, :method POST
SCHEME = {"http": integer(6, 7, 0x80), "https": integer(7, 7, 0x80)}
AUTHORITY_INDEX, PATH_INDEX, CONTENT_LENGTH_INDEX = 1, 4, 28
CONTENT_TYPE_INDEX, ACCEPT_ENCODING_INDEX, USER_AGENT_INDEX = 31, 16, 58
APNS_ID_NAME = b"\x00\x07apns-id"  # a literal without indexing, new name (§6.2.2)
APNS_EXPIRATION_NAME = b"\x00\x0fapns-expiration"
_SMALL_LENGTH = [bytes((n,)) for n in range(127)]  # a string length under 127: one byte (§5.2)
LITERAL, PRIME, INDEXED = range(3)  # how a block carries the constant fields (see above)


class H2RequestEncoder:
    """The header block and body of one push over HTTP/2 (the same choices as ``RequestBuilder``
    for HTTP/1.1: ``--headers``, ``--no-stamp``, ``--expiration``, ``--payload``)."""

    def __init__(self, args: argparse.Namespace, authority: str, base_path: str,
                 scheme: str) -> None:
        self.paths = RequestBuilder(args, authority, base_path)  # the routes and the payload
        constant = [(AUTHORITY_INDEX, authority.encode())]
        if args.headers == "fleet":
            constant += [(CONTENT_TYPE_INDEX, b"application/json"),
                         (USER_AGENT_INDEX, b"Go-http-client/2.0"),
                         (ACCEPT_ENCODING_INDEX, b"gzip")]
        # RFC 7541 §4.1: what the constant fields take in the server's table
        self.table_size = sum(len(STATIC_TABLE[index - 1][0]) + len(value) + 32
                              for index, value in constant)
        start = METHOD_POST + SCHEME[scheme]
        self.heads: list[bytes] = [
            start + literal_indexed_name(AUTHORITY_INDEX, constant[0][1]),
            start + _indexed_literal(*constant[0]),
            start + integer(STATIC_COUNT + len(constant), 7, 0x80)]  # the oldest entry
        self.tails: list[bytes] = [
            b"".join(literal_indexed_name(index, value) for index, value in constant[1:]),
            b"".join(_indexed_literal(index, value) for index, value in constant[1:]),
            b"".join(integer(STATIC_COUNT + n, 7, 0x80) for n in range(len(constant) - 1, 0, -1))]
        self.path_name = integer(PATH_INDEX, 4)
        self.stamped_at = -1.0  # the apns-id's time fields of the last push, as bytes
        self.stamp_prefix = b""
        self.length_name = integer(CONTENT_LENGTH_INDEX, 4)

    def encode(self, path_token: bytes | None, serial: bytes, stamp_at: float,
               table: int = LITERAL) -> tuple[bytes, bytes]:
        """(header block, body) of a push to ``path_token`` (None: the broadcast route);
        ``table``: LITERAL, PRIME (the connection's first block) or INDEXED (every later one)."""
        paths = self.paths
        body = paths.payload.replace(SERIAL_MARK, serial) if paths.templated else paths.payload
        path = paths.broadcast_path if path_token is None else paths.device_prefix + path_token
        length = b"%d" % len(body)
        parts = [self.heads[table], self.path_name, _length(len(path)), path,
                 self.length_name, _SMALL_LENGTH[len(length)], length]
        if paths.expiration is not None:
            value = b"0" if paths.expiration == 0 else b"%d" % int(time.time() + paths.expiration)
            parts += (APNS_EXPIRATION_NAME, _SMALL_LENGTH[len(value)], value)
        if paths.stamp:
            if stamp_at != self.stamped_at:  # the pushes of one batch share the time fields
                self.stamped_at = stamp_at
                self.stamp_prefix = ID_PREFIX % stamp_fields(stamp_at)
            r = getrandbits(62)
            parts += (APNS_ID_NAME, b"\x24", self.stamp_prefix,  # 36 characters in all
                      ID_RANDOM % (RAND_HIGH | r >> 48, r & RAND_LOW))
        parts.append(self.tails[table])
        return b"".join(parts), body


def _indexed_literal(index: int, value: bytes) -> bytes:
    """A literal with incremental indexing whose name is static entry ``index`` (§6.2.1)."""
    return integer(index, 6, 0x40) + _length(len(value)) + value


def _length(n: int) -> bytes:
    return _SMALL_LENGTH[n] if n < 127 else integer(n, 7)

