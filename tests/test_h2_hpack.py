"""In-process: rawsse's HPACK decoder against the ``hpack`` library's encoder, its response
blocks against the ``hpack`` decoder, and the frames it writes against ``hyperframe``."""

from __future__ import annotations

import random

import hpack
import hyperframe.frame as hf
import pytest

from rawsse.h2 import frames as f
from rawsse.h2 import huffman
from rawsse.h2.hpack import Decoder, HpackError, response_block
from rawsse.h2 import requests
from rawsse.h2.requests import MALFORMED, TOO_LARGE, RequestDecoder, fill
from rawsse.server.exchange import Request

NAMES = [b"apns-topic", b"apns-id", b"apns-push-type", b"apns-priority", b"authorization",
         b"x-custom", b"content-length", b"user-agent", b":path", b":method"]


def random_fields(rng: random.Random) -> list[tuple[bytes, bytes]]:
    fields = []
    for _ in range(rng.randint(1, 12)):
        name = rng.choice(NAMES)
        value = bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 300)))
        if rng.random() < 0.1:
            value = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        fields.append((name, value))
    return fields


@pytest.mark.parametrize("huffman_on", [True, False])
def test_decoder_matches_the_hpack_encoder_with_table_churn(huffman_on):
    rng = random.Random(7 if huffman_on else 8)
    encoder = hpack.Encoder()
    encoder.header_table_size = 4096
    decoder = Decoder(4096, 10**9)
    for round_ in range(400):
        if round_ % 97 == 5:  # a table size change: the encoder emits a size update
            encoder.header_table_size = rng.choice([0, 256, 4096])
        fields = random_fields(rng)
        sensitive = rng.random() < 0.2
        block = encoder.encode([hpack.HeaderTuple(n, v) if not sensitive
                                else hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields],
                               huffman=huffman_on)
        decoded, too_large = decoder.decode(block)
        assert not too_large
        assert decoded == fields
        assert list(decoder.table) == list(encoder.header_table.dynamic_entries)


def test_huffman_round_trips_every_byte():
    encoder = hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                           hpack.huffman_constants.REQUEST_CODES_LENGTH)
    rng = random.Random(3)
    for n in range(300):
        data = bytes(rng.randrange(256) for _ in range(n % 60))
        assert huffman.decode(encoder.encode(data)) == data
    assert huffman.decode(encoder.encode(bytes(range(256)))) == bytes(range(256))


@pytest.mark.parametrize("block", [
    b"\x80",  # index 0
    b"\xbe",  # dynamic index 62 of an empty table
    b"\x3f\xe1\x3f",  # table size 8192 > 4096
    b"\x82\x20",  # table size update after a field
    b"\x40\x85ab",  # string longer than its block
    b"\x40\x81\xff\x01x",  # Huffman: EOS prefix as padding longer than 7 bits
    b"\xff\xff\xff\xff\xff\xff",  # integer without end
])
def test_bad_blocks_are_compression_errors(block):
    with pytest.raises(HpackError):
        Decoder(4096, 8000).decode(block)


def test_an_index_to_an_entry_just_evicted_is_a_compression_error():
    """Within one block: an insertion too large for the table empties it, and an index to
    what was there before is out of range (an error, not a crash)."""
    decoder = Decoder(256, 8000)
    decoder.decode(b"\x40\x01a\x01b\x40\x01c\x01d")  # two entries
    assert decoder.decode(b"\xbf")[0] == [(b"a", b"b")]  # index 63: the older one
    with pytest.raises(HpackError):
        decoder.decode(b"\x40\x01x\x7f\x81\x01" + b"v" * 256 + b"\xbf")


def test_header_list_limit_counts_but_keeps_decoding():
    encoder = hpack.Encoder()
    block = encoder.encode([("x-big", "v" * 4000)]) + b"\xbe" * 3
    decoder = Decoder(4096, 8000)
    fields, too_large = decoder.decode(block)
    assert too_large and len(fields) == 1
    # the table still followed the encoder
    assert decoder.decode(encoder.encode([("x-big", "v" * 4000)]))[0] == [(b"x-big", b"v" * 4000)]


def test_response_blocks_decode_with_the_hpack_library():
    block = response_block(200, ((b"apns-id", b"a" * 36),), None, 0)
    assert hpack.Decoder().decode(block)[0::2] == [(":status", "200"), ("apns-id", "a" * 36)]
    block = response_block(410, ((b"apns-id", b"b" * 200),), b"application/json", 45)
    fields = dict(hpack.Decoder().decode(block))
    assert fields[":status"] == "410" and fields["apns-id"] == "b" * 200
    assert fields["content-type"] == "application/json" and fields["content-length"] == "45"


def test_frames_parse_with_hyperframe():
    def parse(data: bytes):
        frame, length = hf.Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        return frame

    settings = parse(f.settings({f.MAX_CONCURRENT_STREAMS: 1000, f.MAX_HEADER_LIST_SIZE: 8000}))
    assert settings.settings == {f.MAX_CONCURRENT_STREAMS: 1000, f.MAX_HEADER_LIST_SIZE: 8000}
    assert "ACK" in parse(f.SETTINGS_ACK).flags
    ping = parse(f.ping_ack(b"12345678"))
    assert ping.opaque_data == b"12345678" and "ACK" in ping.flags
    assert parse(f.rst_stream(5, f.REFUSED_STREAM)).error_code == f.REFUSED_STREAM
    assert parse(f.window_update(3, 1000)).window_increment == 1000
    goaway = parse(f.goaway(7, f.PROTOCOL_ERROR, "HEADERS on stream 0"))
    assert (goaway.last_stream_id, goaway.error_code) == (7, f.PROTOCOL_ERROR)
    assert goaway.additional_data == b'{"reason":"HEADERS on stream 0"}'


def test_huffman_decodes_what_the_hpack_encoder_makes():
    """Random octets, printable text and push paths (hex tokens), each Huffman-coded by the
    ``hpack`` library and decoded by ours."""
    encoder = hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                           hpack.huffman_constants.REQUEST_CODES_LENGTH)
    rng = random.Random(11)
    for n in range(3000):
        kind = n % 3
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        elif kind == 1:
            data = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(120)))
        else:
            data = b"/3/device/%x" % rng.getrandbits(256)
        assert huffman.decode(encoder.encode(data)) == data


def _bits(*codes: tuple[int, int]) -> bytes:
    """Huffman codes (code, bit length) packed MSB first, padded with 1s (§5.2)."""
    value, length = 0, 0
    for code, bits in codes:
        value, length = value << bits | code, length + bits
    pad = -length % 8
    return ((value << pad | (1 << pad) - 1)).to_bytes((length + pad) // 8, "big")


def test_huffman_eos_anywhere_is_an_error():
    """RFC 7541 §5.2: EOS in a string is a decoding error, also when symbols follow it."""
    eos, zero = huffman.CODES[256], huffman.CODES[ord("0")]
    assert huffman.decode(_bits(zero, zero)) == b"00"
    for codes in [(eos,), (eos, zero), (zero, eos, zero, zero), (zero,) * 5 + (eos,) + (zero,) * 9]:
        with pytest.raises(huffman.HuffmanError):
            huffman.decode(_bits(*codes))


def _read(reader: RequestDecoder, block: bytes) -> tuple:
    request = Request(None, False)  # type: ignore[arg-type]  # no channel: never answered
    length = reader.read(block, request)
    return _seen(length, request)


def _fresh(decoder: Decoder, block: bytes) -> tuple:
    """What ``RequestDecoder.read`` must give: a plain decode, then ``fill``."""
    request = Request(None, False)  # type: ignore[arg-type]
    fields, too_large = decoder.decode(block)
    length = fill(request, fields)
    if too_large and length != MALFORMED:
        length = TOO_LARGE
    return _seen(length, request)


def _seen(length: int, request: Request) -> tuple:
    """What a route reads of a request: its apns-id (kept apart from the headers, with whether
    it is a canonical UUID) shown among the headers."""
    headers = dict(request.headers)
    if request.apns_id is not None:
        headers[b"apns-id"] = request.apns_id
    return (length, request.method, request.path, request.query, headers, request.duplicate,
            request.bad_id)


def test_request_memo_hits_and_follows_the_dynamic_table():
    """nghttp2's shape: ``:path`` never indexed, then indexes. The bytes after ``:path`` are
    read once per dynamic table state: a second block with the same suffix reuses the shape,
    an insertion, an eviction or a size update makes the same bytes decode afresh."""
    reader = RequestDecoder(4096, 8000)

    def path(token: str) -> bytes:
        value = f"/3/device/{token}".encode()
        return bytes((0x14, len(value))) + value

    def index_apns_id(apns_id: bytes) -> bytes:
        return b"\x40\x07apns-id" + bytes((len(apns_id),)) + apns_id

    suffix = b"\x83\x86\xbe"  # POST, http, the newest entry of the dynamic table
    assert _read(reader, path("aa") + b"\x83\x86" + index_apns_id(b"first"))[0] == -1
    assert not reader.shapes  # it inserted: never kept
    first = _read(reader, path("bb?x=1") + suffix)
    assert suffix in reader.shapes
    again = _read(reader, path("cc") + suffix)
    # (b"first" is not a UUID: the push route answers it 400 BadMessageId, as a fresh decode)
    assert first == (-1, b"POST", b"/3/device/bb", b"x=1", {b"apns-id": b"first"}, False, True)
    assert again == (-1, b"POST", b"/3/device/cc", b"", {b"apns-id": b"first"}, False, True)
    assert _read(reader, path("dd") + suffix)[4] == {b"apns-id": b"first"}
    # an insertion: index 62 is another entry now
    _read(reader, path("ee") + b"\x83\x86" + index_apns_id(b"second"))
    assert _read(reader, path("ff") + suffix)[4] == {b"apns-id": b"second"}
    # a size update to 0 and back evicts everything, then the same entry comes again: equal
    # contents, but decoded afresh (the generation moved), and an emptied table is an error
    _read(reader, b"\x20\x3f\xe1\x1f" + path("gg") + b"\x83\x86" + index_apns_id(b"second"))
    generation = reader.hpack.generation
    assert reader.shapes[suffix][0] != generation
    assert _read(reader, path("hh") + suffix)[4] == {b"apns-id": b"second"}
    assert reader.shapes[suffix][0] == generation  # kept again (from the field list's shape)
    _read(reader, b"\x20" + path("ii") + b"\x83\x86")
    with pytest.raises(HpackError):
        _read(reader, path("jj") + suffix)
    # a Huffman-coded path, from the cache and not
    huffman_path = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(":path", "/3/device/kk")],
                                          huffman=True)
    reader = RequestDecoder(4096, 8000)
    _read(reader, path("aa") + b"\x83\x86" + index_apns_id(b"third"))
    _read(reader, path("bb") + suffix)
    assert _read(reader, huffman_path + suffix)[2] == b"/3/device/kk"
    assert _read(reader, huffman_path + suffix)[2] == b"/3/device/kk"


def test_request_memo_keeps_only_what_decodes_the_same():
    reader = RequestDecoder(4096, 200)

    def path(value: bytes) -> bytes:
        return bytes((0x04, len(value))) + value

    # a suffix with a :path of its own is not kept (the later :path wins)
    block = path(b"/3/device/aa") + b"\x83\x04\x0c/3/device/bb"
    assert _read(reader, block)[2] == b"/3/device/bb" and not reader.shapes
    assert _read(reader, path(b"/3/device/cc") + block[14:])[2] == b"/3/device/bb"
    # a malformed suffix is not kept, and stays malformed
    assert _read(reader, path(b"/x") + b"\x86\x83")[0] != MALFORMED
    assert _read(reader, path(b"/y") + b"\x00\x01a\x00\x83")[0] == MALFORMED
    assert _read(reader, path(b"/y") + b"\x00\x01a\x00\x83")[0] == MALFORMED
    # a path that makes the list too large, on a kept suffix: 431, and an empty path: malformed
    assert _read(reader, path(b"/z") + b"\x83\x86")[0] == -1 and b"\x83\x86" in reader.shapes
    assert _read(reader, path(b"/3/device/" + b"a" * 100) + b"\x83\x86")[0] == TOO_LARGE
    assert _read(reader, path(b"?x") + b"\x86\x83")[0] == MALFORMED
    assert _read(reader, path(b"/ok") + b"\x86\x83")[:3] == (-1, b"POST", b"/ok")


def test_request_memo_of_field_lists_keeps_where_path_was():
    """Go's shape: every field from the table but ``:path``, a new literal each time. The field
    list with its :path left out is the key, so the same fields read the same with any path;
    a :path after a regular field is malformed however often the valid order came before."""
    encoder = hpack.Encoder()
    reader = RequestDecoder(4096, 8000)
    fields = [(b":authority", b"x"), (b":method", b"POST"), (b":path", b"/3/device/aa"),
              (b":scheme", b"https"), (b"apns-topic", b"t1"), (b"content-length", b"2")]
    for token in (b"aa", b"bb", b"cc"):
        fields[2] = (b":path", b"/3/device/" + token)
        assert _read(reader, encoder.encode(fields)) == (
            2, b"POST", b"/3/device/" + token, b"", {b"apns-topic": b"t1", b"content-length": b"2"},
            False, False)
    assert len(reader.shapes) == 1
    twice = fields + [(b"apns-topic", b"t2")]  # a single header twice: kept as such
    for token in (b"ab", b"ac", b"ad"):  # (t2 is indexed from the second on)
        twice[2] = (b":path", b"/3/device/" + token)
        assert _read(reader, encoder.encode(twice))[4:6] == (
            {b"apns-topic": b"t2", b"content-length": b"2"}, True)
    late = fields[:2] + fields[3:5] + [(b":path", b"/3/device/dd")] + fields[5:]
    assert _read(reader, encoder.encode(late))[0] == MALFORMED
    fields[2] = (b":path", b"")
    assert _read(reader, encoder.encode(fields))[0] == MALFORMED
    # past the header list limit: not read from the memo
    small, encoder = RequestDecoder(4096, 300), hpack.Encoder()
    fields[2] = (b":path", b"/3/device/ee")
    assert _read(small, encoder.encode(fields))[0] == 2
    assert _read(small, encoder.encode(fields[:2] + [(b":path", b"/f")] + fields[3:]))[0] == 2
    fields[2] = (b":path", b"/3/device/" + b"f" * 200)
    assert _read(small, encoder.encode(fields))[0] in (MALFORMED, TOO_LARGE)
    # a list cut short at the limit is not the list it starts like (x-big indexed the second
    # time, so that :path is the block's one literal)
    big = [(b"x-big", b"v" * 200)]
    for token, extra, length in [(b"gg", big, TOO_LARGE), (b"hh", [], -1), (b"ii", big, TOO_LARGE)]:
        fields[2] = (b":path", b"/3/device/" + token)
        assert _read(small, encoder.encode(fields[:4] + extra))[0] == length


def _sender_fields(rng: random.Random) -> list:
    """A sender's fields after :path, from small sets so the encoder indexes them; now and then
    an eviction, a duplicate, a malformed request."""
    fields = [(b":method", rng.choice([b"POST", b"POST", b"GET"])), (b":scheme", b"https"),
              (b":authority", rng.choice([b"a.example", b"b.example"]))]
    for name, values in [(b"apns-topic", [b"t1", b"t2", b"t3"]), (b"apns-id", [b"i1", b"i2"]),
                         (b"content-length", [b"12", b"120"]), (b"apns-priority", [b"5", b"10"]),
                         (b"user-agent", [b"u"])]:
        if rng.random() < 0.7:
            fields.append((name, rng.choice(values)))
    if rng.random() < 0.1:
        fields.append((b"x-big", b"v" * rng.choice([200, 1500])))  # evicts
    if rng.random() < 0.1:
        fields.append((b"apns-topic", b"t1"))  # a repeated single header
    if rng.random() < 0.05:
        fields.insert(2, (b"x-early", b"x"))  # a pseudo-field after a regular one
    if rng.random() < 0.05:
        fields.append((b":path", b"/second"))
    return fields


@pytest.mark.parametrize("shape", ["nghttp2", "go"])
def test_request_memo_equals_a_fresh_decode_over_random_blocks(shape, monkeypatch):
    """Differential: blocks from the ``hpack`` library's encoder (an independent
    implementation) with table size updates and evictions between them, each read through
    the memo and decoded afresh by a decoder kept in step: the same request every time.
    nghttp2's shape sends :path first, never indexed; Go's indexes it, among the others."""
    rng = random.Random(14)
    encoder = hpack.Encoder()
    reader, plain = RequestDecoder(4096, 8000), Decoder(4096, 8000)
    sender = _sender_fields(rng)
    filled = []
    monkeypatch.setattr(requests, "fill", lambda *args: filled.append(1) or fill(*args))
    for round_ in range(1000):
        if rng.random() < 0.01:
            encoder.header_table_size = rng.choice([0, 1024, 4096, 4096])
        if rng.random() < 0.05:
            sender = _sender_fields(rng)  # another sender's fields from here on
        path = b"/3/device/%x" % rng.getrandbits(20) + rng.choice([b"", b"?q=1"])
        if shape == "nghttp2":
            fields = [hpack.NeverIndexedHeaderTuple(b":path", path), *sender]
        else:
            fields = [*sender[:2], (b":path", path), *sender[2:]]
        block = encoder.encode(fields, huffman=rng.random() < 0.8)
        assert _read(reader, block) == _fresh(plain, block), round_
    assert list(reader.hpack.table) == list(plain.table)
    assert len(filled) < 500  # the memo was used, not only filled
