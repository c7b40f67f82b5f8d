"""Provider authentication tokens as APNs reads them: a JWT in ``authorization: bearer <JWT>``.

The form (Apple, "Establishing a token-based connection to APNs"; RFC 7519, RFC 7515 §7.1): three
base64url parts without padding, a header naming ``alg`` ES256 and the signing key's ``kid``, and
claims naming the team (``iss``) and the issue time (``iat``, seconds since the epoch). Client
libraries send ``iat`` as an integer (most), a float (pyapns-client ``client.py``) or a numeric
string (kalyke-apns ``clients/apns.py``), so all three are read. The signature is ES256 (RFC 7518
§3.4): ECDSA P-256 with SHA-256 over ``header.claims``, sent as the 64-byte ``r || s``, which is
verified with the ``cryptography`` package against the public half of a ``.p8`` key.

Nothing here knows connections or clocks: ``parse`` says what a token claims or why it is
malformed, ``verify`` whether its signature holds. ``auth.py`` decides what that means for a
push.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, NamedTuple

_BASE64URL = re.compile(rb"^[A-Za-z0-9_-]+$")
_SIGNATURE_BYTES = 64  # ES256: r and s, 32 bytes each (RFC 7518 §3.4)
_SCHEME = b"bearer "


class Token(NamedTuple):
    """What a well-formed token claims, and what its signature covers."""

    kid: str
    team: str
    issued_at: float
    signed: bytes  # the ASCII ``header.claims`` the signature is over
    signature: bytes  # r || s


class Malformed(ValueError):
    """Not a provider token APNs would read; the message says why (logged at debug level)."""


def parse(value: bytes) -> Token:
    """The token in an ``authorization`` header value; raises ``Malformed``."""
    if value[:len(_SCHEME)].lower() != _SCHEME:
        raise Malformed("the authorization scheme is not bearer")
    parts = value[len(_SCHEME):].strip().split(b".")
    if len(parts) != 3 or not all(_BASE64URL.match(part) for part in parts):
        raise Malformed("not three base64url parts")
    header, claims = _json_object(parts[0], "header"), _json_object(parts[1], "claims")
    signature = _unbase64(parts[2])
    if header.get("alg") != "ES256":
        raise Malformed("alg is not ES256")
    kid, team = header.get("kid"), claims.get("iss")
    if not isinstance(kid, str) or not kid:
        raise Malformed("no kid in the header")
    if not isinstance(team, str) or not team:
        raise Malformed("no iss (team id) in the claims")
    if len(signature) != _SIGNATURE_BYTES:
        raise Malformed("an ES256 signature is 64 bytes")
    return Token(kid, team, issued_at(claims.get("iat")), parts[0] + b"." + parts[1], signature)


def issued_at(value: Any) -> float:
    """``iat`` as seconds: an integer, a float or a numeric string, finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Malformed("iat is not a number")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond a double
        raise Malformed("iat is not a number") from None
    if not math.isfinite(seconds):
        raise Malformed("iat is not a finite number")
    return seconds


def verify(token: Token, public_key: Any) -> bool:
    """Does the ES256 signature of ``token`` hold for ``public_key`` (an EC P-256 key)?"""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    r = int.from_bytes(token.signature[:32], "big")
    s = int.from_bytes(token.signature[32:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), token.signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_public_key(pem: bytes) -> Any:
    """The public key of a ``.p8`` (PKCS#8 private key, as Apple hands out) or of a PEM public
    key; raises ``ValueError`` unless it is an EC P-256 key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (load_pem_private_key,
                                                              load_pem_public_key)

    if b"PUBLIC KEY-----" in pem:
        key: Any = load_pem_public_key(pem)
    else:
        key = load_pem_private_key(pem, None).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an EC P-256 key (ES256)")
    return key


def _json_object(part: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_unbase64(part))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the C stack
        raise Malformed(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"the {what} is not a JSON object")
    return value


def _unbase64(part: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise Malformed("bad base64url") from None
