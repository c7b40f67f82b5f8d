"""What ``rawsse push --http2`` sends on a stream: the HPACK header block (RFC 7541) and the body.

The encoder never inserts into the server's dynamic table (every literal is "without indexing",
§6.2.2) and never Huffman-codes, so a block is plain bytes and its constant part is built once:
``:method POST`` and ``:scheme`` are static-table indexes (Appendix A: 3, 6/7), ``:authority``
is a literal with the static name 1, and the headers that never change (``--headers fleet``: what
Go's HTTP/2 transport sends for Fleet, ``content-type: application/json``, ``user-agent:
Go-http-client/2.0``, ``accept-encoding: gzip``) are one cached tail. Per push only ``:path``
(static name 4), ``content-length`` (static name 28) and the ``apns-id`` / ``apns-expiration``
literals are encoded: a few small concatenations, no field list.
"""

from __future__ import annotations

import argparse
import time

from rawsse.h2.hpack import integer, literal_indexed_name
from rawsse.load.pushrequest import SERIAL_MARK, RequestBuilder
from rawsse.load.stamp import new_stamped_id

METHOD_POST = integer(3, 7, 0x80)  # §6.1 indexed field: static entry 3, :method POST
SCHEME = {"http": integer(6, 7, 0x80), "https": integer(7, 7, 0x80)}
AUTHORITY_INDEX, PATH_INDEX, CONTENT_LENGTH_INDEX = 1, 4, 28
CONTENT_TYPE_INDEX, ACCEPT_ENCODING_INDEX, USER_AGENT_INDEX = 31, 16, 58
APNS_ID_NAME = b"\x00\x07apns-id"  # a literal without indexing, new name (§6.2.2)
APNS_EXPIRATION_NAME = b"\x00\x0fapns-expiration"
_SMALL_LENGTH = [bytes((n,)) for n in range(127)]  # a string length under 127: one byte (§5.2)


class H2RequestEncoder:
    """The header block and body of one push over HTTP/2 (the same choices as ``RequestBuilder``
    for HTTP/1.1: ``--headers``, ``--no-stamp``, ``--expiration``, ``--payload``)."""

    def __init__(self, args: argparse.Namespace, authority: str, base_path: str,
                 scheme: str) -> None:
        self.paths = RequestBuilder(args, authority, base_path)  # the routes and the payload
        self.head = (METHOD_POST + SCHEME[scheme]
                     + literal_indexed_name(AUTHORITY_INDEX, authority.encode()))
        if args.headers == "fleet":
            self.tail = (literal_indexed_name(CONTENT_TYPE_INDEX, b"application/json")
                         + literal_indexed_name(USER_AGENT_INDEX, b"Go-http-client/2.0")
                         + literal_indexed_name(ACCEPT_ENCODING_INDEX, b"gzip"))
        else:
            self.tail = b""
        self.path_name = integer(PATH_INDEX, 4)
        self.length_name = integer(CONTENT_LENGTH_INDEX, 4)

    def encode(self, path_token: bytes | None, serial: bytes, stamp_at: float) -> tuple[bytes, bytes]:
        """(header block, body) of a push to ``path_token`` (None: the broadcast route)."""
        paths = self.paths
        body = paths.payload.replace(SERIAL_MARK, serial) if paths.templated else paths.payload
        path = paths.broadcast_path if path_token is None else paths.device_prefix + path_token
        length = b"%d" % len(body)
        parts = [self.head, self.path_name, _length(len(path)), path,
                 self.length_name, _SMALL_LENGTH[len(length)], length]
        if paths.expiration is not None:
            value = b"0" if paths.expiration == 0 else b"%d" % int(time.time() + paths.expiration)
            parts += (APNS_EXPIRATION_NAME, _SMALL_LENGTH[len(value)], value)
        if paths.stamp:
            parts += (APNS_ID_NAME, b"\x24", new_stamped_id(stamp_at).encode())  # 36 chars
        parts.append(self.tail)
        return b"".join(parts), body


def _length(n: int) -> bytes:
    return _SMALL_LENGTH[n] if n < 127 else integer(n, 7)

