"""The common HTTP/1.1 request read straight from the bytes, without httptools' callbacks.

Theory of operation
-------------------
httptools calls back into Python once per piece of a request: begin, URL, each header, end of
head, body, end of message; a push from Go's net/http (Fleet's client) makes ten of those calls,
six of them ``on_header``. ``read_request`` reads a complete request with a few bytes
operations instead: find the end of the head, split off the request line, look the header
block up in a memo of blocks seen before (a sender's headers are the same push after push, so
the last block found is compared first; an apns-id, different per push, is cut out first and
its UUID shape checked), else one pass over its lines keeping the names
the routes read (``HEADER_NAMES``), then slice the body by its Content-Length. It is the narrow
part of a parser the project writes itself because the library is too slow for the hot path;
``http1.py`` calls it only between requests (nothing inside httptools), and everything it is not sure of goes to
httptools from that byte on, so every rule of ``http1.py`` (400, 413, 431, 505, ``Expect``,
``Upgrade``, ``Connection``, HTTP/1.0, a request split over reads) stays where it is.

Rules
-----
A request is taken only when it is inside a strict subset of RFC 9112 that llhttp
(``nodejs/llhttp``, ``src/llhttp/http.ts``, what httptools runs) reads the same way, so no
request means one thing here and another there (request smuggling); anything else is declined
(``None``), never refused, here:

- §2.1/§2.2: the whole head is in the buffer, lines end with CRLF (a bare CR or LF anywhere
  declines), no empty line before the request line, at most ``head_limit`` bytes
  (``--header-limit``: over it httptools counts and answers 431).
- §3: ``method SP request-target SP HTTP-version`` with single spaces; the method one of
  ``METHODS`` (case-sensitive, RFC 9110 §9.1); the target in origin-form (§3.2.1) made of
  unreserved, sub-delims, ``%``, ``:``, ``@``, ``/``, ``?`` only (RFC 3986 §3.3, §3.4; no
  fragment); the version exactly ``HTTP/1.1`` (an HTTP/1.0 request has its own keep-alive rule).
- §5: ``field-name ":" OWS field-value OWS`` with a token name (RFC 9110 §5.6.2: no space before
  the colon, no obs-fold, §5.2); the head holds only visible ASCII, SP and HTAB (no control byte,
  no obs-text); a kept value does not end in whitespace (llhttp keeps trailing OWS, RFC 9110
  §5.5 says it is not part of the value).
- §6: the body is framed by one Content-Length of at most ``MAX_BODY`` in plain digits, or by
  nothing (§6.3 rule 7: no body); a second Content-Length (§6.3 rule 5: llhttp refuses it),
  Transfer-Encoding (§6.1), and Connection, Proxy-Connection, Upgrade and Expect (what
  ``http1.py`` acts on) decline, so does a body not yet wholly read.
"""

from __future__ import annotations

import re
from typing import Any

from rawsse.apns.apple import REQUEST_HEADERS, SINGLE_HEADERS, UUID_FORM, UUID_SHAPE
from rawsse.apns.validation import CHECKED_HEADERS
from rawsse.server.exchange import Request

MAX_BODY = 64 * 1024  # largest body any route reads (admin JSON); pushes stop at 5120

# Header names as senders spell them (lower case; Go's canonical ``Apns-Id``) → the lower-case
# name a request keeps, or b"" for one nothing reads: one dict lookup per header instead of a
# lower() and a set lookup (a push from Go's net/http has six headers). Any other spelling
# is lowered first. Besides the routes' headers (REQUEST_HEADERS) ``http1.py`` keeps two of its
# own: Transfer-Encoding (an Upgrade request's body) and Connection, also spelled
# Proxy-Connection as llhttp reads it (only a request that has one may be an HTTP/1.0
# keep-alive).
_OWN_HEADERS = {b"transfer-encoding": b"transfer-encoding", b"connection": b"connection",
                b"proxy-connection": b"connection"}
HEADER_NAMES: dict[bytes, bytes] = {
    spelling: kept
    for name, kept in [*((n, n) for n in REQUEST_HEADERS), *_OWN_HEADERS.items(),
                       *((n, b"") for n in (b"host", b"user-agent", b"content-type",
                                            b"accept-encoding", b"accept"))]
    for spelling in (name, name.title())
}
# The headers whose presence sends a request to httptools: what llhttp itself acts on
# (Connection, Proxy-Connection, Content-Length framing aside, Transfer-Encoding, Upgrade) and
# what http1.py acts on (Expect: 100 Continue, an early 413).
DECLINED = frozenset({b"connection", b"proxy-connection", b"transfer-encoding", b"upgrade",
                      b"expect"})
_NAMES = {spelling: kept for spelling, kept in HEADER_NAMES.items()
          if kept not in DECLINED and spelling.lower() not in DECLINED}

METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE"})
_VERSION = b"HTTP/1.1"
_PUSH_PREFIX = b"/3/device/"
_ALPHANUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# RFC 3986 pchar (unreserved, sub-delims, pct-encoded's "%", ":" and "@") with "/" and "?".
_TARGET = _ALPHANUM + b"-._~" + b"!$&'()*+,;=" + b"%:@/?"
# RFC 9112 §5.1 field-line = field-name ":" OWS field-value OWS, the name an RFC 9110 §5.6.2
# token, the value (§5.5) visible ASCII, SP and HTAB (no obs-text, no control byte).
_FIELD_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e]*)")
_OWS = (b" ", b"\t")

# What header text means, kept between requests: a push's header lines are mostly the same from
# one request to the next (Host, User-Agent, Content-Type, the topic, the provider token for an
# hour), and Fleet's whole header block is (it sends no apns-id), so a block or line found here,
# checked when first seen, costs a dict lookup instead of a pass over its lines or a regex.
# Each memo is emptied when full: a sender sending ever new text costs it bounded memory and no
# more time than no memo. An apns-id (one per push, as `rawsse push` sends) is kept in neither:
# it is cut out of its block, whose rest is looked up (read_request).
# (kept headers, a single header repeated, the body's length, Request.plain)
Fields = tuple[dict[bytes, bytes], bool, int, bool]
_BLOCKS: dict[bytes, Fields] = {}
_LINES: dict[bytes, tuple[bytes, bytes]] = {}
MEMO_ENTRIES = 256
MEMO_BLOCK = 2048  # longest block kept: the block memo holds at most 512 KB
MEMO_LINE = 512  # longest line kept (a provider token's is ~200 bytes): at most 128 KB
_PER_REQUEST = frozenset({b"apns-id", b"apns-collapse-id"})
# The last block found in the memo, and the last block without its apns-id line (its pieces
# before and after that line): a sender's next push has the same, found by comparing bytes,
# where a memo lookup hashes the block, a new object each time (~750 instructions for Go's).
_LAST_BLOCK: list[Any] = [None, None]
_LAST_REST: list[Any] = [None, None, None]


def read_request(data: bytes, start: int, head_limit: int, channel: Any, operator: bool,
                 after: Any = None) -> tuple[Request, int, bytes | None] | None:
    """The complete request at ``data[start:]``, the offset just past it and, for a push on
    the public listener (not ``operator``), its token's text (``Routes.push``'s argument: the
    caller skips ``Routes.handle``; else None); or None when it is not one this module is sure
    of (incomplete, or outside the subset above). ``after``: its ``Request.after``, given at
    once."""
    head_end = data.find(b"\r\n\r\n", start)
    if head_end < 0 or head_end - start > head_limit:
        return None
    line, _, block = data[start:head_end].partition(b"\r\n")
    try:  # a bare CR or LF stays in the line: declined
        method, target, version = line.split(b" ")
    except ValueError:  # not three words
        return None
    if method not in METHODS or version != _VERSION:
        return None
    # A push's target is checked in one pass (a token is hex: no query), any other against
    # RFC 3986. (A slice compared: startswith parses its arguments from a tuple, ~400
    # instructions more.)
    token: bytes | None = None
    if target[:10] == _PUSH_PREFIX and (token := target[10:]).isalnum():
        path, query = target, b""
        if operator:  # (the routes refuse it: handle's)
            token = None
    elif target[:1] != b"/" or target.translate(None, _TARGET):
        return None
    else:
        path, _, query = target.partition(b"?")
    # The header lines, CRLF between them (b"" for none). A per-push apns-id, spelled as Go
    # (``Apns-Id``) or as curl is told (``apns-id``), is cut out of its block, so the rest, the
    # same from push to push, is found in the memo (here, not in a call: nearly every push from
    # ``rawsse push`` carries one). A block with Go's line is never in the memo (its apns-id
    # keeps it out): it is not looked up, which would hash it for nothing (~1,500 instructions).
    # ``partition``, not ``find``: a C call with one argument, where find's are parsed from a
    # tuple (~400 instructions), and it makes the slices around the line.
    before, cut, tail = block.partition(b"\r\nApns-Id: ")
    apns_id: bytes | None = None
    bad_id = False
    fields = None
    if not cut:
        last = _LAST_BLOCK
        if block == last[0]:
            fields = last[1]
        else:
            fields = _BLOCKS.get(block)
            if fields is not None:
                last[:] = block, fields
    if fields is not None:  # its headers the memo's own dict: a request never writes to them
        headers, duplicate, length, plain = fields
    else:
        if not cut:
            before, cut, tail = block.partition(b"\r\napns-id: ")
        rest = None
        # (Not the first line: no CRLF before it; read line by line then.) A UUID (what
        # senders stamp) needs no stripping and cannot decline, and its shape is checked here
        # once (``Request.bad_id``); anything else is read line by line.
        if cut:
            given, crlf, after_id = tail.partition(b"\r\n")
            if given.translate(UUID_SHAPE) == UUID_FORM:
                last = _LAST_REST  # (the common case here, not in _rest_of: no call)
                rest = (last[2] if before == last[0] and after_id == last[1]
                        else _rest_of(before, crlf, after_id))
                apns_id = given
        if rest is not None:
            headers, duplicate, length, plain = rest
        else:
            fields = _read_block(block)  # a dict of its own
            if fields is None:
                return None
            headers, duplicate, length, plain = fields
            apns_id = headers.pop(b"apns-id", None)
            bad_id = apns_id is not None and apns_id.translate(UUID_SHAPE) != UUID_FORM
    end = head_end + 4 + length
    if end > len(data):
        return None
    request = Request(channel, operator, method, path, query, headers, duplicate,
                      data[head_end + 4:end] if length else b"", after, apns_id, plain)
    if bad_id:
        request.bad_id = True
    return request, end, token


def _rest_of(before: bytes, crlf: bytes,
             after: bytes) -> Fields | None:
    """What the block ``before + crlf + after`` (a block without its apns-id line) means, or
    None to read the whole block line by line (it declines, or holds another apns-id); kept
    as ``_LAST_REST``, which read_request compares first. (``crlf`` is b"" only when the id's
    line was the last: then ``after`` is b"" too, and a block never ends in CRLF, so the two
    pieces say what the block is.)"""
    rest_block = before + crlf + after
    rest = _BLOCKS.get(rest_block) or _read_block(rest_block)
    if rest is None or b"apns-id" in rest[0]:
        return None
    _LAST_REST[:] = before, after, rest
    return rest


def _read_block(block: bytes) -> Fields | None:
    """What a header block not in the memo means (``Fields``), or None to decline."""
    headers: dict[bytes, bytes] = {}
    duplicate = False
    lines = _LINES
    for line in block.split(b"\r\n") if block else ():
        field = lines.get(line)
        if field is None:
            field = _read_line(line)
            if field is None:
                return None
        kept, value = field
        if kept:
            if kept in headers:
                if kept == b"content-length":
                    return None
                if kept in SINGLE_HEADERS:
                    duplicate = True
            headers[kept] = value
    length_text = headers.get(b"content-length", b"0")
    if not length_text.isdigit() or len(length_text) > 6 or int(length_text) > MAX_BODY:
        return None
    plain = not duplicate and headers.keys().isdisjoint(CHECKED_HEADERS)
    if len(block) <= MEMO_BLOCK and headers.keys().isdisjoint(_PER_REQUEST):
        _remember(_BLOCKS, block, (headers.copy(), duplicate, int(length_text), plain))
    return headers, duplicate, int(length_text), plain


def _read_line(line: bytes) -> tuple[bytes, bytes] | None:
    """A header line not in the memo: (the name kept or b"", its value), or None to decline."""
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        return None
    name, value = match.groups()
    lowered = name.lower()
    if lowered in DECLINED:
        return None
    kept = _NAMES.get(name)
    if kept is None:
        kept = _NAMES.get(lowered, b"")
    if kept and value[-1:] in _OWS:
        return None
    field = (kept, value)
    if kept not in _PER_REQUEST and len(line) <= MEMO_LINE:
        _remember(_LINES, line, field)
    return field


def _remember(memo: dict[bytes, Any], text: bytes, meaning: Any) -> None:
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[text] = meaning
