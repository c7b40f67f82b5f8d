"""Simulated outcomes set at run time: per-token states and fault rules. No I/O.

Changes arrive as small JSON-able commands (``apply``) so the prefork master can hand the same
command to every worker and all of them answer alike.

Token states (A.6): ``active`` (default), ``unregistered`` → ``410 Unregistered`` with the
timestamp in ms, ``expired`` → ``410 ExpiredToken``, ``bad`` → ``400 BadDeviceToken``.
Fault rules: a share of pushes answered with a status and reason instead of being accepted.
"""

from __future__ import annotations

import binascii
import random
import time
from typing import Any

from .config import ConfigError, FaultRule, parse_fault

TOKEN_STATES: dict[str, tuple[int, str] | None] = {
    "active": None,
    "unregistered": (410, "Unregistered"),
    "expired": (410, "ExpiredToken"),
    "bad": (400, "BadDeviceToken"),
}


class AdminError(ValueError):
    """A malformed admin command; the message is returned to the operator as JSON."""


class AdminState:
    __slots__ = ("token_states", "faults", "_rng")

    def __init__(self, faults: tuple[FaultRule, ...] = ()) -> None:
        # raw token -> (state name, timestamp ms)
        self.token_states: dict[bytes, tuple[str, int]] = {}
        self.faults: list[FaultRule] = list(faults)
        self._rng = random.Random()

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
        """Apply one admin command; returns the JSON answer. Raises AdminError."""
        op = command.get("op")
        if op == "set_token":
            return self._set_token(command)
        if op == "clear_tokens":
            self.token_states.clear()
            return {"tokens": 0}
        if op == "add_fault":
            self.faults.append(_fault_from(command))
            return self.describe_faults()
        if op == "set_faults":
            rules = command.get("rules")
            if not isinstance(rules, list):
                raise AdminError('"rules" must be a list of rules such as "5%:503:ServiceUnavailable"')
            self.faults = [_fault_from(rule) for rule in rules]
            return self.describe_faults()
        if op == "clear_faults":
            self.faults = []
            return self.describe_faults()
        raise AdminError(f"unknown admin command {op!r}")

    def _set_token(self, command: dict[str, Any]) -> dict[str, Any]:
        token = parse_admin_token(command.get("token"))
        state = command.get("state", "active")
        if state not in TOKEN_STATES:
            raise AdminError(f"state must be one of {', '.join(TOKEN_STATES)}, not {state!r}")
        timestamp = command.get("timestamp")
        if timestamp is None:
            timestamp = int(time.time() * 1000)
        if not isinstance(timestamp, int) or timestamp < 0:
            raise AdminError('"timestamp" must be milliseconds since the epoch')
        if state == "active":
            self.token_states.pop(token, None)
        else:
            self.token_states[token] = (state, timestamp)
        return {"token": token.hex(), "state": state,
                **({"timestamp": timestamp} if state != "active" else {})}

    def describe_tokens(self) -> dict[str, Any]:
        return {"tokens": [{"token": t.hex(), "state": s, "timestamp": ts}
                           for t, (s, ts) in sorted(self.token_states.items())]}

    def describe_faults(self) -> dict[str, Any]:
        return {"faults": [rule.as_dict() for rule in self.faults]}


def parse_admin_token(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise AdminError("a device token (hex) is required")
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise AdminError(f"{value!r} is not an even-length hex token") from None


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
