"""Provider authentication (``--auth``) over real sockets: JWTs signed with the ``.p8`` that
``rawsse certs`` writes, every reason over HTTP/1.1 and HTTP/2 on TLS, client certificates from
``rawsse certs`` over TLS (and an expired and an untrusted one refused at the handshake), the
one-stream SETTINGS of a token connection, the 20-minute and one-hour rules with the admin clock
offset, revocations through ``/admin/auth`` held by every worker, the counters in ``/stats`` and
``/metrics``, and the start-time flag checks."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import ROOT, launch, reserve_port
from test_h2_server import H2Client
from test_push_api import new_token
from wire import HTTPClient, _ResponseCollector, get_json, wait_for

TEAM = "TEAM123456"
TOPIC = "com.example.auth"
PAYLOAD = b'{"aps":{}}'


# -- material: rawsse certs, JWTs -----------------------------------------------------------------

def rawsse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rawsse", *args], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONPATH=ROOT))


def make_certs(directory: str) -> dict:
    result = rawsse("certs", directory, "--topic", TOPIC)
    assert result.returncode == 0, result.stderr
    p8 = next(n for n in os.listdir(directory) if n.startswith("AuthKey_"))
    return {"dir": directory, "p8": f"{directory}/{p8}", "kid": p8[len("AuthKey_"):-len(".p8")]}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict:
    return make_certs(str(tmp_path_factory.mktemp("auth-certs")))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> dict:
    """Another CA and key: what the server does not trust."""
    return make_certs(str(tmp_path_factory.mktemp("other-certs")))


def signing_key(path: str):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(path, "rb") as file:
        return load_pem_private_key(file.read(), None)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwt(key_path: str, kid: str, team: str = TEAM, iat: object = None, alg: str = "ES256") -> str:
    """A provider token as client libraries build it (ES256 over header.claims, r || s)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    if iat is None:
        iat = int(time.time())
    signed = (b64(json.dumps({"alg": alg, "kid": kid}).encode()) + b"."
              + b64(json.dumps({"iss": team, "iat": iat}).encode()))
    r, s = decode_dss_signature(signing_key(key_path).sign(signed, ec.ECDSA(hashes.SHA256())))
    return (signed + b"." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode()


def expired_client_certificate(certs: dict, directory: str) -> tuple[str, str]:
    """A client certificate signed by the server's trusted CA whose validity ended yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    with open(f"{certs['dir']}/ca.pem", "rb") as file:
        ca = x509.load_pem_x509_certificate(file.read())
    ca_key = signing_key(f"{certs['dir']}/ca-key.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.USER_ID, TOPIC)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = f"{directory}/expired.pem", f"{directory}/expired-key.pem"
    with open(cert_path, "wb") as file:
        file.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cert_path, key_path


# -- servers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(certs):
    """--auth any with the key, the team, one topic, TLS and the client CA: 2 workers."""
    holder, tls_port = reserve_port()
    d = certs["dir"]
    srv, holders = launch("--keepalive", "0", "--auth", "any",
                          "--auth-key", f"{certs['kid']}={certs['p8']}", "--team-id", TEAM,
                          "--topics", TOPIC, "--tls-listen", f"127.0.0.1:{tls_port}",
                          "--tls-cert", f"{d}/server.pem", "--tls-key", f"{d}/server-key.pem",
                          "--tls-client-ca", f"{d}/ca.pem")
    srv.tls_port = tls_port
    yield srv
    srv.stop()
    for sock in [holder, *holders]:
        sock.close()


@pytest.fixture(scope="module")
def keyless():
    """--auth token with no key: a well-formed token is enough."""
    srv, holders = launch("--keepalive", "0", "--auth", "token", "--workers", "1")
    yield srv
    srv.stop()
    for sock in holders:
        sock.close()


@pytest.fixture(scope="module")
def cert_only(certs):
    """--auth cert: client certificates only, no token taken."""
    holder, tls_port = reserve_port()
    d = certs["dir"]
    srv, holders = launch("--keepalive", "0", "--auth", "cert", "--workers", "1",
                          "--tls-listen", f"127.0.0.1:{tls_port}", "--tls-cert", f"{d}/server.pem",
                          "--tls-key", f"{d}/server-key.pem", "--tls-client-ca", f"{d}/ca.pem")
    srv.tls_port = tls_port
    yield srv
    srv.stop()
    for sock in [holder, *holders]:
        sock.close()


def admin(server, method: str, body: dict | None = None):
    client = HTTPClient(server.host, server.admin_port)
    try:
        return client.request(method, "/admin/auth", json.dumps(body).encode() if body else b"")
    finally:
        client.close()


@pytest.fixture
def clean_admin(server):
    yield
    assert admin(server, "DELETE").status == 200


# -- clients --------------------------------------------------------------------------------------

def tls_socket(server, certs: dict, alpn: str, client: tuple[str, str] | None = None):
    context = ssl.create_default_context(cafile=f"{certs['dir']}/ca.pem")
    context.set_alpn_protocols([alpn])
    if client is not None:
        context.load_cert_chain(*client)
    raw = socket.create_connection(("127.0.0.1", server.tls_port), timeout=5)
    return context.wrap_socket(raw, server_hostname="localhost")


class H1(HTTPClient):
    """HTTP/1.1 keep-alive over a TLS socket."""

    def __init__(self, sock) -> None:  # noqa: super().__init__ would open TCP
        self.sock, self.collector, self.closed = sock, _ResponseCollector(), False

    def push(self, headers: dict) -> tuple[int, str]:
        response = self.request("POST", f"/3/device/{new_token()}", PAYLOAD, headers)
        return response.status, json.loads(response.body)["reason"] if response.body else ""


class H2(H2Client):
    """The ``h2`` library over a socket already open (TLS with ALPN h2, or TCP)."""

    def __init__(self, sock) -> None:  # noqa: super().__init__ would open TCP
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.ack_data, self.responses, self.events, self.terminated = True, {}, [], None
        self.flush()

    def push(self, headers: dict) -> tuple[int, str]:
        response = self.request("POST", f"/3/device/{new_token()}", PAYLOAD, headers)
        return response.status, json.loads(response.body)["reason"] if response.body else ""

    def max_streams(self) -> int:
        return self.conn.remote_settings.max_concurrent_streams


def sender(protocol: str, server, certs: dict, client: tuple[str, str] | None = None):
    if protocol == "h1":
        return H1(tls_socket(server, certs, "http/1.1", client))
    return H2(tls_socket(server, certs, "h2", client))


def bearer(token: str, topic: str | None = TOPIC) -> dict:
    return {"authorization": f"bearer {token}", **({"apns-topic": topic} if topic else {})}


# -- token auth -----------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_every_token_reason_over_tls(server, certs, other_certs, protocol):
    key, kid = certs["p8"], certs["kid"]
    conn = sender(protocol, server, certs)
    try:
        assert conn.push({"apns-topic": TOPIC}) == (403, "MissingProviderToken")
        invalid = [
            "junk",  # not three parts
            "a.b.c",  # three parts, not JSON
            jwt(key, kid, alg="HS256"),
            jwt(key, "UNKNOWNKID"),  # no such key
            jwt(other_certs["p8"], kid),  # signed by another key: the signature fails
            jwt(key, kid, team="OTHERTEAM1"),  # not --team-id
            jwt(key, kid, iat="soon"),
        ]
        for token in invalid:
            assert conn.push(bearer(token)) == (403, "InvalidProviderToken"), token
        assert conn.push(bearer(jwt(key, kid, iat=int(time.time()) - 3700))) == (
            403, "ExpiredProviderToken")
        token = jwt(key, kid, iat=int(time.time()) - 60)
        assert conn.push(bearer(token)) == (200, "")
        assert conn.push(bearer(token)) == (200, "")  # the same token: verified once
        assert conn.push({"apns-topic": TOPIC}) == (403, "MissingProviderToken")
        assert conn.push(bearer(token, topic=None)) == (400, "MissingTopic")
        assert conn.push(bearer(token, topic="com.example.other")) == (400, "TopicDisallowed")
        assert conn.push(bearer(token, topic="com.example auth!")) == (400, "BadTopic")
        for suffix in (".voip", ".complication", ".pushkit.fileprovider"):
            assert conn.push(bearer(token, topic=TOPIC + suffix)) == (200, ""), suffix
        assert conn.push(bearer(token, topic=TOPIC + ".other")) == (400, "TopicDisallowed")
        # a new token within 20 minutes of the last: refused, and the last one still holds
        assert conn.push(bearer(jwt(key, kid))) == (429, "TooManyProviderTokenUpdates")
        assert conn.push(bearer(token)) == (200, "")
    finally:
        conn.close()


@pytest.mark.parametrize("iat", [int(time.time()), time.time(), str(int(time.time()))],
                         ids=["int", "float", "string"])
def test_iat_as_integer_float_or_numeric_string(server, certs, iat):
    conn = sender("h2", server, certs)
    try:
        assert conn.push(bearer(jwt(certs["p8"], certs["kid"], iat=iat))) == (200, "")
    finally:
        conn.close()


def test_a_connection_keeps_one_team(keyless, certs):
    """Apple allows one team per connection (pushy#399): the first token's team is pinned,
    even with no --team-id."""
    conn = H1(socket.create_connection((keyless.host, keyless.port), timeout=5))  # over TCP too
    try:
        assert conn.push(bearer(jwt(certs["p8"], certs["kid"], team="TEAMONE"))) == (200, "")
        other_team = bearer(jwt(certs["p8"], certs["kid"], team="TEAMTWO"))
        assert conn.push(other_team) == (403, "InvalidProviderToken")
    finally:
        conn.close()
    again = H1(socket.create_connection((keyless.host, keyless.port), timeout=5))
    try:
        assert again.push(other_team) == (200, "")  # on a connection of its own
    finally:
        again.close()


def test_token_connection_gets_one_stream_until_its_first_valid_token(server, certs):
    conn = H2(tls_socket(server, certs, "h2"))
    try:
        conn.pump(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged)
                              for e in conn.events))
        assert conn.max_streams() == 1
        assert conn.push(bearer("junk")) == (403, "InvalidProviderToken")
        assert conn.max_streams() == 1
        accepted = bearer(jwt(certs["p8"], certs["kid"]))
        assert conn.push(accepted) == (200, "")
        conn.pump(lambda: conn.max_streams() == 1000)  # a new SETTINGS, as Apple
        streams = [conn.start("POST", f"/3/device/{new_token()}", accepted, PAYLOAD)
                   for _ in range(3)]
        assert [conn.wait(s).status for s in streams] == [200] * 3  # in flight at once
    finally:
        conn.close()


def test_without_a_key_a_well_formed_token_is_accepted(keyless, other_certs):
    conn = H2(socket.create_connection((keyless.host, keyless.port), timeout=5))  # h2c
    try:
        conn.pump(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged)
                              for e in conn.events))
        assert conn.max_streams() == 1
        assert conn.push(bearer("junk", topic="any.topic")) == (403, "InvalidProviderToken")
        token = jwt(other_certs["p8"], "ANYKEYID12", team="ANYTEAM")
        assert conn.push(bearer(token, topic="any.topic")) == (200, "")
        assert conn.push(bearer(token, topic=None)) == (400, "MissingTopic")
        conn.pump(lambda: conn.max_streams() == 1000)
    finally:
        conn.close()


# -- the clock: one hour, 20 minutes ----------------------------------------------------------------

def test_the_20_minute_and_one_hour_rules_with_the_admin_clock(server, certs, clean_admin):
    key, kid = certs["p8"], certs["kid"]
    conn = sender("h2", server, certs)
    try:
        first = jwt(key, kid)
        assert conn.push(bearer(first)) == (200, "")
        assert conn.push(bearer(jwt(key, kid, iat=int(time.time()) + 1))) == (
            429, "TooManyProviderTokenUpdates")
        assert admin(server, "POST", {"clock_offset": 21 * 60}).status == 200  # 21 minutes on
        assert conn.push(bearer(first)) == (200, "")  # 21 minutes old: still valid
        second = jwt(key, kid, iat=int(time.time()) + 21 * 60)
        assert conn.push(bearer(second)) == (200, "")  # 21 minutes after the first: allowed
        assert admin(server, "POST", {"clock_offset": 21 * 60 + 3601}).status == 200
        assert conn.push(bearer(second)) == (403, "ExpiredProviderToken")  # an hour old now
        fresh = jwt(key, kid, iat=int(time.time()) + 21 * 60 + 3601)
        assert conn.push(bearer(fresh)) == (200, "")  # the refresh a client does then
    finally:
        conn.close()


# -- certificates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_a_client_certificate_from_rawsse_certs(server, certs, protocol):
    client = (f"{certs['dir']}/client.pem", f"{certs['dir']}/client-key.pem")
    conn = sender(protocol, server, certs, client)
    try:
        if protocol == "h2":
            conn.pump(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged)
                                  for e in conn.events))
            assert conn.max_streams() == 1000  # a certificate connection: Apple's full limit
        assert conn.push({}) == (200, "")  # no apns-topic: the certificate's topic
        assert conn.push({"apns-topic": TOPIC}) == (200, "")
        assert conn.push({"apns-topic": TOPIC + ".voip"}) == (200, "")
        assert conn.push({"apns-topic": "com.example.other"}) == (400, "TopicDisallowed")
        assert conn.push({"apns-topic": "bad topic"}) == (400, "BadTopic")
    finally:
        conn.close()


def test_auth_cert_takes_certificates_only(cert_only, certs):
    token = bearer(jwt(certs["p8"], certs["kid"]))
    without = [sender("h1", cert_only, certs),  # TLS without a certificate, and plain TCP
               H1(socket.create_connection((cert_only.host, cert_only.port), timeout=5))]
    try:
        assert [conn.push(token) for conn in without] == [(403, "MissingProviderToken")] * 2
    finally:
        for conn in without:
            conn.close()
    client = (f"{certs['dir']}/client.pem", f"{certs['dir']}/client-key.pem")
    conn = sender("h1", cert_only, certs, client)
    try:
        assert conn.push({}) == (200, "")
    finally:
        conn.close()


def test_an_expired_or_untrusted_certificate_fails_the_handshake(server, certs, other_certs,
                                                                   tmp_path):
    expired = expired_client_certificate(certs, str(tmp_path))
    untrusted = (f"{other_certs['dir']}/client.pem", f"{other_certs['dir']}/client-key.pem")
    before = handshakes_failed(server)
    for client in (expired, untrusted):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            # TLS 1.3 checks the client's certificate after the client's handshake ends: the
            # alert comes with the first read.
            conn = H1(tls_socket(server, certs, "http/1.1", client))
            try:
                conn.push({})
            finally:
                conn.close()
    assert wait_for(lambda: handshakes_failed(server) == before + 2)


def handshakes_failed(server) -> int:
    return get_json(server.host, server.admin_port, "/stats")["node"]["disconnects"].get(
        "tls_handshake", 0)


# -- revocation --------------------------------------------------------------------------------------

def fingerprint(path: str) -> str:
    with open(path) as file:
        der = ssl.PEM_cert_to_DER_cert(file.read())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 64, 2))  # as openssl prints it


def test_revoking_a_key_or_a_certificate_at_run_time(server, certs, clean_admin):
    client = (f"{certs['dir']}/client.pem", f"{certs['dir']}/client-key.pem")
    token = jwt(certs["p8"], certs["kid"])
    with_cert = sender("h2", server, certs, client)
    tcp = [H1(socket.create_connection((server.host, server.port), timeout=5)) for _ in range(4)]
    try:
        assert with_cert.push({}) == (200, "")
        for conn in tcp:  # connections spread over both workers
            assert conn.push(bearer(token)) == (200, "")
        answer = admin(server, "POST", {"revoke_key": certs["kid"]})
        assert answer.status == 200 and answer.json()["revoked_keys"] == [certs["kid"]]
        for conn in tcp:  # every worker holds it before the answer
            assert conn.push(bearer(token)) == (403, "InvalidProviderToken")
        assert with_cert.push({}) == (200, "")
        answer = admin(server, "POST", {"revoke_certificate": fingerprint(client[0])})
        assert answer.status == 200 and len(answer.json()["revoked_certificates"]) == 1
        assert with_cert.push({}) == (403, "InvalidProviderToken")
        fresh = H1(socket.create_connection((server.host, server.port), timeout=5))
        tcp.append(fresh)
        assert fresh.push(bearer(jwt(certs["p8"], certs["kid"]))) == (403, "InvalidProviderToken")
        assert admin(server, "DELETE").status == 200
        assert with_cert.push({}) == (200, "")
        for conn in tcp:
            assert conn.push(bearer(token)) == (200, "")
        bad = admin(server, "POST", {"revoke_certificate": "not-a-fingerprint"})
        assert bad.status == 400 and "SHA-256 fingerprint" in bad.json()["detail"]
    finally:
        with_cert.close()
        for conn in tcp:
            conn.close()


def test_counters_per_reason_in_stats_and_metrics(server, certs):
    conn = H1(socket.create_connection((server.host, server.port), timeout=5))
    try:
        assert conn.push({"apns-topic": TOPIC}) == (403, "MissingProviderToken")
    finally:
        conn.close()
    node = get_json(server.host, server.admin_port, "/stats")["node"]
    assert node["auth_refusals"]["MissingProviderToken"] >= 1
    assert node["auth_refusals"]["InvalidProviderToken"] >= 1
    assert node["auth"]["tokens_verified"] >= 1 and node["auth"]["tokens_accepted"] >= 1
    metrics = HTTPClient(server.host, server.admin_port)
    try:
        text = metrics.request("GET", "/metrics").body.decode()
    finally:
        metrics.close()
    assert 'rawsse_auth_refusals_total{reason="MissingProviderToken",worker="' in text
    assert "rawsse_auth_tokens_verified_total{" in text


# -- flags ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--auth", "cert"], "--auth: cert needs --tls-listen and --tls-client-ca FILE"),
    (["--auth", "token", "--auth-key", "K=/nonexistent.p8"], "--auth-key: cannot read"),
    (["--topics", "com.example"], "--topics: only means something with --auth token"),
])
def test_a_bad_auth_flag_is_one_line_naming_it(flags, message):
    result = rawsse("serve", "--listen", "127.0.0.1:0", *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rawsse serve: {message}"), result.stderr


# -- hostile tokens -----------------------------------------------------------------------------------

def test_any_bytes_in_authorization_are_a_token_or_malformed(certs):
    """In-process: every mutation of a real token, a header of deeply nested JSON (a
    RecursionError inside json) and an iat beyond a double is parsed or refused as Malformed,
    and a parsed one's signature checks to True or False: never another exception."""
    import random

    from rawsse.apns import jwt as parser

    nested = b64(b"[" * 5000)
    good = b"bearer " + jwt(certs["p8"], certs["kid"]).encode()
    huge_iat = jwt(certs["p8"], certs["kid"], iat=10 ** 400).encode()  # beyond a double
    samples = [b"bearer " + nested + b"." + nested + b"." + nested, b"bearer ..", b"bearer",
               b"bearer " + huge_iat]
    rng = random.Random(11)
    for _ in range(3000):
        value = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            value[rng.randrange(len(value))] = rng.randrange(256)
        samples.append(bytes(value))
    public_key = signing_key(certs["p8"]).public_key()
    verified = 0
    for value in samples:
        try:
            token = parser.parse(value)
        except parser.Malformed:
            continue
        verified += parser.verify(token, public_key)  # a bool, whatever the signature bytes
    assert verified >= 1  # the mutations that only touched bytes outside what is signed
