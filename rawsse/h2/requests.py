"""A request's header block read into its ``Request`` (RFC 9113 §8.3.1), with a memo of blocks.

Theory of operation
-------------------
``RequestDecoder.read`` decodes a HEADERS block with the connection's HPACK ``Decoder`` and
fills the request from its fields (``fill``): method, target, the headers a route reads and the
content-length, or a verdict (``MALFORMED``, ``TOO_LARGE``).

A sender's blocks repeat. nghttp2's clients (h2load, curl, nghttp, Node's http2) send
``:path`` first as a literal without indexing and, from the second request of a connection on,
every other field as an index, so the bytes after ``:path`` are the same push after push. What
those bytes fill in (method, headers, content-length, their share of the header list size) is
kept as a ``shape``, keyed by the bytes; a block whose ``:path`` literal is followed by a known
suffix is read as that literal (decoded inline, its Huffman code from the decoder's cache) plus
the shape, with no field list made and no field looked at.

The memo is exact (RFC 7541): a block decodes the same only while the dynamic table entries it
refers to are unchanged, so a shape is kept only for a block that changed nothing in the table
(no insertion, no size update: its own decoding could not differ the next time but for the
table) and names the decoder's ``generation`` then; any insertion, eviction or size update
bumps the generation, and a shape of another generation is decoded afresh. A block whose
representations insert (Go's, Netty's: every field "with incremental indexing") is never kept:
it must go through the decoder for the table to follow the peer's.

The memo holds ``SHAPES`` suffixes of at most ``SUFFIX_MAX`` bytes per connection (cleared when
full); a connection's sender uses one or two.
"""

from __future__ import annotations

from rawsse.apns.apple import REQUEST_HEADERS
from rawsse.h2.hpack import ENTRY_OVERHEAD, Decoder
from rawsse.server.exchange import Request

MALFORMED = -2  # §8.1.1: the stream is reset with PROTOCOL_ERROR
TOO_LARGE = -3  # past MAX_HEADER_LIST_SIZE: the request is answered 431
SHAPES = 64  # distinct suffixes one connection's client sends: a handful
SUFFIX_MAX = 256  # bytes: nghttp2's is about 10; a longer one is not kept (64 × 256 B at most)
_PATH_SIZE = len(b":path") + ENTRY_OVERHEAD
# §8.2.2: connection-specific fields make a request malformed.
_CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                b"transfer-encoding", b"upgrade"})


class RequestDecoder:
    """One connection's header blocks into requests: its HPACK decoder and its shapes."""

    __slots__ = ("hpack", "shapes")

    def __init__(self, max_table_size: int, max_list_size: int) -> None:
        self.hpack = Decoder(max_table_size, max_list_size)
        # suffix bytes -> (generation, method, headers, duplicate, content-length, list size)
        self.shapes: dict[bytes, tuple[int, bytes, dict[bytes, bytes], bool, int, int]] = {}

    def skip(self, block: bytes) -> None:
        """Decode a block whose fields are not read (trailers, a refused or closed stream):
        the dynamic table must follow it all the same."""
        self.hpack.decode(block)

    def read(self, block: bytes, request: Request) -> int:
        """Fill ``request`` from ``block``: its content-length (-1 when none), or ``MALFORMED``
        or ``TOO_LARGE``. An ``HpackError`` is the connection's (COMPRESSION_ERROR)."""
        hpack = self.hpack
        suffix_at = 0
        # §6.2.2/§6.2.3: a literal without indexing (or never indexed) named by static entry 4
        # or 5 (":path"), its value's length in one byte.
        if block[0] & 0xEF in (4, 5) and len(block) > 1 and block[1] & 0x7F < 0x7F:
            suffix_at = 2 + (block[1] & 0x7F)
            shape = self.shapes.get(block[suffix_at:])
            if shape is not None and shape[0] == hpack.generation:
                # (A kept suffix holds :method at least: the literal before it is whole.)
                value = block[2:suffix_at]
                if block[1] & 0x80:
                    value = hpack.cache.get(value) or hpack.string(block, 1)[0]
                if shape[5] + _PATH_SIZE + len(value) <= hpack.max_list_size:
                    request.path, _, request.query = value.partition(b"?")
                    if request.path:
                        request.method = shape[1]
                        if shape[2]:
                            request.headers = shape[2].copy()
                        request.duplicate = shape[3]
                        return shape[4]
                    return MALFORMED
        generation = hpack.generation
        fields, too_large = hpack.decode(block)
        length = fill(request, fields)
        if length == MALFORMED or too_large:
            return MALFORMED if length == MALFORMED else TOO_LARGE
        if (suffix_at and hpack.generation == generation and len(block) - suffix_at <= SUFFIX_MAX
                and all(name != b":path" for name, _ in fields[1:])):
            self._keep(block[suffix_at:], request, length, fields)
        return length

    def _keep(self, suffix: bytes, request: Request, length: int,
              fields: list[tuple[bytes, bytes]]) -> None:
        """The shape of a suffix after ``:path``: what it filled in ``request`` (the ``:path``
        field before it sets only the target, so the rest is the suffix's alone)."""
        shapes = self.shapes
        if len(shapes) >= SHAPES:
            shapes.clear()
        size = sum(len(name) + len(value) for name, value in fields[1:])
        shapes[suffix] = (self.hpack.generation, request.method, dict(request.headers),
                          request.duplicate, length, size + ENTRY_OVERHEAD * (len(fields) - 1))


def fill(request: Request, fields: list[tuple[bytes, bytes]]) -> int:
    """The request's method, target and kept headers from its fields; its content-length (-1
    when none), or ``MALFORMED`` (§8.3.1: pseudo-fields first, :method and :path present;
    §8.2.2). One dict lookup per field (``_KINDS``) says what it is; a header no route reads
    costs nothing more."""
    regular = False
    length = -1
    for name, value in fields:
        kind = _KINDS.get(name)
        if kind is None:  # not read by any route: host (aioapns' :authority), user-agent, ...
            if name[:1] == b":":
                return MALFORMED  # an unknown pseudo-field
            regular = True
            continue
        if kind <= _PSEUDO:
            if regular:
                return MALFORMED
            if kind == _METHOD:
                request.method = value
            elif kind == _PATH:
                request.path, _, request.query = value.partition(b"?")
            continue
        regular = True
        if kind == _CONNECTION:
            return MALFORMED
        if kind == _LENGTH:
            if not value.isdigit():
                return MALFORMED
            length = int(value)
        elif kind == _APNS_ID and (b"\r" in value or b"\n" in value or b"\x00" in value):
            return MALFORMED  # §8.2.1: malformed; and the answer echoes apns-id as sent
        request.add_header(name, value)
    return length if request.method and request.path else MALFORMED


_METHOD, _PATH, _PSEUDO, _CONNECTION, _LENGTH, _APNS_ID, _KEPT = range(7)
_KINDS: dict[bytes, int] = {
    **{name: _KEPT for name in REQUEST_HEADERS},
    **{name: _CONNECTION for name in _CONNECTION_FIELDS},
    b":method": _METHOD, b":path": _PATH, b":scheme": _PSEUDO, b":authority": _PSEUDO,
    b"content-length": _LENGTH, b"apns-id": _APNS_ID,
}
