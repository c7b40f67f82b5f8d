"""The records a node's workers and its Redis agent exchange: kinds, fields, modes.

The agent is mesh peer number ``workers`` (``wire.address(node, workers)``); records ride in the
same batched ``SOCK_SEQPACKET`` messages as the workers' own (``rawsse/node/wire.py``: a 2-byte
sender index, then ``kind, length, body`` per record; the byte layouts are ``wire.LAYOUTS``).
Kinds from 32 up are these; ``Mesh.handle`` routes them. Requests carry the mesh request id
(``Mesh.expect``) and get exactly one reply, or the mesh's failure value when the agent is lost
or late.

worker → agent
  ROUTE    rid, mode, expires, delay, token, frame  → ROUTED rid, outcome (``scripts.py``)
  CLAIM    rid, mode, token                         → CLAIMED rid, seq (−1 failed, 0 taken),
                                                      pending value (may be empty)
  RELEASE  token                                    (no reply)
  STATS    node totals JSON                         (no reply; the agent writes stats:<node>)
  CLUSTER  rid                                      → CLUSTER_VIEW rid, JSON
  CLUSTER_BCAST  rid, prefix, frame                 → CLUSTER_BCAST_DONE rid, JSON: the other
                                                      nodes' parts of a broadcast taken here
  FIND     rid, deliveries query JSON               → FOUND rid, the other nodes' answers JSON
  ANSWER   rid, this node's answers JSON            (the reply to an ASK)
agent → worker
  DELIVER  expires, delay, token, frame   a push routed here by another node
  EVICT    seq, token                     another node's connect ``seq`` superseded ours
  STATE    up, resync                     Redis reachable or not; resync = re-claim your streams
  BCAST    rid, prefix, frame             the workers' own broadcast record (``wire.py``), for a
                                          broadcast another node took → BCAST_DONE rid, written,
                                          refused
  ASK      rid, deliveries query JSON     another node's query: answer for this node (ANSWER)
"""

from __future__ import annotations

# The kind numbers live with the other kinds in wire.py; the cluster code names them from here.
from rawsse.node.wire import (
    BCAST, BCAST_DONE, CLAIM, CLAIMED, CLUSTER, CLUSTER_BCAST, CLUSTER_BCAST_DONE, CLUSTER_VIEW,
    DELIVER, EVICT, NODE_STATS, RELEASE, ROUTE, ROUTED, STATE, decoder, encoder,
    ANSWER, ASK, CLAIM, CLAIMED, CLUSTER, CLUSTER_VIEW, DELIVER, EVICT, FIND, FOUND, NODE_STATS,
    RELEASE, ROUTE, ROUTED, STATE, decoder, encoder,
)

STATS = NODE_STATS  # the agent's STATS; the workers' own STATS (wire.STATS) is another kind

# agent → worker records meant for the worker's shard, not replies to one process's request: a
# worker's replacement takes them when its predecessor died before it read them (agent_mesh.py)
FOR_THE_SHARD = frozenset({DELIVER, EVICT, STATE, BCAST, ASK})

# ROUTE modes → the script's storing mode (scripts.ROUTE_LUA)
MODE_PUSH = 0  # a new push: newest wins (SET … GET)
MODE_REQUEUE = 1  # given back by an ended stream: never overwrites a newer one (SET … NX)
ROUTE_MODES = {MODE_PUSH: b"set", MODE_REQUEUE: b"nx"}

# CLAIM modes
CLAIM_TAKE = 0  # a device connected here: it is the newest
CLAIM_RESYNC = 1  # re-claiming after Redis came back: yield to a live node that claimed meanwhile
CLAIM_MODES = {CLAIM_TAKE: b"take", CLAIM_RESYNC: b"resync"}

# Each kind's codec pair, generated from its layout in ``wire.LAYOUTS``; the field order is the
# module docstring's. A trailing byte string may be left out when encoding (empty).
route, parse_route = encoder(ROUTE), decoder(ROUTE)
claim, parse_claim = encoder(CLAIM), decoder(CLAIM)
routed, parse_routed = encoder(ROUTED), decoder(ROUTED)
claimed, parse_claimed = encoder(CLAIMED), decoder(CLAIMED)
deliver, parse_deliver = encoder(DELIVER), decoder(DELIVER)
evict, parse_evict = encoder(EVICT), decoder(EVICT)
state, parse_state = encoder(STATE), decoder(STATE)
# CLUSTER, CLUSTER_VIEW, CLUSTER_BCAST_DONE: a request id, then JSON or nothing (a request)
request, parse_request = encoder(CLUSTER), decoder(CLUSTER)
# BCAST and CLUSTER_BCAST: a request id, the prefix (hex text), the frame
broadcast, parse_broadcast = encoder(CLUSTER_BCAST), decoder(CLUSTER_BCAST)
parse_broadcast_done = decoder(BCAST_DONE)
# FIND, ANSWER, FOUND and ASK have the same layout: ``request`` and ``parse_request`` serve them
