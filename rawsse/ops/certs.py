"""``rawsse certs DIR``: throwaway TLS material for ``--tls-listen`` and APNs client libraries.

Writes, with the ``cryptography`` package:
- ``ca.pem``/``ca-key.pem``: a CA to trust in the sender (never in a system store);
- ``server.pem``/``server-key.pem``: signed by it, for localhost, 127.0.0.1, ::1,
  api.push.apple.com, api.sandbox.push.apple.com and every ``--name`` (a sender whose URL is
  hard-wired to Apple's hosts can be pointed here with /etc/hosts);
- ``client.pem``/``client-key.pem``: a certificate-based provider's identity, with the subject
  Apple's push certificates carry (``UID=<topic>``, "Apple Push Services: <topic>");
- ``AuthKey_<KEYID>.p8``: an ES256 signing key in PKCS#8 PEM, the form Apple hands out for
  token-based (JWT) authentication.

Private keys are written 0600. These files let a client library run its usual setup; rawsse
checks the certificate and tokens made with them under ``rawsse serve --auth`` only
(``--tls-client-ca ca.pem``, ``--auth-key KEYID=AuthKey_KEYID.p8``; ``rawsse/apns/auth.py``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from typing import Any

from rawsse.config import ConfigError

SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "api.push.apple.com",
                "api.sandbox.push.apple.com")
# The longest server-certificate validity macOS and iOS clients accept (Apple: "Requirements
# for trusted certificates in iOS 13 and macOS 10.15").
VALID_DAYS = 825

EPILOG = """\
files written (private keys 0600):
  ca.pem                     the CA to trust in the sender
  server.pem, server-key.pem rawsse serve --tls-listen :8443 --tls-cert DIR/server.pem --tls-key DIR/server-key.pem
  client.pem, client-key.pem a provider certificate (subject UID=<topic>)
  AuthKey_<KEYID>.p8         an ES256 token signing key, as Apple's
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("dir", metavar="DIR", help="where to write the files (created if missing)")
    add("--name", action="append", default=[], metavar="HOST",
        help="another DNS name or IP address for the server certificate (repeatable)")
    add("--topic", default="com.example.app", metavar="BUNDLE_ID",
        help="the client certificate's topic, its UID (default: %(default)s)")
    add("--force", action="store_true", help="overwrite files already in DIR")


def run(args: argparse.Namespace) -> int:
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        raise ConfigError("certs", "needs the cryptography package: pip install cryptography") from None
    names = list(SERVER_NAMES) + [n.strip() for n in args.name if n.strip() not in SERVER_NAMES]
    if any(not n for n in names):
        raise ConfigError("--name", "an empty name")
    directory = args.dir
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ConfigError("DIR", f"cannot create {directory}: {exc.strerror}") from None
    key_id = secrets.token_hex(5).upper()  # Apple's key IDs are 10 characters
    files = write_all(directory, names, args.topic, key_id, args.force)
    print(instructions(directory, files, key_id, args.topic))
    return 0


def write_all(directory: str, names: list[str], topic: str, key_id: str,
              force: bool) -> dict[str, str]:
    """Every file; their paths by role."""
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = {role: os.path.join(directory, name) for role, name in (
        ("ca", "ca.pem"), ("ca_key", "ca-key.pem"), ("server", "server.pem"),
        ("server_key", "server-key.pem"), ("client", "client.pem"),
        ("client_key", "client-key.pem"), ("p8", f"AuthKey_{key_id}.p8"))}
    if not force:
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing:
            raise ConfigError("DIR", f"{existing[0]} exists (--force overwrites)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(paths["ca"], _pem(ca), private=False)
    _write(paths["ca_key"], _key_pem(ca_key), private=True)
    _write(paths["server"], _pem(_server_certificate(server_key, ca, ca_key, names)), private=False)
    _write(paths["server_key"], _key_pem(server_key), private=True)
    _write(paths["client"], _pem(_client_certificate(client_key, ca, ca_key, topic)), private=False)
    _write(paths["client_key"], _key_pem(client_key), private=True)
    _write(paths["p8"], _key_pem(ec.generate_private_key(ec.SECP256R1())), private=True)
    return paths


def _name(*attributes: tuple[Any, str]) -> Any:
    from cryptography import x509

    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _builder(subject: Any, issuer: Any, public_key: Any, days: int) -> Any:
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _ca_certificate(key: Any) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = _name((NameOID.COMMON_NAME, "rawsse throwaway CA"),
                 (NameOID.ORGANIZATION_NAME, "rawsse"))
    return (_builder(name, name, key.public_key(), 3650)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))


def _leaf(builder: Any, ca: Any, ca_key: Any, usage: Any) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


def _server_certificate(key: Any, ca: Any, ca_key: Any, names: list[str]) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    builder = (_builder(_name((NameOID.COMMON_NAME, names[0])), ca.subject, key.public_key(),
                        VALID_DAYS)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    return _leaf(builder, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH)


def _client_certificate(key: Any, ca: Any, ca_key: Any, topic: str) -> Any:
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = _name((NameOID.USER_ID, topic),
                    (NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
                    (NameOID.ORGANIZATIONAL_UNIT_NAME, "RAWSSE0000"),
                    (NameOID.ORGANIZATION_NAME, "rawsse"),
                    (NameOID.COUNTRY_NAME, "US"))
    builder = _builder(subject, ca.subject, key.public_key(), 365)
    return _leaf(builder, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)


def _pem(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _key_pem(key: Any) -> bytes:
    """PKCS#8 PEM, unencrypted ("BEGIN PRIVATE KEY"): what Apple's .p8 files hold, and what
    Go, Node and OpenSSL read without a passphrase prompt."""
    from cryptography.hazmat.primitives import serialization

    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _write(path: str, data: bytes, private: bool) -> None:
    """Created with its final mode: a private key is never readable by others, not even briefly."""
    mode = 0o600 if private else 0o644
    try:
        if os.path.exists(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise ConfigError("DIR", f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # the umask may have taken bits off a public file


def instructions(directory: str, files: dict[str, str], key_id: str, topic: str) -> str:
    ca = files["ca"]
    return f"""\
wrote {directory}: ca.pem, server.pem + server-key.pem, client.pem + client-key.pem (UID={topic}), \
AuthKey_{key_id}.p8 (key ID {key_id})

serve:   rawsse serve --tls-listen 0.0.0.0:8443 --tls-cert {files["server"]} --tls-key {files["server_key"]}
trust the CA in the sender (not in the system store):
  curl     curl --cacert {ca} --http2 -d '{{"aps":{{}}}}' https://127.0.0.1:8443/3/device/<token>
  Go       SSL_CERT_FILE={ca} (replaces the system roots), or add it to an x509.CertPool in tls.Config.RootCAs
  Node     NODE_EXTRA_CA_CERTS={ca} (added to the roots), or the ca option of https/http2.connect
  Python   ssl.create_default_context(cafile="{ca}"); requests: REQUESTS_CA_BUNDLE={ca}; httpx: verify="{ca}"
a sender hard-wired to api.push.apple.com: map it to this host in /etc/hosts, port 443 (--tls-listen :443)
check what senders present (optional): add --auth any --auth-key {key_id}={files["p8"]}
  and --tls-client-ca {ca} (client.pem); see rawsse serve --help, provider authentication"""
