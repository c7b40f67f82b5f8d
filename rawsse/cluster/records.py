"""The mesh records a node's workers and its Redis agent exchange (``mesh.py`` framing).

The agent is mesh peer number ``workers`` (``mesh.address(node, workers)``); records ride in the
same batched ``SOCK_SEQPACKET`` messages as the workers' own (a 2-byte sender index, then
``kind, length, body`` per record). Kinds from 32 up are this module's; ``Mesh.handle`` routes
them. Requests carry the mesh request id (``Mesh.expect``) and get exactly one reply, or the
mesh's failure value when the agent is lost or late.

worker → agent
  ROUTE    rid, mode, expires, delay, token, frame  → ROUTED rid, outcome (``redis_scripts``)
  CLAIM    rid, mode, token                         → CLAIMED rid, seq (−1 failed, 0 taken),
                                                      pending value (may be empty)
  RELEASE  token                                    (no reply)
  STATS    node totals JSON                         (no reply; the agent writes stats:<node>)
  CLUSTER  rid                                      → CLUSTER_VIEW rid, JSON
agent → worker
  DELIVER  expires, delay, token, frame   a push routed here by another node
  EVICT    seq, token                     another node's connect ``seq`` superseded ours
  STATE    up, resync                     Redis reachable or not; resync = re-claim your streams
"""

from __future__ import annotations

import struct

ROUTE, CLAIM, RELEASE, STATS, CLUSTER = 32, 33, 34, 35, 36
ROUTED, CLAIMED, DELIVER, EVICT, STATE, CLUSTER_VIEW = 40, 41, 42, 43, 44, 45

# ROUTE modes → the script's storing mode (redis_scripts.ROUTE_LUA)
MODE_PUSH = 0  # a new push: newest wins (SET … GET)
MODE_REQUEUE = 1  # given back by an ended stream: never overwrites a newer one (SET … NX)
ROUTE_MODES = {MODE_PUSH: b"set", MODE_REQUEUE: b"nx"}

# CLAIM modes
CLAIM_TAKE = 0  # a device connected here: it is the newest
CLAIM_RESYNC = 1  # re-claiming after Redis came back: yield to a live node that claimed meanwhile
CLAIM_MODES = {CLAIM_TAKE: b"take", CLAIM_RESYNC: b"resync"}

_ROUTE = struct.Struct("!IBddB")
_CLAIM = struct.Struct("!IBB")
_ROUTED = struct.Struct("!Ib")
_CLAIMED = struct.Struct("!Iq")
_DELIVER = struct.Struct("!ddB")
_EVICT = struct.Struct("!qB")
_STATE = struct.Struct("!??")
_RID = struct.Struct("!I")


def route(rid: int, mode: int, expires: float, delay: float, token: bytes, frame: bytes) -> bytes:
    return _ROUTE.pack(rid, mode, expires, delay, len(token)) + token + frame


def parse_route(body: memoryview) -> tuple[int, int, float, float, bytes, bytes]:
    rid, mode, expires, delay, length = _ROUTE.unpack_from(body)
    start = _ROUTE.size
    return rid, mode, expires, delay, bytes(body[start:start + length]), bytes(body[start + length:])


def claim(rid: int, mode: int, token: bytes) -> bytes:
    return _CLAIM.pack(rid, mode, len(token)) + token


def parse_claim(body: memoryview) -> tuple[int, int, bytes]:
    rid, mode, length = _CLAIM.unpack_from(body)
    return rid, mode, bytes(body[_CLAIM.size:_CLAIM.size + length])


def routed(rid: int, outcome: int) -> bytes:
    return _ROUTED.pack(rid, outcome)


def parse_routed(body: memoryview) -> tuple[int, int]:
    return _ROUTED.unpack_from(body)


def claimed(rid: int, seq: int, value: bytes = b"") -> bytes:
    return _CLAIMED.pack(rid, seq) + value


def parse_claimed(body: memoryview) -> tuple[int, int, bytes]:
    rid, seq = _CLAIMED.unpack_from(body)
    return rid, seq, bytes(body[_CLAIMED.size:])


def deliver(expires: float, delay: float, token: bytes, frame: bytes) -> bytes:
    return _DELIVER.pack(expires, delay, len(token)) + token + frame


def parse_deliver(body: memoryview) -> tuple[float, float, bytes, bytes]:
    expires, delay, length = _DELIVER.unpack_from(body)
    start = _DELIVER.size
    return expires, delay, bytes(body[start:start + length]), bytes(body[start + length:])


def evict(seq: int, token: bytes) -> bytes:
    return _EVICT.pack(seq, len(token)) + token


def parse_evict(body: memoryview) -> tuple[int, bytes]:
    seq, length = _EVICT.unpack_from(body)
    return seq, bytes(body[_EVICT.size:_EVICT.size + length])


def state(up: bool, resync: bool) -> bytes:
    return _STATE.pack(up, resync)


def parse_state(body: memoryview) -> tuple[bool, bool]:
    return _STATE.unpack_from(body)


def request(rid: int, payload: bytes = b"") -> bytes:
    return _RID.pack(rid) + payload


def parse_request(body: memoryview) -> tuple[int, bytes]:
    (rid,) = _RID.unpack_from(body)
    return rid, bytes(body[_RID.size:])
