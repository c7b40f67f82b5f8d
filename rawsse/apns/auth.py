"""Provider authentication as APNs checks it (``--auth token|cert|any``): per connection, once.

Theory of operation
-------------------
A push route asks ``Authenticator.refusal(request, now)`` first; ``None`` lets the push on,
a reason (Apple's, with its status in ``apple.REASON_STATUS``) refuses it. Under ``--auth off``
there is no ``Authenticator`` and the route skips the call.

What a connection proved lives in one ``ConnectionAuth`` in the connection's ``auth`` slot (None
until its first push, so a connection that never pushes pays one empty slot). A token connection
keeps the exact bytes of the ``authorization`` value it had accepted, so a push with the same
token costs one bytes comparison, one comparison of the token's expiry with the clock and one of
the admin generation (``auth_admin.py``); only a new token is parsed and its signature verified
(``jwt.py``). A certificate connection (TLS with a client certificate, ``--tls-client-ca``) is
named by its certificate's SHA-256 fingerprint and its topic, the subject's ``UID``. The last
topic accepted is kept too (``topics.py`` has the rules), so a sender pushing to one topic checks
it once.

Apple's rules (Apple, "Establishing a token-based connection to APNs"; "Handling notification
responses from APNs" for the reasons):
- no ``authorization`` on a connection without a certificate, or under ``--auth cert`` (which
  takes certificates only) no certificate: ``403 MissingProviderToken``;
- a token not of Apple's form, signed by an unknown or revoked key, badly signed, or of a team
  other than ``--team-id`` or than the connection's first token (one team per connection, as
  jchambers/pushy's mock enforces, pushy#399): ``403 InvalidProviderToken``;
- a token whose ``iat`` is more than ``--token-max-age`` (one hour) old, when presented or at
  any push after: ``403 ExpiredProviderToken``;
- a new token on a connection less than 20 minutes after its previous one:
  ``429 TooManyProviderTokenUpdates`` (the previous token stays in force);
- over HTTP/2, a token connection may open one stream until its first token is accepted; then
  the connection announces ``--h2-max-streams`` in a new SETTINGS (Apple, "Sending notification
  requests to APNs": "APNs allows only one stream until you post a request with a valid
  authentication token").

The clock these rules read is the unix time of the request's loop turn (``Routes.wall_offset``)
plus the admin clock offset, a test aid.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from rawsse.apns import jwt
from rawsse.apns.auth_admin import AuthAdmin
from rawsse.apns.topics import CERTIFICATE_SUFFIXES, TOKEN_SUFFIXES, topic_refusal, with_suffixes
from rawsse.config import ServeConfig

if TYPE_CHECKING:
    from rawsse.server.exchange import Request

log = logging.getLogger(__name__)

MODES = ("off", "token", "cert", "any")
MIN_REFRESH_SECONDS = 20 * 60  # Apple: refresh no more than once every 20 minutes
_UNSET = object()  # no topic checked yet (None is a real answer: the header was absent)
# The certificate subject attribute holding the topic (OID 0.9.2342.19200300.100.1.1), as
# Python's ssl module names it.
_UID = "userId"
# /stats "auth" -> /metrics family and help (metrics.py)
COUNTERS = {
    "tokens_verified": ("rawsse_auth_tokens_verified_total",
                        "Provider token signatures verified (once per new token per connection)."),
    "tokens_accepted": ("rawsse_auth_tokens_accepted_total",
                        "Provider tokens accepted on a connection."),
    "certificates_accepted": ("rawsse_auth_certificates_total",
                              "Connections that pushed with a client certificate."),
}


class ConnectionAuth:
    """What one connection has proved: its current token, or its certificate."""

    __slots__ = ("value", "expires", "presented", "kid", "team", "generation", "revoked",
                 "certificate", "certificate_topic", "allowed", "topic")

    def __init__(self, generation: int) -> None:
        self.value: bytes | None = None  # the authorization value accepted last, as sent
        self.expires = 0.0  # when that token becomes too old (auth clock)
        self.presented = 0.0  # when it was accepted (auth clock): the 20-minute rule
        self.kid = ""
        self.team = ""  # the connection's team: pinned by its first token
        self.generation = generation  # of the admin auth state last checked against
        self.revoked = False  # its key or certificate was revoked: every push refused
        self.certificate: str | None = None  # SHA-256 fingerprint, on a certificate connection
        self.certificate_topic: bytes | None = None
        self.allowed: frozenset[bytes] | None = None  # the certificate's topics
        self.topic: object = _UNSET  # the apns-topic value accepted last


class Authenticator:
    """One per worker: the configured keys and rules, the admin state, the counters."""

    __slots__ = ("mode", "tokens", "keys", "team_id", "max_age", "topics", "admin", "counts",
                 "refusals", "full_streams")

    def __init__(self, config: ServeConfig, admin: AuthAdmin) -> None:
        self.mode = config.auth
        self.tokens = config.auth != "cert"  # are provider tokens accepted at all
        # Loaded per worker from the PEM the master checked at start.
        self.keys = {kid: jwt.load_public_key(pem) for kid, pem in config.auth_keys}
        self.team_id = config.team_id
        self.max_age = config.token_max_age
        self.topics = (with_suffixes([t.encode() for t in config.topics], TOKEN_SUFFIXES)
                       if config.topics else None)
        self.admin = admin
        self.full_streams = config.h2_max_streams
        # counters for /stats: tokens verified and accepted, certificates; refusals by reason
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.refusals: dict[str, int] = {}

    # -- the push path ------------------------------------------------------------------------

    def refusal(self, request: "Request", now: float) -> str | None:
        """Apple's reason to refuse this push, or None. ``now``: unix time, this loop turn's."""
        channel = request.channel
        state = channel.auth
        if state is None:
            state = channel.auth = self._first_push(channel)
        admin = self.admin
        if state.generation != admin.generation:
            self._recheck(state)
        if state.revoked:
            return self._refuse("InvalidProviderToken")
        headers = request.headers
        if state.certificate is None:
            value = headers.get(b"authorization")
            if value is None or not self.tokens:  # --auth cert takes certificates only
                return self._refuse("MissingProviderToken")
            now += admin.clock_offset
            if value != state.value:
                reason = self._present(channel, state, value, now)
                if reason is not None:
                    return self._refuse(reason)
            elif now >= state.expires:
                return self._refuse("ExpiredProviderToken")
        topic = headers.get(b"apns-topic")
        if topic != state.topic:
            reason = topic_refusal(topic, state.allowed if state.certificate else self.topics,
                                   state.certificate_topic)
            if reason is not None:
                return self._refuse(reason)
            state.topic = topic
        return None

    # -- a connection's first push, a new token, a new admin state ----------------------------

    def _first_push(self, channel: Any) -> ConnectionAuth:
        state = ConnectionAuth(self.admin.generation)
        certificate = peer_certificate(channel.transport) if self.mode != "token" else None
        if certificate is not None:
            der, subject = certificate
            state.certificate = hashlib.sha256(der).hexdigest()
            state.certificate_topic = certificate_topic(subject)
            topics = [state.certificate_topic] if state.certificate_topic else []
            state.allowed = with_suffixes(topics, CERTIFICATE_SUFFIXES)
            state.revoked = state.certificate in self.admin.revoked_certificates
            self.counts["certificates_accepted"] += 1
        return state

    def _recheck(self, state: ConnectionAuth) -> None:
        """The admin auth state changed: is what the connection proved revoked now?"""
        admin = self.admin
        state.generation = admin.generation
        if state.certificate is not None:
            state.revoked = state.certificate in admin.revoked_certificates
        else:
            state.revoked = bool(state.kid) and state.kid in admin.revoked_keys

    def _present(self, channel: Any, state: ConnectionAuth, value: bytes,
                 now: float) -> str | None:
        """A token this connection has not had accepted: check it, then make it current."""
        try:
            token = jwt.parse(value)
        except jwt.Malformed as exc:
            log.debug("provider token refused: %s", exc)
            return "InvalidProviderToken"
        reason = self._verify(token, state)
        if reason is not None:
            return reason
        if now - token.issued_at > self.max_age:
            return "ExpiredProviderToken"
        first = state.value is None
        if not first and now - state.presented < MIN_REFRESH_SECONDS:
            return "TooManyProviderTokenUpdates"
        state.value, state.presented = value, now
        state.expires = token.issued_at + self.max_age
        state.kid, state.team = token.kid, token.team
        self.counts["tokens_accepted"] += 1
        if first:
            channel.authenticated()
        return None

    def _verify(self, token: jwt.Token, state: ConnectionAuth) -> str | None:
        if token.kid in self.admin.revoked_keys:
            return "InvalidProviderToken"
        if self.team_id and token.team != self.team_id:
            return "InvalidProviderToken"
        if state.team and token.team != state.team:
            return "InvalidProviderToken"
        if self.keys:
            key = self.keys.get(token.kid)
            if key is None:
                return "InvalidProviderToken"
            self.counts["tokens_verified"] += 1
            if not jwt.verify(token, key):
                return "InvalidProviderToken"
        return None

    def _refuse(self, reason: str) -> str:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return reason

    # -- HTTP/2 and /stats --------------------------------------------------------------------

    def initial_streams(self, transport: Any) -> int:
        """SETTINGS_MAX_CONCURRENT_STREAMS a new HTTP/2 connection announces: one on a token
        connection until its first token is accepted, the full limit with a certificate."""
        if self.mode == "cert" or (self.mode == "any" and peer_certificate(transport)):
            return self.full_streams
        return 1

    def snapshot(self, doc: dict[str, Any]) -> None:
        doc["auth"] = dict(self.counts)
        doc["auth_refusals"] = dict(self.refusals)


def peer_certificate(transport: Any) -> tuple[bytes, Any] | None:
    """(DER, subject) of the client certificate a TLS connection presented, or None (plain
    TCP, or TLS without one). The handshake verified it against ``--tls-client-ca``."""
    tls = getattr(transport, "ssl", None)
    if tls is None:
        return None
    der = tls.getpeercert(binary_form=True)
    if not der:
        return None
    return der, tls.getpeercert().get("subject", ())


def certificate_topic(subject: Any) -> bytes | None:
    """The ``UID`` of a certificate subject (``ssl``'s tuple of RDNs), as APNs reads it."""
    for rdn in subject:
        for name, value in rdn:
            if name == _UID:
                return str(value).encode()
    return None
