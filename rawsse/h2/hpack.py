"""HPACK (RFC 7541): the request decoder and the response header blocks.

Decoding
--------
``Decoder.decode(block)`` turns one complete header block into ``(name, value)`` pairs: integers
(§5.1), string literals plain or Huffman-coded (§5.2, ``huffman.py``), indexed fields from the
static (Appendix A) and dynamic tables (§2.3), literals with and without indexing (§6.2), and
dynamic table size updates (§6.3), which must come first in a block and stay within the
SETTINGS_HEADER_TABLE_SIZE we announced. Anything else is an ``HpackError``: a
COMPRESSION_ERROR for the whole connection (RFC 9113 §4.3), since the table is now out of sync.

The header list size (RFC 9113 §6.5.2: names + values + 32 per field) is counted while decoding;
past ``max_list_size`` the fields are no longer kept (a decompression bomb of indexed references
to one big entry costs only the loop, never memory), but the block is still decoded to the end so
the dynamic table stays in step with the peer's encoder.

Huffman-coded strings repeat (topic, push type, a token pushed again), so decoded ones are kept
in a small dict, cleared when full. ``generation`` counts the changes to the dynamic table
(insertions, evictions and size updates all come with one): what reads blocks through a memo
(``requests.py``) checks it to know when a block it decoded before could now decode otherwise.

Encoding
--------
Answers never insert into our dynamic table (every field is "literal without indexing"), so the
peer's table size never matters and a block is plain bytes: ``:status`` by static index where it
has one, then literals. ``response_block`` caches everything but the values that vary.
"""

from __future__ import annotations

import email.utils
import time
from collections import deque

from rawsse.h2 import huffman

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"), (b"accept-language", b""), (b"accept-ranges", b""),
    (b"accept", b""), (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
)
STATIC_COUNT = len(STATIC_TABLE)  # 61
ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
STATIC_SIZES = tuple(len(name) + len(value) + ENTRY_OVERHEAD for name, value in STATIC_TABLE)
HUFFMAN_CACHE_SIZE = 4096


class HpackError(ValueError):
    """The header block cannot be decoded: a COMPRESSION_ERROR (RFC 9113 §4.3)."""


class Decoder:
    """One connection's decoder: its dynamic table and limits."""

    __slots__ = ("table", "sizes", "table_size", "capacity", "max_table_size", "max_list_size",
                 "cache", "generation", "literal_at")

    def __init__(self, max_table_size: int, max_list_size: int) -> None:
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first (index 62)
        self.sizes: deque[int] = deque()  # each entry's size (§4.1), in the table's order
        self.table_size = 0
        self.capacity = max_table_size  # the encoder's current size (§4.2), at most the max
        self.max_table_size = max_table_size  # what our SETTINGS_HEADER_TABLE_SIZE allows
        self.max_list_size = max_list_size
        self.cache: dict[bytes, bytes] = {}
        self.generation = 0  # counts changes to the dynamic table (a memo's shapes name one)
        self.literal_at = -1  # where in the last block's fields its only literal is (below)

    def decode(self, block: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The fields of ``block`` and whether the list went past ``max_list_size`` (then the
        list is incomplete and the request must be refused).

        Written for Go's and Netty's blocks, which index every field (a one-byte index, a
        literal with a static name): those cases take no call but the string's and the
        insertion's, and an entry's size comes from ``sizes``. ``literal_at`` is then the
        index in the fields of the block's one literal (its one field not taken from a table:
        Go's ``:path``), -1 when it has none or more than one."""
        literal_at = -1
        fields: list[tuple[bytes, bytes]] = []
        append = fields.append
        size = 0
        limit = self.max_list_size
        pos, end = 0, len(block)
        while pos < end and block[pos] & 0xE0 == 0x20:  # §4.2: size updates come first
            new_size, pos = _integer(block, pos, 5)
            if new_size > self.max_table_size:
                raise HpackError("table size update above SETTINGS_HEADER_TABLE_SIZE")
            self._resize(new_size)
        table, sizes = self.table, self.sizes
        entries = len(table)  # kept up to date by the insertions below
        while pos < end:
            byte = block[pos]
            if byte & 0x80:  # §6.1 indexed field; a static entry in one byte is the common case
                index = byte & 0x7F
                if 0 < index <= STATIC_COUNT:
                    pos += 1
                    size += STATIC_SIZES[index - 1]
                    if size <= limit:
                        append(STATIC_TABLE[index - 1])
                    continue
                dynamic = index - STATIC_COUNT - 1
                if 0 <= dynamic < entries and index < 0x7F:  # a recent entry, one byte
                    pos += 1
                    size += sizes[dynamic]
                    if size <= limit:
                        append(table[dynamic])
                    continue
                index, pos = _integer(block, pos, 7)
                field = self._field(index)
            elif byte & 0x40:  # §6.2.1 literal with incremental indexing
                index = byte & 0x3F
                if 0 < index <= STATIC_COUNT:  # a static name in the one byte (63: more follow)
                    value, pos = self.string(block, pos + 1)
                    field = (STATIC_TABLE[index - 1][0], value)
                else:
                    field, pos = self._literal(block, pos, 6)
                size += self._insert(field)
                entries = len(table)
                literal_at = len(fields) if literal_at == -1 else -2
                if size <= limit:
                    append(field)
                continue
            elif byte & 0x20:  # §6.3 dynamic table size update
                raise HpackError("table size update after a field")
            else:  # §6.2.2 without indexing, §6.2.3 never indexed: same for a decoder
                index = byte & 0x0F
                if 0 < index < 0x0F:  # a static name in the one byte (15: more bytes follow)
                    value, pos = self.string(block, pos + 1)
                    field = (STATIC_TABLE[index - 1][0], value)
                else:
                    field, pos = self._literal(block, pos, 4)
                literal_at = len(fields) if literal_at == -1 else -2
            size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if size <= limit:
                append(field)
        self.literal_at = literal_at if literal_at >= 0 else -1
        return fields, size > limit

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if index == 0:
            raise HpackError("index 0")
        if index <= STATIC_COUNT:
            return STATIC_TABLE[index - 1]
        dynamic = index - STATIC_COUNT - 1
        if dynamic >= len(self.table):
            raise HpackError(f"index {index} out of range")
        return self.table[dynamic]

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[tuple[bytes, bytes], int]:
        mask = (1 << prefix) - 1
        index = block[pos] & mask
        if index == mask:
            index, pos = _integer(block, pos, prefix)
        else:
            pos += 1
        if not index:
            name, pos = self.string(block, pos)
        elif index <= STATIC_COUNT:
            name = STATIC_TABLE[index - 1][0]
        else:
            name = self._field(index)[0]
        value, pos = self.string(block, pos)
        return (name, value), pos

    def string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        """§5.2: the string literal at ``block[pos]``, Huffman-decoded if it is; (it, next
        position)."""
        if pos >= len(block):
            raise HpackError("truncated string")
        byte = block[pos]
        length = byte & 0x7F
        if length == 0x7F:
            length, pos = _integer(block, pos, 7)
        else:
            pos += 1
        end = pos + length
        if end > len(block):
            raise HpackError("string longer than its block")
        raw = block[pos:end]
        if not byte & 0x80:
            return raw, end
        cache = self.cache
        text = cache.get(raw)
        if text is None:
            try:
                text = huffman.decode(raw)
            except huffman.HuffmanError as exc:
                raise HpackError(str(exc)) from None
            if len(cache) >= HUFFMAN_CACHE_SIZE:
                cache.clear()
            cache[raw] = text
        return text, end

    def _insert(self, field: tuple[bytes, bytes]) -> int:
        """§4.4: evict oldest entries to make room; an entry larger than the table empties it.
        The entry's size."""
        self.generation += 1
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        table, sizes = self.table, self.sizes
        while table and self.table_size + size > self.capacity:
            table.pop()
            self.table_size -= sizes.pop()
        if size <= self.capacity:
            table.appendleft(field)
            sizes.appendleft(size)
            self.table_size += size
        return size

    def _resize(self, new_size: int) -> None:
        self.generation += 1
        self.capacity = new_size
        table, sizes = self.table, self.sizes
        while table and self.table_size > new_size:
            table.pop()
            self.table_size -= sizes.pop()


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """§5.1: an integer with an N-bit prefix at ``block[pos]``; (value, next position)."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(block)
    while True:
        if pos >= end:
            raise HpackError("truncated integer")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:  # nothing we accept needs more than 2**28
            raise HpackError("integer too large")


# -- encoding responses -----------------------------------------------------------------------

def integer(value: int, prefix: int, first: int = 0) -> bytes:
    """§5.1 encoding, ``first`` holding the representation's flag bits."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing, new name (§6.2.2), no Huffman."""
    return b"\x00" + integer(len(name), 7) + name + integer(len(value), 7) + value


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """A literal without indexing whose name is static entry ``index`` (§6.2.2)."""
    return integer(index, 4) + integer(len(value), 7) + value


_STATUS_INDEX = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}
STATUS: dict[int, bytes] = {}
for _code in range(100, 600):
    STATUS[_code] = (integer(_STATUS_INDEX[_code], 7, 0x80) if _code in _STATUS_INDEX
                     else literal_indexed_name(8, b"%d" % _code))
CONTENT_TYPE_INDEX = 31
CONTENT_LENGTH_INDEX = 28
DATE_INDEX = 33
APNS_ID_NAME = b"\x00\x07apns-id"

_name_prefix: dict[bytes, bytes] = {}
_date_cache: list = [0, b"", b""]  # the second, its ``date`` field, a 200's block up to apns-id


def _date() -> bytes:
    """``date`` (RFC 9110 §6.6.1), encoded once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _new_second(now)
    return _date_cache[1]


def _new_second(now: int) -> None:
    _date_cache[0] = now
    date = literal_indexed_name(DATE_INDEX, email.utils.formatdate(now, usegmt=True).encode())
    _date_cache[1] = date
    _date_cache[2] = STATUS[200] + date + APNS_ID_NAME


def ok_block(apns_id: bytes) -> bytes:
    """The header block of a push's plain 200 (``:status``, ``date``, ``apns-id``): the cached
    status and date, the cached name and the id, one concatenation (an id under 127 bytes: a
    200's is a UUID's 36); the second checked here, not in a call to ``_date``."""
    length = len(apns_id)
    if length >= 127:
        return response_block(200, ((b"apns-id", apns_id),), None, 0)
    now = int(time.time())
    if _date_cache[0] != now:
        _new_second(now)
    return _date_cache[2] + _SMALL_LENGTH[length] + apns_id


def response_block(status: int, headers: tuple[tuple[bytes, bytes], ...],
                   content_type: bytes | None, body_length: int) -> bytes:
    """The header block of an answer: ``:status``, ``date``, the answer's own fields (a 200
    with ``apns-id`` is the cached status and date, the cached name and the id), content-type
    and content-length when there is a body."""
    if status == 200 and len(headers) == 1 and not body_length and content_type is None:
        name, value = headers[0]
        if name == b"apns-id" and len(value) < 127:
            return ok_block(value)
    parts = [STATUS[status], _date()]
    for name, value in headers:
        prefix = _name_prefix.get(name)
        if prefix is None:
            lower = name.lower()  # RFC 9113 §8.2.1: field names are lower-case in HTTP/2
            prefix = _name_prefix[name] = b"\x00" + integer(len(lower), 7) + lower
        parts.append(prefix)
        parts.append(integer(len(value), 7) if len(value) >= 127 else _SMALL_LENGTH[len(value)])
        parts.append(value)
    if content_type is not None:
        parts.append(literal_indexed_name(CONTENT_TYPE_INDEX, content_type))
    if body_length:
        parts.append(literal_indexed_name(CONTENT_LENGTH_INDEX, b"%d" % body_length))
    return b"".join(parts)


_SMALL_LENGTH = [bytes((n,)) for n in range(127)]
