"""The run-time side of provider authentication: revoked key ids and certificates, and the
auth clock's offset, set through ``/admin/auth``. No I/O.

It travels like the other admin state (``admin.py``): an operator's change is applied here and
handed on in replayable form, ``set_auth`` with the whole resulting state and its stamp, so every
worker, the master (for the workers it spawns later) and, in Redis mode, every node end in the
same state whatever order changes reach them in: the newest stamp wins.

- A revoked key id: a token signed with it is ``403 InvalidProviderToken``, on connections that
  had it accepted before too. A revoked certificate (its SHA-256 fingerprint, as ``openssl x509
  -noout -fingerprint -sha256`` prints it, colons optional): every push on a connection that
  presented it is ``403 InvalidProviderToken``.
- The clock offset (seconds, a test aid): added to the time the token rules read (a token's
  age against ``--token-max-age``, the 20 minutes between new tokens on a connection), so a test
  sees an hour pass without waiting one. It moves nothing else (``apns-expiration`` keeps the
  real clock).

``generation`` goes up with every change that is applied, so a connection that checked its
credentials against one generation knows, with one comparison per push, when to check again.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Each name is kept by every process and carried as JSON by the mesh and Redis: bounded.
MAX_REVOKED = 1000
MAX_NAME = 128
# Ten years either way: enough to age any token; a double holds it exactly enough.
MAX_CLOCK_OFFSET = 10 * 365 * 86400.0
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


class AuthAdminError(ValueError):
    """A malformed ``/admin/auth`` change; the message names the field."""


class AuthAdmin:
    __slots__ = ("revoked_keys", "revoked_certificates", "clock_offset", "stamp", "generation")

    def __init__(self) -> None:
        self.revoked_keys: frozenset[str] = frozenset()
        self.revoked_certificates: frozenset[str] = frozenset()
        self.clock_offset = 0.0
        self.stamp = 0
        self.generation = 0

    def copy(self) -> "AuthAdmin":
        other = AuthAdmin()
        other.revoked_keys, other.revoked_certificates = self.revoked_keys, self.revoked_certificates
        other.clock_offset, other.stamp = self.clock_offset, self.stamp
        return other

    def apply(self, op: str, command: dict[str, Any], stamp: int) -> dict[str, Any]:
        """``update_auth`` (add revocations, set the offset), ``set_auth`` (the whole state) or
        ``clear_auth``; ``stamp`` is the change's. Everything is checked before any change."""
        if op == "update_auth":
            keys = self.revoked_keys | _names(command, "revoke_keys", "revoke_key", _key_id)
            certificates = self.revoked_certificates | _names(
                command, "revoke_certificates", "revoke_certificate", fingerprint)
            offset = _offset(command.get("clock_offset", self.clock_offset))
        elif op == "set_auth":
            keys = _names(command, "revoked_keys", "", _key_id)
            certificates = _names(command, "revoked_certificates", "", fingerprint)
            offset = _offset(command.get("clock_offset", 0.0))
        else:
            keys, certificates, offset = frozenset(), frozenset(), 0.0
        if len(keys) > MAX_REVOKED or len(certificates) > MAX_REVOKED:
            raise AuthAdminError(f"at most {MAX_REVOKED} revoked key ids and as many certificates")
        if stamp >= self.stamp:
            self.revoked_keys, self.revoked_certificates = keys, certificates
            self.clock_offset, self.stamp = offset, stamp
            self.generation += 1
        return self.describe()

    def replayable(self) -> dict[str, Any]:
        return {"op": "set_auth", "stamp": self.stamp, **self.describe()}

    def describe(self) -> dict[str, Any]:
        return {"revoked_keys": sorted(self.revoked_keys),
                "revoked_certificates": sorted(self.revoked_certificates),
                "clock_offset": self.clock_offset}


def fingerprint(value: Any) -> str:
    """A certificate's SHA-256 fingerprint as kept: 64 lower-case hex digits, no colons."""
    text = value.replace(":", "").lower() if isinstance(value, str) else ""
    if not _FINGERPRINT.match(text):
        raise AuthAdminError(f"a certificate is named by its SHA-256 fingerprint (64 hex "
                             f"digits, colons optional), not {_shown(value)}")
    return text


def _key_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise AuthAdminError(f"a key id is a non-empty string of at most {MAX_NAME} "
                             f"characters, not {_shown(value)}")
    return value


def _names(command: dict[str, Any], many: str, one: str, check: Any) -> frozenset[str]:
    values = command.get(many, [])
    if not isinstance(values, list):
        raise AuthAdminError(f'"{many}" must be a list')
    if one and one in command:
        values = [*values, command[one]]
    if len(values) > MAX_REVOKED:
        raise AuthAdminError(f'"{many}": at most {MAX_REVOKED}')
    return frozenset(check(value) for value in values)


def _offset(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or abs(value) > MAX_CLOCK_OFFSET):
        raise AuthAdminError(f'"clock_offset" must be seconds, a number within '
                             f'±{MAX_CLOCK_OFFSET:.0f}, not {_shown(value)}')
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
