"""What rawsse keeps in Redis and sends through it: key names, values, channel messages, scripts.

Pure data, no I/O: the Redis agent (``agent.py``) builds commands from these, the workers
(``routing.py``) decode what comes back.

Keys (``P`` is ``--redis-prefix``, ``<hex>`` the lower-case hex token, as in Fleet's layout)
--------------------------------------------------------------------------------------------
- ``P owner:<hex>``    ``<node id>|<seq>``: the node whose stream for the device is the newest.
  Written on connect, deleted when that stream ends (or found stale by a push). No TTL: it lives as
  long as the stream.
- ``P pending:<hex>``  the device's one pending push: 8-byte big-endian expiry (Unix ms, Fleet's
  format, so a requeue keeps the original expiry) + the encoded SSE event (id, event, data), with
  ``PX`` = time left. Expiry is Redis's job; nothing sweeps.
- ``P seq``            ``INCR`` counter ordering the connects of the whole cluster.
- ``P stats:<node>``   that node's ``/stats`` totals as JSON, ``PX`` = 4 stats intervals.
- channel ``P node:<node>``  the node's own channel, read by its agent only. Messages:
  ``P`` + delay + token + value (a push routed to the node holding the device) and
  ``E`` + token + seq (your stream for this token was superseded by connect number ``seq``).
- ``P admin:tokens``   hash ``<hex>`` → ``<stamp> <JSON state>``: run-time token states set on any
  node (``admin.py``; ``active`` kept as a tombstone so an older change cannot revive a state).
- ``P admin:faults``   ``<stamp> <JSON rules>``; ``P admin:cleared`` the stamp of the last
  ``clear_tokens``; ``P admin:auth`` ``<stamp> <JSON state>``, the revoked keys and certificates
  and the auth clock (``auth_admin.py``). Stamps are 20-digit zero-padded nanoseconds, so Lua compares them as strings
  (its numbers are doubles: 53 bits do not hold a nanosecond clock).
- channel ``P admin``  every node's agent reads it: ``{"node", "commands"}``, replayable admin
  changes made on ``node``, applied by the others.

Scripts (one ``EVALSHA`` each, so every decision below is atomic against every other node)
--------------------------------------------------------------------------------------------
- ROUTE (a push for a device this node does not hold): the owner key names a live node →
  ``PUBLISH`` to that node's channel only; ``PUBLISH`` reaching nobody (the node died or its
  subscriber is down) or an owner naming ourselves (a stale key) deletes the owner key and falls
  through to storing. Deliver-now-or-discard pushes (TTL ≤ 0) are never stored. Else
  ``SET pending … PX ttl GET`` (mode ``set``: newest wins, the reply tells stored from coalesced) or
  ``… NX`` (mode ``nx``: a push given back by an ended stream never overwrites a newer one).
- CLAIM (a device connected here): ``INCR seq``, owner := us|seq, ``PUBLISH`` an eviction to the
  previous owner node, ``GETDEL pending`` → ``{seq[, pending]}``. Mode ``resync`` (re-claiming held
  streams after Redis came back) yields to a live node that claimed meanwhile → ``{0}``.
- RELEASE (our stream ended): delete the owner key if it still names us.
- ADMIN (an admin change made on this node): store it unless Redis holds a newer stamp for the
  same thing, then ``PUBLISH`` it on ``P admin``.
"""

from __future__ import annotations

import hashlib
import struct

import orjson

# ROUTE outcomes (the script's integer reply); FAILED is ours: Redis unreachable or an error.
FAILED, DISCARDED, ROUTED, STORED, COALESCED = -1, 0, 1, 2, 3

SEQ_TAKEN = 0  # CLAIM in resync mode: another live node holds a newer stream

MSG_PUSH = b"P"
MSG_EVICT = b"E"

_EXPIRY = struct.Struct("!q")  # Unix milliseconds, as Fleet's mock stores it
_PUSH_HEAD = struct.Struct("!dB")  # delivery delay (s), token length
_TOKEN_LEN = struct.Struct("!B")

ROUTE_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner then
  local node = string.match(owner, '^(.*)|')
  if node ~= ARGV[1] and redis.call('PUBLISH', ARGV[2] .. node, ARGV[3] .. ARGV[4]) > 0 then
    return 1
  end
  redis.call('DEL', KEYS[1])
end
local ttl = tonumber(ARGV[5])
if ttl <= 0 then
  return 0
end
if ARGV[6] == 'nx' then
  if redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl, 'NX') then
    return 2
  end
  return 3
end
if redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl, 'GET') then
  return 3
end
return 2
"""

CLAIM_LUA = """
local owner = redis.call('GET', KEYS[1])
local node = owner and string.match(owner, '^(.*)|')
if node == ARGV[1] then
  node = nil
end
if node and ARGV[4] == 'resync'
    and redis.call('PUBSUB', 'NUMSUB', ARGV[2] .. node)[2] > 0 then
  return {0}
end
local seq = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. seq)
if node then
  redis.call('PUBLISH', ARGV[2] .. node, ARGV[3] .. string.format('%d', seq))
end
local pending = redis.call('GETDEL', KEYS[2])
if pending then
  return {seq, pending}
end
return {seq}
"""

RELEASE_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner and string.match(owner, '^(.*)|') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

ADMIN_LUA = """
local op, stamp = ARGV[1], ARGV[2]
local function newer(current)
  return current and string.sub(current, 1, 20) > stamp
end
local cleared = redis.call('GET', KEYS[3])
if op == 'token' then
  if newer(redis.call('HGET', KEYS[1], ARGV[3])) or (cleared and cleared > stamp) then
    return 0
  end
  redis.call('HSET', KEYS[1], ARGV[3], stamp .. ' ' .. ARGV[4])
elseif op == 'clear' then
  if cleared and cleared >= stamp then
    return 0
  end
  redis.call('SET', KEYS[3], stamp)
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i + 1], 1, 20) < stamp then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
else
  if newer(redis.call('GET', KEYS[2])) then
    return 0
  end
  redis.call('SET', KEYS[2], stamp .. ' ' .. ARGV[4])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

SCRIPTS = {"route": ROUTE_LUA, "claim": CLAIM_LUA, "release": RELEASE_LUA, "admin": ADMIN_LUA}


def sha1(script: str) -> str:
    """The digest ``EVALSHA`` names a script by (the same as ``SCRIPT LOAD`` answers)."""
    return hashlib.sha1(script.encode()).hexdigest()


class Keys:
    """Key and channel names for one prefix and node."""

    __slots__ = ("prefix", "node", "seq", "channel_prefix", "channel", "stats",
                 "_owner", "_pending", "admin_tokens", "admin_faults", "admin_cleared",
                 "admin_auth", "admin_channel")

    def __init__(self, prefix: str, node: str) -> None:
        self.prefix = prefix.encode()
        self.node = node.encode()
        self.seq = self.prefix + b"seq"
        self.channel_prefix = self.prefix + b"node:"
        self.channel = self.channel_prefix + self.node
        self.stats = self.prefix + b"stats:" + self.node
        self._owner = self.prefix + b"owner:"
        self._pending = self.prefix + b"pending:"
        self.admin_tokens = self.prefix + b"admin:tokens"
        self.admin_faults = self.prefix + b"admin:faults"
        self.admin_cleared = self.prefix + b"admin:cleared"
        self.admin_auth = self.prefix + b"admin:auth"
        self.admin_channel = self.prefix + b"admin"

    def owner(self, token: bytes) -> bytes:
        return self._owner + token.hex().encode()

    def pending(self, token: bytes) -> bytes:
        return self._pending + token.hex().encode()


# -- values and messages --------------------------------------------------------------------------

def encode_value(expires: float, frame: bytes) -> bytes:
    """A pending push as stored: expiry in Unix ms, then the encoded event."""
    return _EXPIRY.pack(int(expires * 1000)) + frame


def decode_value(value: bytes) -> tuple[float, bytes]:
    """(expires in Unix seconds, frame); raises ValueError on a value too short (Fleet: same)."""
    if len(value) < _EXPIRY.size:
        raise ValueError("pending value shorter than its 8-byte expiry")
    (ms,) = _EXPIRY.unpack_from(value)
    return ms / 1000.0, value[_EXPIRY.size:]


def ttl_ms(expires: float, now: float) -> int:
    """``PX`` for a push: time left in ms; ≤ 0 means deliver now or discard (never stored)."""
    if expires <= 0:
        return 0
    return int((expires - now) * 1000)


def push_head(token: bytes, delay: float) -> bytes:
    """The start of a routed-push message; the script appends the stored value to it."""
    return MSG_PUSH + _PUSH_HEAD.pack(delay, len(token)) + token


def evict_head(token: bytes) -> bytes:
    """The start of an eviction message; the script appends the decimal connect sequence."""
    return MSG_EVICT + _TOKEN_LEN.pack(len(token)) + token


def parse_message(data: bytes) -> tuple[bytes, bytes, float, bytes | int]:
    """A channel message → (kind, token, delay, value) for a push or (kind, token, 0, seq) for
    an eviction. Raises ValueError (or struct.error) on anything else."""
    kind = data[:1]
    if kind == MSG_PUSH:
        delay, length = _PUSH_HEAD.unpack_from(data, 1)
        start = 1 + _PUSH_HEAD.size
        return kind, data[start:start + length], delay, data[start + length:]
    if kind == MSG_EVICT:
        (length,) = _TOKEN_LEN.unpack_from(data, 1)
        start = 1 + _TOKEN_LEN.size
        return kind, data[start:start + length], 0.0, int(data[start + length:])
    raise ValueError(f"unknown channel message kind {kind!r}")


# -- run-time admin state (admin.py's replayable commands) ------------------------------------------

def _stamp(value: int) -> bytes:
    return b"%020d" % value


def admin_script_args(keys: Keys, command: dict, message: bytes) -> tuple:
    """The ADMIN script's KEYS and ARGV for one replayable command (after the script's sha)."""
    op = command["op"]
    stamp = _stamp(command["stamp"])
    if op == "set_token":
        state = {k: command[k] for k in ("state", "timestamp") if k in command}
        what: tuple = (b"token", stamp, command["token"].encode(), orjson.dumps(state))
    elif op == "clear_tokens":
        what = (b"clear", stamp, b"", b"")
    elif op == "set_auth":  # a whole state under its own key: the script's third case
        state = {k: v for k, v in command.items() if k not in ("op", "stamp")}
        return (3, keys.admin_tokens, keys.admin_auth, keys.admin_cleared, b"state", stamp, b"",
                orjson.dumps(state), keys.admin_channel, message)
    else:
        what = (b"faults", stamp, b"", orjson.dumps(command["rules"]))
    return (3, keys.admin_tokens, keys.admin_faults, keys.admin_cleared, *what,
            keys.admin_channel, message)


def admin_commands_from(tokens: list[bytes], faults: bytes | None, cleared: bytes | None,
                        auth: bytes | None = None) -> list[dict]:
    """The replayable commands that rebuild the cluster's admin state from what Redis holds
    (``HGETALL admin:tokens`` as a flat list, ``GET admin:faults``, ``GET admin:cleared``,
    ``GET admin:auth``)."""
    commands: list[dict] = []
    if cleared:
        commands.append({"op": "clear_tokens", "stamp": int(cleared)})
    for field, value in zip(tokens[::2], tokens[1::2]):
        stamp, _, state = value.partition(b" ")
        commands.append({"op": "set_token", "token": field.decode(), "stamp": int(stamp),
                         **orjson.loads(state)})
    if faults:
        stamp, _, rules = faults.partition(b" ")
        commands.append({"op": "set_faults", "stamp": int(stamp), "rules": orjson.loads(rules)})
    if auth:
        stamp, _, state = auth.partition(b" ")
        commands.append({"op": "set_auth", "stamp": int(stamp), **orjson.loads(state)})
    return commands
