"""``rawsse serve``'s provider-authentication flags: ``--auth`` and what goes with it, checked
once by the master at start (a key file that is missing or not ES256 is one line naming the
flag, not a failure in every worker)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from rawsse.apns.topics import is_topic
from rawsse.config import ConfigError, parse_duration

EPILOG = """\
provider authentication (--auth; default off: any authorization, any topic, as Fleet's dev mode):
  --auth token   authorization: bearer <JWT> (ES256, kid, iss, iat), verified against
                 --auth-key KEYID=AuthKey_KEYID.p8 when given, else only its form is checked;
                 a token older than --token-max-age, or a new one on a connection within 20
                 minutes of the last, is refused as Apple does; apns-topic is required
  --auth cert    a TLS client certificate chaining to --tls-client-ca; its subject's UID is
                 the topic (with .voip, .complication, .pushkit.fileprovider)
  --auth any     either, as api.push.apple.com
  revoke a key id or certificate at run time: /admin/auth (docs/runbook.md, "Admin routes")
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--auth", default="off", choices=["off", "token", "cert", "any"],
        help="provider authentication as APNs checks it: JWTs (token), TLS client "
             "certificates (cert) or either (any); off accepts every push (default: %(default)s)")
    add("--auth-key", action="append", default=[], metavar="KEYID=FILE",
        help="with --auth token|any: verify the ES256 signature of tokens naming KEYID with "
             "this .p8 (rawsse certs DIR writes one) (repeatable); a token naming another "
             "key id is 403 InvalidProviderToken (default: none, the signature is not checked)")
    add("--team-id", metavar="ID",
        help="with --auth token|any: the team id (iss) every token must name (default: any, "
             "but one team per connection)")
    add("--token-max-age", default="1h", metavar="DURATION",
        help="with --auth token|any: a token whose iat is older is 403 ExpiredProviderToken "
             "(default: 1h, as Apple)")
    add("--topics", metavar="A,B,...",
        help="with --auth token|any: the bundle ids tokens may push to, each with its push-type "
             "suffixes (.voip, .complication, ...); others are 400 TopicDisallowed (default: "
             "any well-formed topic)")
    add("--tls-client-ca", metavar="FILE",
        help="with --tls-listen and --auth cert|any: ask TLS clients for a certificate "
             "chaining to these PEM CAs; an untrusted or expired one fails the handshake")


def auth_options(args: argparse.Namespace) -> dict[str, Any]:
    mode = args.auth
    uses_tokens, uses_certificates = mode in ("token", "any"), mode in ("cert", "any")
    token_flags = [("--auth-key", args.auth_key), ("--team-id", args.team_id),
                   ("--topics", args.topics)]
    for flag, value in token_flags:
        if value and not uses_tokens:
            raise ConfigError(flag, "only means something with --auth token or --auth any")
    if args.tls_client_ca and not uses_certificates:
        raise ConfigError("--tls-client-ca", "only means something with --auth cert or --auth any")
    if args.tls_client_ca and not args.tls_listen:
        raise ConfigError("--tls-client-ca", "needs --tls-listen (certificates come over TLS)")
    if mode == "cert" and not args.tls_client_ca:
        raise ConfigError("--auth", "cert needs --tls-listen and --tls-client-ca FILE")
    max_age = parse_duration(args.token_max_age, "--token-max-age")
    if max_age <= 0:
        raise ConfigError("--token-max-age", "must be more than 0")
    return {"auth": mode, "auth_keys": tuple(_key(text) for text in args.auth_key),
            "team_id": (args.team_id or "").strip(), "token_max_age": max_age,
            "topics": _topics(args.topics), "tls_client_ca": _client_ca(args.tls_client_ca)}


def _key(text: str) -> tuple[str, bytes]:
    """``KEYID=FILE``: the key id and the PEM, loaded once here to find a bad file now."""
    kid, sep, path = text.partition("=")
    kid, path = kid.strip(), path.strip()
    if not sep or not kid or not path:
        raise ConfigError("--auth-key", f"{text!r} is not KEYID=FILE, e.g. "
                                        f"ABC123DEFG=AuthKey_ABC123DEFG.p8")
    try:
        with open(path, "rb") as file:
            pem = file.read()
    except OSError as exc:
        raise ConfigError("--auth-key", f"cannot read {path}: {exc.strerror}") from None
    try:
        from rawsse.apns.jwt import load_public_key

        load_public_key(pem)
    except ImportError:
        raise ConfigError("--auth-key", "needs the cryptography package: pip install "
                                        "cryptography") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError("--auth-key", f"{path} is not an ES256 key (.p8, PEM): {exc}") from None
    return kid, pem


def _topics(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    topics = tuple(t.strip() for t in text.split(","))
    for topic in topics:
        if not is_topic(topic.encode()):
            raise ConfigError("--topics", f"{topic!r} is not a bundle id (letters, digits, "
                                          f"hyphens, dots)")
    return topics


def _client_ca(path: str | None) -> str:
    if not path:
        return ""
    if not os.path.isfile(path):
        raise ConfigError("--tls-client-ca", f"{path} is not a readable file")
    return path
