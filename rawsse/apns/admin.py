"""Simulated outcomes set at run time: per-token states and fault rules. No I/O.

Changes arrive as small JSON-able commands (``apply``) so the same command can be handed to
every worker and all of them answer alike. What is handed on is the *replayable* form of a
command (``replayable``): it names the resulting state, not the step (``add_fault`` becomes
``set_faults`` with the whole list, ``set_token`` carries its timestamp), so applying it twice,
or on a worker that already has it, changes nothing. The master keeps a copy of the state
(``arbiter.py``): a worker respawned after a crash or a rolling restart starts from it.

Token states (reasons and the 410 ``timestamp`` as in Apple, "Handling notification responses from
APNs"): ``active`` (default), ``unregistered`` → ``410 Unregistered`` with the
timestamp in ms, ``expired`` → ``410 ExpiredToken``, ``bad`` → ``400 BadDeviceToken``.
Fault rules: a share of pushes answered with a status and reason instead of being accepted.
Provider authentication (revoked key ids and certificates, the auth clock): ``auth_admin.py``.

Every number in a command is checked before anything changes: a change is handed on as JSON
(orjson, 64-bit integers) through the mesh and stored in Redis, whose Lua scripts see numbers as
doubles, so a value either fits all of them or is refused with the field's name (a change held
by one worker only would answer the same push differently per worker). Token states are capped
(``MAX_TOKEN_STATES``): each worker and the master hold a copy of all of them.
"""

from __future__ import annotations

import binascii
import random
import time
from typing import Any

from rawsse.apns.apple import MAX_TOKEN_BYTES
from rawsse.apns.auth_admin import AuthAdmin, AuthAdminError
from rawsse.config import ConfigError, FaultRule, parse_fault

# Every process (each worker, the master) holds every state: the cap bounds that memory per
# process. 294 B per 32-byte token (entries in token_states and token_stamps, the bytes key, the
# tuple, the ints): tracemalloc's traced memory after 100,000 set_token commands, divided.
MAX_TOKEN_STATES = 100_000
TOKEN_STATE_BYTES = 300
# The 410 timestamp (ms since the epoch) up to the end of year 9999: a plausible date, exact in
# a double (Redis Lua) and in 64 bits (the mesh's JSON).
MAX_TIMESTAMP_MS = 253_402_300_799_999
MAX_STAMP_NS = 2**63 - 1

TOKEN_STATES: dict[str, tuple[int, str] | None] = {
    "active": None,
    "unregistered": (410, "Unregistered"),
    "expired": (410, "ExpiredToken"),
    "bad": (400, "BadDeviceToken"),
}


class AdminError(ValueError):
    """A malformed admin command; the message is returned to the operator as JSON."""


class AdminState:
    """Token states and fault rules, each change stamped (ns) so that workers and nodes that
    receive the same changes in different orders (mesh, master, Redis) end in the same state:
    the newest stamp wins, an older change arriving late is ignored."""

    __slots__ = ("token_states", "faults", "_rng", "token_stamps", "tokens_cleared",
                 "faults_stamp", "auth")

    def __init__(self, faults: tuple[FaultRule, ...] = ()) -> None:
        # raw token -> (state name, timestamp ms)
        self.token_states: dict[bytes, tuple[str, int]] = {}
        self.faults: list[FaultRule] = list(faults)
        self._rng = random.Random()
        self.token_stamps: dict[bytes, int] = {}  # also for tokens set back to active
        self.tokens_cleared = 0
        self.faults_stamp = 0
        self.auth = AuthAdmin()

    def copy(self) -> "AdminState":
        """The same states and rules with a random generator of its own: workers forked with
        one generator state would draw the same faults in lockstep."""
        other = AdminState(tuple(self.faults))
        other.token_states = dict(self.token_states)
        other.token_stamps = dict(self.token_stamps)
        other.tokens_cleared, other.faults_stamp = self.tokens_cleared, self.faults_stamp
        other.auth = self.auth.copy()
        return other

    # -- the push path ------------------------------------------------------------------------

    def token_outcome(self, token: bytes) -> tuple[int, str, int | None] | None:
        """(status, reason, timestamp ms or None) for a token in a non-active state."""
        entry = self.token_states.get(token)
        if entry is None:
            return None
        name, timestamp = entry
        status, reason = TOKEN_STATES[name]  # type: ignore[misc]
        return status, reason, timestamp if status == 410 else None

    def pick_fault(self) -> FaultRule | None:
        """One draw against the rules' cumulative shares (shares over 100% in sum saturate)."""
        if not self.faults:
            return None
        draw = self._rng.random()
        for rule in self.faults:
            if draw < rule.share:
                return rule
            draw -= rule.share
        return None

    # -- commands -----------------------------------------------------------------------------

    def apply(self, command: dict[str, Any]) -> dict[str, Any]:
        """Apply one admin command; returns the JSON answer. Raises AdminError. A command
        without ``stamp`` is the operator's, stamped now (and after anything seen here, so it
        wins even if the clock stepped back); one with a stamp is a replayed change."""
        if not isinstance(command, dict):
            raise AdminError("an admin command is a JSON object")
        op = command.get("op")
        stamp = command.get("stamp")
        if stamp is not None and not _is_int_within(stamp, MAX_STAMP_NS):
            raise AdminError('"stamp" must be nanoseconds since the epoch')
        if op == "set_token":
            return self._set_token(command, stamp)
        if op == "clear_tokens":
            if stamp is None:  # after every token change seen here, like the other commands
                stamp = self._now(max(self.tokens_cleared, *self.token_stamps.values(), 0))
            self._clear_tokens(stamp)
            return {"tokens": len(self.token_states)}
        if op in ("add_fault", "set_faults", "clear_faults"):
            return self._set_faults(op, command, stamp)
        if op in ("update_auth", "set_auth", "clear_auth"):
            try:
                return self.auth.apply(op, command, self._now(self.auth.stamp)
                                       if stamp is None else stamp)
            except AuthAdminError as exc:
                raise AdminError(str(exc)) from None
        raise AdminError(f"unknown admin command {op!r}")

    @staticmethod
    def _now(after: int) -> int:
        return max(time.time_ns(), after + 1)

    def replayable(self, command: dict[str, Any]) -> dict[str, Any]:
        """The command that gives another worker or node the state ``command`` (already
        applied here) left behind: idempotent, with the same stamp and timestamp everywhere."""
        op = command.get("op")
        if op == "set_token":
            token = parse_admin_token(command.get("token"))
            entry = self.token_states.get(token)
            replay = {"op": "set_token", "token": token.hex(), "stamp": self.token_stamps[token]}
            if entry is None:
                return {**replay, "state": "active"}
            return {**replay, "state": entry[0], "timestamp": entry[1]}
        if op == "clear_tokens":
            return {"op": "clear_tokens", "stamp": self.tokens_cleared}
        if op in ("update_auth", "set_auth", "clear_auth"):
            return self.auth.replayable()
        return {"op": "set_faults", "stamp": self.faults_stamp, "rules": [
            # not describe(): its %g drops digits
            {"percent": rule.share * 100, "status": rule.status, "reason": rule.reason}
            for rule in self.faults]}

    def _clear_tokens(self, stamp: int) -> None:
        if stamp <= self.tokens_cleared:
            return
        self.tokens_cleared = stamp
        for token in [t for t, s in self.token_stamps.items() if s < stamp]:
            del self.token_stamps[token]
            self.token_states.pop(token, None)

    def _set_faults(self, op: str, command: dict[str, Any], stamp: int | None) -> dict[str, Any]:
        if op == "add_fault":
            rules = [*self.faults, _fault_from(command)]
        elif op == "set_faults":
            given = command.get("rules")
            if not isinstance(given, list):
                raise AdminError('"rules" must be a list of rules such as "5%:503:ServiceUnavailable"')
            rules = [_fault_from(rule) for rule in given]
        else:
            rules = []
        if stamp is None:
            stamp = self._now(self.faults_stamp)
        if stamp >= self.faults_stamp:
            self.faults, self.faults_stamp = rules, stamp
        return self.describe_faults()

    def _set_token(self, command: dict[str, Any], stamp: int | None) -> dict[str, Any]:
        token = parse_admin_token(command.get("token"))
        state = command.get("state", "active")
        if state not in TOKEN_STATES:
            raise AdminError(f"state must be one of {', '.join(TOKEN_STATES)}, not {state!r}")
        timestamp = command.get("timestamp")
        if timestamp is None:
            timestamp = int(time.time() * 1000)
        if not _is_int_within(timestamp, MAX_TIMESTAMP_MS):
            raise AdminError(f'"timestamp" must be milliseconds since the epoch, a whole number '
                             f'from 0 to {MAX_TIMESTAMP_MS} (year 9999), not {_shown(timestamp)}')
        newest = max(self.token_stamps.get(token, 0), self.tokens_cleared)
        if stamp is None:
            self._check_room(token)
            stamp = self._now(newest)
        if stamp >= newest:
            self.token_stamps[token] = stamp
            if state == "active":
                self.token_states.pop(token, None)
            else:
                self.token_states[token] = (state, timestamp)
        return {"token": token.hex(), "state": state,
                **({"timestamp": timestamp} if state != "active" else {})}

    def _check_room(self, token: bytes) -> None:
        """An operator's change to a token not yet known here needs room under the cap (a
        replayed change is always taken: every process must end in the same state). Tokens set
        back to active keep their stamp, so they count until DELETE /admin/tokens."""
        if token not in self.token_stamps and len(self.token_stamps) >= MAX_TOKEN_STATES:
            raise AdminError(f"{MAX_TOKEN_STATES} token states are held, the most there may be: "
                             f"DELETE /admin/tokens clears them")

    def describe_tokens(self) -> dict[str, Any]:
        return {"tokens": [{"token": t.hex(), "state": s, "timestamp": ts}
                           for t, (s, ts) in sorted(self.token_states.items())]}

    def describe_faults(self) -> dict[str, Any]:
        return {"faults": [rule.as_dict() for rule in self.faults]}


def _is_int_within(value: Any, maximum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_admin_token(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise AdminError("a device token (hex) is required")
    try:
        token = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise AdminError(f"{value!r} is not an even-length hex token") from None
    if len(token) > MAX_TOKEN_BYTES:  # what a push could name at all (apple.py)
        raise AdminError(f"a device token is at most {MAX_TOKEN_BYTES} bytes "
                         f"({2 * MAX_TOKEN_BYTES} hex characters)")
    return token


def _fault_from(value: Any) -> FaultRule:
    """A rule given as ``"5%:503:ServiceUnavailable"`` or ``{"percent", "status", "reason"}``."""
    if isinstance(value, dict):
        text = value.get("rule")
        if text is None:
            text = f"{value.get('percent')}%:{value.get('status', '')}"
            if value.get("reason"):
                text += f":{value['reason']}"
        value = text
    if not isinstance(value, str):
        raise AdminError('a fault rule is "PERCENT%:STATUS[:REASON]", e.g. "5%:503:ServiceUnavailable"')
    try:
        return parse_fault(value, "fault")
    except ConfigError as exc:
        raise AdminError(str(exc)) from None
