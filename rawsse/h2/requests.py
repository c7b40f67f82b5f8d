"""A request's header block read into its ``Request`` (RFC 9113 §8.3.1), with a memo of blocks.

Theory of operation
-------------------
``RequestDecoder.read`` decodes a HEADERS block with the connection's HPACK ``Decoder`` and
fills the request from its fields (``fill``): method, target, the headers a route reads and the
content-length, or a verdict (``MALFORMED``, ``TOO_LARGE``).

A sender's blocks repeat, in one of two ways, and what they fill in (method, the kept headers,
content-length, the room they leave for ``:path`` under the header list limit: a *shape*) is
kept for each:

- nghttp2's clients (h2load, curl, nghttp, Node's http2) send ``:path`` first as a literal
  without indexing and, from the second request of a connection on, every other field as an
  index, so the bytes after ``:path`` are the same push after push. A block whose ``:path``
  literal is followed by a known *suffix* is read as that literal (decoded inline, its Huffman
  code from the decoder's cache) plus the shape: no field list made, no field looked at.
- Go's ``x/net/http2`` and Netty's encoders index every field, ``:path`` too, so each new
  token is a literal with incremental indexing and every other field an index whose number
  moves as the table turns over: the bytes never repeat, the fields do. Such a block is
  decoded (the table must follow it), and its *field list* with ``:path`` left out (where it
  was stays in the key: a pseudo-field's place matters) finds the shape without ``fill``.

Both are exact (RFC 7541). A field list's shape depends on nothing but the fields. A suffix
decodes the same only while the dynamic table entries it refers to are unchanged, so its shape
is kept only for a block that changed nothing in the table (no insertion, no size update) and
names the decoder's ``generation`` then; any insertion, eviction or size update bumps the
generation, and a shape of another generation is decoded afresh (and kept again). A block with
a second ``:path``, or past the header list limit, is never kept.

The memo holds ``SHAPES`` keys per connection (cleared when full): suffixes of at most
``SUFFIX_MAX`` bytes, field lists of at most ``LIST_MAX``; a connection's sender uses one or
two.
"""

from __future__ import annotations

from typing import Any, cast

from rawsse.apns.apple import REQUEST_HEADERS
from rawsse.h2.hpack import ENTRY_OVERHEAD, Decoder
from rawsse.server.exchange import Request

MALFORMED = -2  # §8.1.1: the stream is reset with PROTOCOL_ERROR
TOO_LARGE = -3  # past MAX_HEADER_LIST_SIZE: the request is answered 431
SHAPES = 64  # distinct suffixes one connection's client sends: a handful
SUFFIX_MAX = 256  # bytes: nghttp2's is about 10; a longer one is not kept (64 × 256 B at most)
LIST_MAX = 1024  # a field list's size (§4.1): Go's is ~300 B; a larger one is not kept
# In a field list's key, where its :path was: a 1-tuple, equal to no field.
_PATH_LEFT_OUT = cast(tuple[bytes, bytes], (b":path",))
Shape = tuple[int, bytes, dict[bytes, bytes], bool, int, int, bytes | None, bool]
_PATH_SIZE = len(b":path") + ENTRY_OVERHEAD
# §8.2.2: connection-specific fields make a request malformed.
_CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                b"transfer-encoding", b"upgrade"})


class RequestDecoder:
    """One connection's header blocks into requests: its HPACK decoder and its shapes."""

    __slots__ = ("hpack", "shapes")

    def __init__(self, max_table_size: int, max_list_size: int) -> None:
        self.hpack = Decoder(max_table_size, max_list_size)
        # suffix bytes, or a field list with its :path left out -> the shape: (generation or
        # -1, method, headers, duplicate, content-length, the bytes left for :path's value,
        # the apns-id, which a Request keeps apart from its headers, and whether it is bad)
        self.shapes: dict[Any, Shape] = {}

    def skip(self, block: bytes) -> None:
        """Decode a block whose fields are not read (trailers, a refused or closed stream):
        the dynamic table must follow it all the same."""
        self.hpack.decode(block)

    def read(self, block: bytes, request: Request) -> int:
        """Fill ``request`` from ``block``: its content-length (-1 when none), or ``MALFORMED``
        or ``TOO_LARGE``. An ``HpackError`` is the connection's (COMPRESSION_ERROR)."""
        hpack = self.hpack
        shapes = self.shapes
        shape = None
        suffix_at = 0
        # §6.2.2/§6.2.3: a literal without indexing (or never indexed) named by static entry 4
        # or 5 (":path"), its value's length in one byte.
        if block[0] & 0xEF in (4, 5) and len(block) > 1 and block[1] & 0x7F < 0x7F:
            suffix_at = 2 + (block[1] & 0x7F)
            shape = shapes.get(block[suffix_at:])
            if shape is not None and shape[0] == hpack.generation:
                # (A kept suffix holds :method at least: the literal before it is whole.)
                value = block[2:suffix_at]
                if block[1] & 0x80:
                    value = hpack.cache.get(value) or hpack.string(block, 1)[0]
                if len(value) > shape[5]:  # past the header list limit
                    shape = None
            else:
                shape = None
        if shape is None:
            generation = hpack.generation
            fields, too_large = hpack.decode(block)
            at = hpack.literal_at
            if at >= 0 and not too_large and fields[at][0] == b":path":
                path_field = fields[at]
                fields[at] = _PATH_LEFT_OUT  # Go's blocks: every field from the table but :path
                key = tuple(fields)
                fields[at] = path_field
                shape = shapes.get(key)
                value = path_field[1]
            else:
                key = None
            if hpack.generation != generation or len(block) - suffix_at > SUFFIX_MAX:
                suffix_at = 0  # the block changed the table: its suffix is not kept
            if shape is None:
                return self._fill(block, request, fields, too_large, suffix_at, key)
            if suffix_at:  # nghttp2's, after a change to the table: its suffix kept again
                self._keep(block[suffix_at:], (generation, *shape[1:]))
        path, _, request.query = value.partition(b"?")
        if not path:
            return MALFORMED
        request.path = path
        request.method = shape[1]
        if shape[2]:  # shared, not copied: a complete request's headers are read-only (exchange.py)
            request.headers = shape[2]
        if shape[3]:
            request.duplicate = True
        if shape[6] is not None:  # an apns-id the sender repeats (indexed, or in the suffix)
            request.apns_id = shape[6]
            request.bad_id = shape[7]
        return shape[4]

    def _fill(self, block: bytes, request: Request, fields: list[tuple[bytes, bytes]],
              too_large: bool, suffix_at: int, key: Any) -> int:
        """``fill``, then its shape kept for the suffix after ``:path`` (``suffix_at``: 0 when
        the block has none, or changed the table) and for the field list (``key``: None when
        it is not one literal :path among indexed fields): what the fields other than
        ``:path`` filled in ``request`` (``:path`` sets only the target) and their size."""
        length = fill(request, fields)
        if length == MALFORMED or too_large:
            return MALFORMED if length == MALFORMED else TOO_LARGE
        if suffix_at or key is not None:
            others = [field for field in fields if field[0] != b":path"]
            size = sum(len(name) + len(value) + ENTRY_OVERHEAD for name, value in others)
            if len(others) == len(fields) - 1 and size <= LIST_MAX:  # no second :path
                headers = dict(request.headers)
                room = self.hpack.max_list_size - size - _PATH_SIZE  # for the :path value
                if suffix_at:
                    self._keep(block[suffix_at:], (self.hpack.generation, request.method,
                                                   headers, request.duplicate, length, room,
                                                   request.apns_id, request.bad_id))
                if key is not None:
                    self._keep(key, (-1, request.method, headers, request.duplicate, length, room,
                                     request.apns_id, request.bad_id))
        return length

    def _keep(self, key: Any, shape: Shape) -> None:
        shapes = self.shapes
        if len(shapes) >= SHAPES:
            shapes.clear()
        shapes[key] = shape


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
