"""The node mesh's wire: message framing, the record codecs, fds passed with ``SCM_RIGHTS``.

Theory of operation
-------------------
A node's workers and its Redis agent talk over ``AF_UNIX`` ``SOCK_SEQPACKET`` sockets bound in
the abstract namespace (``address``; see ``unix(7)``): the kernel keeps message boundaries and
order, and one ``recvmsg`` returns exactly one message (``socket(2)``, ``SOCK_SEQPACKET``).

A message is a 2-byte sender index, then records, each ``kind`` (u8), body length (u32), body,
all in network byte order. A message carries as many records as fit in ``MAX_MESSAGE`` bytes and
at most ``MAX_FDS`` sockets (``pack_messages``); the n-th fd in the ancillary data belongs to
the n-th record of a kind that carries one (``HANDOFF``, ``CONNECTION``). The sender index's
top bit (``MORE``) says that the same batch continues in the next message: a reader that gets a
message without it stops reading that socket for this loop turn instead of paying one more
``recvmsg`` to learn the queue is empty (Linux tells no such thing on a received message;
level-triggered epoll brings the reader back if another batch arrived meanwhile).

Record bodies are described by one table, ``LAYOUTS``: a fixed ``struct`` part, then byte
strings whose lengths end the fixed part (``sized``), then at most one byte string running to
the end of the body (``rest``). PUSH, for instance, is ``!IQdddB`` (request id, sequence number,
expires, received, delay, token length), then the token, then the frame. ``encode(kind, *fields)`` and ``decode(kind,
body)`` work for every kind; the functions behind them are generated from the table once, at
import, as the code one would write by hand (the way ``collections.namedtuple`` builds its
methods), so no table is consulted per record. A kind with no byte strings is its ``struct``'s
own ``pack`` and ``unpack_from``. Against the hand-written codecs these replaced (Python 3.11,
``timeit``, best of 15 rounds), a PUSH encode+decode went from 1.40 to 1.28 us and an ACK stayed
at 0.38 us; to measure the PUSH now::

    python -m timeit -s "from rawsse.node import wire; e, d = wire.encoder(wire.PUSH), \
        wire.decoder(wire.PUSH)" "d(memoryview(e(7, 1.7e9, 5.0, 0.0, bytes(32), bytes(300))))"

Kinds 1-31 are the workers' own; kinds from 32 up are the Redis agent's (their meaning is in
``rawsse/cluster/records.py``).
"""

from __future__ import annotations

import array
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

SENDER = struct.Struct("!H")  # each message starts with the sending peer's index
MORE = 0x8000  # set in the sender index of every message of a batch but its last
_INDEX = MORE - 1
HEADER = struct.Struct("!BI")  # record kind, body length

# Under the default net.core.wmem_default/rmem_default (212992 bytes on Linux) so one message
# always fits a socket's buffer; MAX_FDS is well under the kernel's SCM_MAX_FD (253, unix(7)).
MAX_MESSAGE = 60 * 1024
MAX_FDS = 64
RECV_SIZE = 256 * 1024
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)  # room for MAX_FDS fds, computed once
# An int, not the MsgFlag enum: ``flags & (MSG_TRUNC | MSG_CTRUNC)`` on enum members costs
# ~1.5 us per message, an int mask ~20 ns (``python -m timeit -s "import socket; flags = 0"
# "flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)"``, Python 3.11).
TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)

# worker <-> worker
PUSH, ACK, HANDOFF, BCAST, BCAST_DONE, STATS, REPLY, ADMIN = range(1, 9)
DELIVERIES = 20  # a deliveries query (JSON), answered with REPLY (rawsse/apns/deliverylog.py)
TAKEN = 16  # the owner's cumulative acknowledgement and credit (``forwarding.py``)
CONNECTION = 9  # a sender's connection, handed to a less-loaded worker (``balance.py``)
# worker -> agent (NODE_STATS is ``records.STATS``: the node's totals for the agent to store)
ROUTE, CLAIM, RELEASE, NODE_STATS, CLUSTER, CLUSTER_BCAST = 32, 33, 34, 35, 36, 37
# agent -> worker
ROUTED, CLAIMED, DELIVER, EVICT, STATE, CLUSTER_VIEW, CLUSTER_BCAST_DONE = \
    40, 41, 42, 43, 44, 45, 46
# deliveries queries across nodes (rawsse/cluster/agent_deliveries.py): worker -> agent FIND,
# answered FOUND; agent -> worker ASK (another node's query), answered ANSWER
FIND, ANSWER, FOUND, ASK = 50, 51, 52, 53


def address(node: int, index: int) -> str:
    """Abstract-namespace name of peer ``index``'s mesh socket (no file to clean up)."""
    return f"\0rawsse-mesh-{node}-{index}"


# -- record bodies ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """One record body: ``fixed`` values, then ``sized`` byte strings (their lengths are the
    last items of ``fixed``), then the ``rest`` byte string if named. Decoding gives the values
    in that order; encoding takes them in that order, the lengths left out (they are counted)
    and ``rest`` optional (empty)."""

    fixed: str  # struct format of the fixed part
    fields: tuple[str, ...] = ()  # names of the fixed part's values, before the lengths
    sized: tuple[str, ...] = ()
    rest: str = ""


_REQUEST = Layout("!I", ("rid",), rest="payload")  # a request id, then JSON or nothing
_RAW = Layout("!", rest="body")

LAYOUTS: dict[int, Layout] = {
    # rid 0: promised (already answered 200 within the owner's credit); seq: per sender, rising.
    # ``received``: the receiving worker's monotonic clock, for the delivery latency (latency.py)
    PUSH: Layout("!IQdddB", ("rid", "seq", "expires", "received", "delay"), ("token",), "frame"),
    ACK: Layout("!Ib", ("rid", "accepted")),  # 1 accepted, 0 queue full, -1 owner unavailable
    # every push up to seq is held; this much more credit (pushes, frame bytes) is reserved;
    # it answers this many of the sender's messages that carried pushes
    TAKEN: Layout("!QIII", ("upto", "pushes", "bytes", "messages")),
    HANDOFF: Layout("!B", (), ("token",), "leftover"),  # the socket rides as SCM_RIGHTS
    CONNECTION: Layout("!", rest="received"),  # what was read of it; the socket as HANDOFF's
    BCAST: Layout("!IB", ("rid",), ("prefix",), "frame"),
    BCAST_DONE: Layout("!III", ("rid", "count", "refused")),
    STATS: _REQUEST,
    REPLY: _REQUEST,
    ADMIN: _REQUEST,
    DELIVERIES: _REQUEST,
    ROUTE: Layout("!IBddB", ("rid", "mode", "expires", "delay"), ("token",), "frame"),
    CLAIM: Layout("!IBB", ("rid", "mode"), ("token",)),
    RELEASE: _RAW,  # the token
    NODE_STATS: _RAW,  # JSON
    CLUSTER: _REQUEST,
    CLUSTER_BCAST: Layout("!IB", ("rid",), ("prefix",), "frame"),  # as BCAST
    ROUTED: Layout("!Ib", ("rid", "outcome")),
    CLAIMED: Layout("!Iq", ("rid", "seq"), rest="value"),
    DELIVER: Layout("!ddB", ("expires", "delay"), ("token",), "frame"),
    EVICT: Layout("!qB", ("seq",), ("token",)),
    STATE: Layout("!??", ("up", "resync")),
    CLUSTER_VIEW: _REQUEST,
    CLUSTER_BCAST_DONE: _REQUEST,  # JSON: the other nodes' parts
    FIND: _REQUEST,
    ANSWER: _REQUEST,
    FOUND: _REQUEST,
    ASK: _REQUEST,
}

Encoder = Callable[..., bytes]
Decoder = Callable[[memoryview], tuple[Any, ...]]


def _encoder_source(layout: Layout) -> str:
    lengths = [f"len({name})" for name in layout.sized]
    parts = [f"_pack({', '.join([*layout.fields, *lengths])})"] if layout.fixed != "!" else []
    parts += layout.sized
    params = [*layout.fields, *layout.sized]
    if layout.rest:
        parts.append(layout.rest)
        params.append(f'{layout.rest}=b""')
    body = " + ".join(parts) if len(parts) > 1 else f"bytes({parts[0]})"
    return f"def encode({', '.join(params)}):\n    return {body}\n"


def _decoder_source(layout: Layout, size: int) -> str:
    lines = ["def decode(body):"]
    lengths = [f"_n{i}" for i in range(len(layout.sized))]
    head = [*layout.fields, *lengths]
    if head:
        lines.append(f"    {', '.join(head)}, = _unpack(body)")
    values = list(layout.fields)
    start = str(size)
    for i, length in enumerate(lengths):
        lines.append(f"    _e{i} = {start} + {length}")
        values.append(f"body[{start}:_e{i}].tobytes()")
        start = f"_e{i}"
    if layout.rest:
        values.append(f"body[{start}:].tobytes()" if values else "body.tobytes()")
    lines.append(f"    return {', '.join(values)},")
    return "\n".join(lines) + "\n"


def _compile(source: str, name: str, packer: struct.Struct) -> Callable[..., Any]:
    namespace: dict[str, Any] = {"_pack": packer.pack, "_unpack": packer.unpack_from}
    # text made from our own table, once at import (module docstring)
    exec(compile(source, f"<wire codec {source.splitlines()[0]}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


def _codecs(layout: Layout) -> tuple[Encoder, Decoder]:
    packer = struct.Struct(layout.fixed)
    items = len(packer.unpack(bytes(packer.size)))
    if items != len(layout.fields) + len(layout.sized):
        raise ValueError(f"{layout}: {items} struct items for "
                         f"{len(layout.fields)} values and {len(layout.sized)} lengths")
    if not layout.sized and not layout.rest:
        return packer.pack, packer.unpack_from
    return (_compile(_encoder_source(layout), "encode", packer),
            _compile(_decoder_source(layout, packer.size), "decode", packer))


def _build(layouts: dict[int, Layout]) -> tuple[dict[int, Encoder], dict[int, Decoder]]:
    encoders: dict[int, Encoder] = {}
    decoders: dict[int, Decoder] = {}
    shared: dict[Layout, tuple[Encoder, Decoder]] = {}
    for kind, layout in layouts.items():
        if layout not in shared:
            shared[layout] = _codecs(layout)
        encoders[kind], decoders[kind] = shared[layout]
    return encoders, decoders


ENCODERS, DECODERS = _build(LAYOUTS)


def _framer_source(kind: int, layout: Layout, size: int) -> str:
    lengths = [f"len({name})" for name in [*layout.sized, layout.rest] if name]
    counted = " + ".join([str(size), *lengths])
    packed = ", ".join([str(kind), counted, *layout.fields, *lengths[:len(layout.sized)]])
    params = [*layout.fields, *layout.sized] + ([f'{layout.rest}=b""'] if layout.rest else [])
    body = " + ".join([f"_pack({packed})", *layout.sized, *([layout.rest] if layout.rest else [])])
    return f"def frame({', '.join(params)}):\n    return {body}\n"


def framer(kind: int) -> Encoder:
    """``record(kind, encode(kind, *fields))`` as one generated function: the header and the
    fixed part are one ``struct`` pack (``!BI`` then the layout's), the byte strings are added
    after it. For a hot kind (a forwarded PUSH: one call and one pack less per push)."""
    layout = LAYOUTS[kind]
    packer = struct.Struct(HEADER.format + layout.fixed.lstrip("!"))
    size = struct.calcsize(layout.fixed)
    return _compile(_framer_source(kind, layout, size), "frame", packer)


def encoder(kind: int) -> Encoder:
    """The function ``encode`` uses for ``kind``: bind it once where a kind is hot."""
    return ENCODERS[kind]


def decoder(kind: int) -> Decoder:
    """The function ``decode`` uses for ``kind`` (it takes a memoryview)."""
    return DECODERS[kind]


def encode(kind: int, *fields: Any) -> bytes:
    """The body of a ``kind`` record with ``fields`` in ``LAYOUTS`` order (lengths counted)."""
    return ENCODERS[kind](*fields)


def decode(kind: int, body: bytes | memoryview) -> tuple[Any, ...]:
    """The fields of a ``kind`` record's body, byte strings as ``bytes``."""
    return DECODERS[kind](memoryview(body))


# -- messages ---------------------------------------------------------------------------------

_unpack_header = HEADER.unpack_from


def record(kind: int, body: bytes) -> bytes:
    """One framed record, ready for ``pack_messages``."""
    return HEADER.pack(kind, len(body)) + body


def sender_of(message: bytes) -> int:
    """The index of the peer that sent ``message``."""
    index: int = SENDER.unpack_from(message)[0]
    return index & _INDEX


def more_follows(message: bytes) -> bool:
    """True when the sender's batch continues in its next message (``MORE``)."""
    return message[0] >= 0x80


def iter_records(message: bytes) -> list[tuple[int, memoryview]]:
    """(kind, body) of every record in one message, bodies as views into it. A list, not a
    generator: most messages hold one record (a forwarded push) and a generator costs ~0.2 us
    more per message (measured with ``python -m timeit``, Python 3.11)."""
    view = memoryview(message)
    records = []
    offset, end = SENDER.size, len(message)
    while offset < end:
        kind, length = _unpack_header(view, offset)
        offset += 5  # HEADER.size
        records.append((kind, view[offset:offset + length]))
        offset += length
    return records


# A framed PUSH record's header and fixed part, packed or read in one call: a forwarded push's
# record is framed without ``framer(PUSH)``'s call (``Mesh.submit_plain``) and read without
# ``iter_records`` and ``decoder(PUSH)`` (``read_pushes``); the fixed part's size counts in the
# record's length.
PUSH_HEAD = struct.Struct(HEADER.format + LAYOUTS[PUSH].fixed.lstrip("!"))
PUSH_FIXED = struct.calcsize(LAYOUTS[PUSH].fixed)
_unpack_push_head = PUSH_HEAD.unpack_from
_PUSH_START = HEADER.size + PUSH_FIXED  # where a PUSH record's token starts


def read_pushes(message: bytes) -> tuple[list[tuple[Any, ...]], int, bool, bool]:
    """The PUSH records of one message, decoded as ``decoder(PUSH)`` decodes one, in one call
    per message (a message of pushes is the mesh's usual one); then their frames' bytes, whether
    one of them is asked (a request id), and whether the message holds other records too."""
    pushes = []
    size = 0
    asked = others = False
    offset, end = SENDER.size, len(message)
    while offset < end:
        if message[offset] != PUSH:
            others = True
            offset += 5 + _unpack_header(message, offset)[1]  # HEADER.size + the body's
            continue
        _, length, rid, seq, expires, received, delay, token_size = \
            _unpack_push_head(message, offset)
        token_end = offset + _PUSH_START + token_size
        token = message[offset + _PUSH_START:token_end]
        offset += 5 + length
        frame = message[token_end:offset]
        pushes.append((rid, seq, expires, received, delay, token, frame))
        size += len(frame)
        if rid:
            asked = True
    return pushes, size, asked, others


def pack_messages(sender: int, records: Sequence[tuple[bytes, int]]) -> list[tuple[bytes, list[int]]]:
    """Pack framed records, each with the fd it carries or -1, into as few messages as
    ``MAX_MESSAGE`` and ``MAX_FDS`` allow, in order; each message comes with its fds. Every
    message but the last is marked ``MORE``."""
    prefix = SENDER.pack(sender)
    # The usual batch (a turn's pushes) is one message with no fd: no loop of checks.
    framed_only = [framed for framed, fd in records if fd < 0]
    if len(framed_only) == len(records) \
            and sum(map(len, framed_only)) + len(prefix) <= MAX_MESSAGE:
        return [(prefix + b"".join(framed_only), [])] if framed_only else []
    continued = SENDER.pack(sender | MORE)
    messages: list[tuple[bytes, list[int]]] = []
    parts: list[bytes] = [prefix]
    fds: list[int] = []
    size = len(prefix)
    for framed, fd in records:
        if len(parts) > 1 and (size + len(framed) > MAX_MESSAGE
                               or (fd >= 0 and len(fds) >= MAX_FDS)):
            parts[0] = continued
            messages.append((b"".join(parts), fds))
            parts, fds, size = [prefix], [], len(prefix)
        parts.append(framed)
        size += len(framed)
        if fd >= 0:
            fds.append(fd)
    if len(parts) > 1:
        messages.append((b"".join(parts), fds))
    return messages


def pushing(messages: list[tuple[bytes, list[int]]]) -> int:
    """How many of a batch's messages carry a PUSH (each is answered by its owner's TAKEN)."""
    return sum(1 for message, _ in messages
               if any(kind == PUSH for kind, _ in iter_records(message)))


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds passed with ``SCM_RIGHTS`` in ``recvmsg``'s ancillary data (``unix(7)``)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds
