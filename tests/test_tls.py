"""TLS on ``--tls-listen`` (real sockets, real clients) and ``rawsse certs``: curl over https with
``--cacert``, the ``h2`` library with ALPN h2, a client with no ALPN sending the preface, a push
over TLS reaching an SSE device on ``--listen`` through the other worker, a stalled handshake
that blocks nobody, a bad client hello closed quietly, nghttp2's tools and Node with ``ca``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import uuid

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import ROOT, launch, reserve_port
from rawsse.node.routing import owner_of
from test_h2_server import H2Client
from test_push_api import new_token
from wire import (HTTPClient, SSEReader, get_json, ports_on_one_worker, reset_close,
                  serving_worker, wait_for)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def rawsse(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rawsse", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (.ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("certs"))
    result = rawsse("certs", directory, "--name", "push.test", "--topic", "com.example.tls")
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="module")
def tls(certs):
    """One server for the module: 2 workers, --listen and --tls-listen, a 1 s handshake bound."""
    holder, tls_port = reserve_port()
    srv, holders = launch("--keepalive", "0", "--header-timeout", "1",
                          "--tls-listen", f"127.0.0.1:{tls_port}",
                          "--tls-cert", f"{certs}/server.pem", "--tls-key", f"{certs}/server-key.pem")
    srv.tls_port = tls_port
    srv.tls_url = f"https://127.0.0.1:{tls_port}"
    yield srv
    srv.stop()
    for sock in [holder, *holders]:
        sock.close()


def client_context(certs: str, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=f"{certs}/ca.pem")
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def tls_socket(tls, certs: str, alpn: list[str] | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", tls.tls_port), timeout=5)
    return client_context(certs, alpn).wrap_socket(raw, server_hostname="localhost")


class TlsH2Client(H2Client):
    """The ``h2`` library over an ``ssl`` socket that negotiated ALPN h2."""

    def __init__(self, tls, certs: str) -> None:  # noqa: super().__init__ would open TCP
        self.sock = tls_socket(tls, certs, ["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.ack_data, self.responses, self.events, self.terminated = True, {}, [], None
        self.flush()


def disconnects(server) -> dict:
    return get_json(server.host, server.admin_port, "/stats")["node"]["disconnects"]


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("curl"), "-s", "-i", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=30)


# -- rawsse certs ---------------------------------------------------------------------------------

def test_certs_writes_a_ca_server_client_and_p8_key_private_files_0600(certs):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.x509.oid import NameOID

    names = sorted(os.listdir(certs))
    p8 = [n for n in names if n.startswith("AuthKey_") and n.endswith(".p8")]
    assert len(p8) == 1 and len(p8[0]) == len("AuthKey_0123456789.p8")
    for name in ("ca-key.pem", "server-key.pem", "client-key.pem", p8[0]):
        assert stat.S_IMODE(os.stat(f"{certs}/{name}").st_mode) == 0o600, name
    with open(f"{certs}/{p8[0]}", "rb") as file:
        pem = file.read()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, as Apple's .p8
    key = load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"  # ES256
    with open(f"{certs}/server.pem", "rb") as file:
        server = x509.load_pem_x509_certificate(file.read())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "localhost", "api.push.apple.com", "api.sandbox.push.apple.com", "push.test"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    with open(f"{certs}/client.pem", "rb") as file:
        client = x509.load_pem_x509_certificate(file.read())
    assert client.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "com.example.tls"


def test_certs_refuses_to_overwrite_and_says_how_to_trust_the_ca(certs, tmp_path):
    again = rawsse("certs", certs)
    assert again.returncode == 2 and "exists (--force overwrites)" in again.stderr
    fresh = rawsse("certs", str(tmp_path / "new"))
    assert fresh.returncode == 0, fresh.stderr
    for hint in ("--cacert", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "create_default_context",
                 "REQUESTS_CA_BUNDLE"):
        assert hint in fresh.stdout, hint


# -- start checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, flag", [
    (["--tls-cert", "{d}/missing.pem", "--tls-key", "{d}/server-key.pem"], "--tls-cert"),
    (["--tls-cert", "{d}/server.pem", "--tls-key", "{d}/missing.pem"], "--tls-key"),
    (["--tls-cert", "{d}/server-key.pem", "--tls-key", "{d}/server-key.pem"], "--tls-cert"),
    (["--tls-cert", "{d}/server.pem", "--tls-key", "{d}/client-key.pem"], "--tls-key"),
    (["--tls-key", "{d}/server-key.pem"], "--tls-cert"),
])
def test_a_bad_certificate_or_key_is_one_line_naming_the_flag(certs, flags, flag):
    result = rawsse("serve", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0",
                    *[f.format(d=certs) for f in flags])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rawsse serve: {flag}: "), result.stderr


def test_tls_flags_without_tls_listen_are_refused(certs):
    result = rawsse("serve", "--listen", "127.0.0.1:0", "--tls-cert", f"{certs}/server.pem")
    assert result.returncode == 2
    assert "--tls-cert: only means something with --tls-listen" in result.stderr


def test_a_tls_listen_port_already_served_or_overlapping_is_refused(certs):
    pair = ["--tls-cert", f"{certs}/server.pem", "--tls-key", f"{certs}/server-key.pem"]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = rawsse("serve", "--listen", "127.0.0.1:0", "--tls-listen", f"127.0.0.1:{port}",
                      *pair)
    assert busy.returncode == 3 and "--tls-listen" in busy.stderr, busy.stderr
    same = rawsse("serve", "--listen", "127.0.0.1:18999", "--tls-listen", "0.0.0.0:18999", *pair)
    assert same.returncode == 2
    assert "--tls-listen: 0.0.0.0:18999 overlaps --listen" in same.stderr, same.stderr


# -- clients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, status_line", [("--http2", "HTTP/2 200"),
                                                   ("--http1.1", "HTTP/1.1 200")])
def test_curl_https_with_cacert(tls, certs, version, status_line):
    result = curl("--cacert", f"{certs}/ca.pem", version, "-H", "apns-topic: com.example",
                  "-d", '{"aps":{}}', f"{tls.tls_url}/3/device/{new_token()}")
    assert result.stdout.startswith(status_line), result.stdout + result.stderr
    assert "apns-id: " in result.stdout.lower()


def test_h2_library_with_alpn_h2_gets_apple_answers(tls, certs):
    client = TlsH2Client(tls, certs)
    try:
        apns_id = str(uuid.uuid4())
        ok = client.wait(client.start("POST", f"/3/device/{new_token()}", {"apns-id": apns_id},
                                      b'{"aps":{}}'))
        assert ok.status == 200 and ok.headers["apns-id"] == apns_id
        bad = client.wait(client.start("POST", "/3/device/zz", body=b"{}"))
        assert bad.status == 400 and json.loads(bad.body) == {"reason": "BadDeviceToken"}
    finally:
        client.sock.close()


def test_no_alpn_and_the_preface_is_http2(tls, certs):
    """aioapns and Pushy set no ALPN and send the preface: the decrypted bytes are sniffed."""
    sock = tls_socket(tls, certs, None)
    try:
        assert sock.selected_alpn_protocol() is None
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
        head = sock.recv(9)
        assert len(head) == 9 and head[3] == 0x4 and head[5:9] == b"\0\0\0\0", head  # SETTINGS
    finally:
        sock.close()


def test_alpn_h2_without_the_preface_is_closed(tls, certs):
    sock = tls_socket(tls, certs, ["h2"])
    try:
        sock.sendall(b"POST /3/device/00 HTTP/1.1\r\n\r\n")
        assert sock.recv(100) == b""
    finally:
        sock.close()


def test_a_device_stream_over_tls_is_sent_to_listen(tls, certs):
    result = curl("--cacert", f"{certs}/ca.pem", "--http1.1",
                  f"{tls.tls_url}/events?token={new_token()}")
    assert result.stdout.startswith("HTTP/1.1 421"), result.stdout
    assert "--listen" in json.loads(result.stdout.split("\n\n", 1)[1])["detail"]


def test_pushes_over_tls_reach_sse_devices_through_the_other_worker(tls, certs, readers):
    # Four tokens owned by each worker: whichever worker takes the TLS connection, four of its
    # pushes cross the mesh.
    by_owner: dict[int, list[str]] = {0: [], 1: []}
    while min(len(owned) for owned in by_owner.values()) < 4:
        token = new_token()
        by_owner[owner_of(bytes.fromhex(token), 2)].append(token)
    tokens = by_owner[0][:4] + by_owner[1][:4]
    readers += [SSEReader(tls.host, tls.port, t) for t in tokens]
    before = get_json(tls.host, tls.admin_port, "/stats")["node"]["forwarded"]
    sock = tls_socket(tls, certs, ["http/1.1"])
    try:
        ids = {t: str(uuid.uuid4()) for t in tokens}
        sock.sendall(b"".join(
            f"POST /3/device/{t} HTTP/1.1\r\nHost: x\r\napns-id: {ids[t]}\r\n"
            f"Content-Length: 10\r\n\r\n{{\"aps\":{{}}}}".encode() for t in tokens))
        answers = b""
        deadline = time.monotonic() + 5
        while answers.count(b"HTTP/1.1 200") < len(tokens) and time.monotonic() < deadline:
            answers += sock.recv(65536)
        assert answers.count(b"HTTP/1.1 200") == len(tokens), answers
    finally:
        sock.close()
    for reader, t in zip(readers, tokens):
        event = reader.next_event(timeout=5)
        assert event is not None and event.id == ids[t], (t, event)
    assert get_json(tls.host, tls.admin_port, "/stats")["node"]["forwarded"] >= before + 4


def test_a_tls_sender_stays_on_its_worker_and_is_not_counted(tls, certs):
    """Its session lives in the worker's ssl object: a TLS sender's connection is not handed to
    the other worker (rawsse/node/balance.py), even from the worker holding more senders."""
    context = client_context(certs, ["http/1.1"])

    def wrap(sock: socket.socket) -> ssl.SSLSocket:
        return context.wrap_socket(sock, server_hostname="localhost")

    worker, [plain_port] = ports_on_one_worker(tls.host, tls.port, 1)
    _, [tls_port] = ports_on_one_worker(tls.host, tls.tls_port, 1, wrap, worker=worker)
    before = get_json(tls.host, tls.admin_port, "/stats")
    plain = HTTPClient(tls.host, tls.port, source=("127.0.0.1", plain_port))
    sock = wrap(socket.create_connection((tls.host, tls.tls_port), timeout=5,
                                         source_address=("127.0.0.1", tls_port)))
    try:
        assert plain.request("POST", f"/3/device/{new_token()}", b"{}").status == 200
        sock.sendall(f"POST /3/device/{new_token()} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: 2\r\n\r\n{{}}".encode())  # from the worker holding 1
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert serving_worker(sock) == worker  # still served where it was accepted
        doc = get_json(tls.host, tls.admin_port, "/stats")
        assert doc["node"]["senders_handed_over"] == before["node"]["senders_handed_over"]
        held = [w["sender_connections"] - b["sender_connections"]
                for w, b in zip(doc["workers"], before["workers"])]
        assert sorted(held) == [0, 1], held  # the plain one only
    finally:
        plain.close()
        reset_close(sock)


def test_a_stalled_handshake_blocks_no_one_and_is_closed_after_header_timeout(tls, certs):
    before = disconnects(tls).get("tls_handshake", 0)
    stalled = [socket.create_connection(("127.0.0.1", tls.tls_port)) for _ in range(4)]
    try:
        stalled[0].sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a client hello, no more
        started = time.monotonic()
        for _ in range(3):
            result = curl("--cacert", f"{certs}/ca.pem", "--http2", "-d", '{"aps":{}}',
                          f"{tls.tls_url}/3/device/{new_token()}")
            assert result.stdout.startswith("HTTP/2 200"), result.stdout + result.stderr
        assert time.monotonic() - started < 3
        for sock in stalled:  # --header-timeout 1: closed by the next sweeps
            sock.settimeout(4)
            assert sock.recv(10) == b""
    finally:
        for sock in stalled:
            sock.close()
    assert wait_for(lambda: disconnects(tls).get("tls_handshake", 0) >= before + 4)


@pytest.mark.parametrize("hello", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
    b"\x16\x03\x01\x00\x10" + b"\xff" * 16,  # a handshake record that is not a client hello
    b"\x16\x03\x00\x00\x30\x01\x00\x00\x2c\x03\x00" + b"\x00" * 42,  # SSL 3.0, below TLS 1.2
])
def test_a_bad_client_hello_is_closed_without_a_traceback(tls, hello):
    before = disconnects(tls).get("tls_handshake", 0)
    with socket.create_connection(("127.0.0.1", tls.tls_port), timeout=5) as sock:
        sock.sendall(hello)
        data = sock.recv(100)
        assert data == b"" or data[:1] == b"\x15", data  # closed, at most after a TLS alert
    assert wait_for(lambda: disconnects(tls).get("tls_handshake", 0) == before + 1)
    assert "Traceback" not in tls.output()


def test_nghttp_and_h2load_over_tls(tls, tmp_path):
    nghttp, h2load = need("nghttp"), need("h2load")
    body = tmp_path / "push.json"
    body.write_text('{"aps":{}}')
    url = f"{tls.tls_url}/3/device/{new_token()}"
    one = subprocess.run([nghttp, "-v", "-d", str(body), url], capture_output=True, text=True,
                         timeout=30)
    assert ":status: 200" in one.stdout and "negotiated protocol: h2" in one.stdout, one.stdout + one.stderr
    many = subprocess.run([h2load, "-c", "2", "-m", "50", "-n", "1000", "-d", str(body), url],
                          capture_output=True, text=True, timeout=60)
    assert "status codes: 1000 2xx" in many.stdout, many.stdout + many.stderr
    assert "Application protocol: h2" in many.stdout


NODE_CLIENT = r"""
const fs = require('fs'), https = require('https'), http2 = require('http2');
const [url, token, caFile] = process.argv.slice(2);
const ca = fs.readFileSync(caFile), body = JSON.stringify({aps: {alert: 'hi'}});
const results = {};
const session = http2.connect(url, {ca});
session.on('error', (e) => { console.error(e); process.exit(1); });
const req = session.request({':method': 'POST', ':path': '/3/device/' + token});
req.on('response', (h) => { results.http2 = [h[':status'], !!h['apns-id']]; });
req.on('data', () => {});
req.on('end', () => {
  session.close();
  const r = https.request(url + '/3/device/' + token, {method: 'POST', ca}, (res) => {
    results.https = [res.statusCode, !!res.headers['apns-id']];
    res.resume();
    res.on('end', () => console.log(JSON.stringify(results)));
  });
  r.on('error', (e) => { console.error(e); process.exit(1); });
  r.end(body);
});
req.end(body);
"""


def test_node_https_and_http2_with_ca(tls, certs, tmp_path):
    node = need("node")
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    result = subprocess.run([node, str(script), tls.tls_url.replace("127.0.0.1", "localhost"),
                             new_token(), f"{certs}/ca.pem"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"http2": [200, True], "https": [200, True]}


def test_answers_a_slow_reader_holds_back_all_arrive_in_order(tls, certs):
    """A client that reads late, with a tiny receive buffer: the server's writes go out in
    pieces, each piece of ciphertext sent whole before the next (SSL_write's retry rule), and
    the last piece is not forgotten once the protocol's own buffer is empty."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", tls.tls_port))
    sock = client_context(certs, ["http/1.1"]).wrap_socket(raw, server_hostname="localhost")
    sock.setblocking(False)
    # ~300 KB of requests, read in 64 KB pulls; their ~200 KB of answers stay below the
    # connection's 256 KB output cap, so the server never pauses reading with a request half
    # parsed (the module's 1 s --header-timeout would then answer it 408).
    count, token = 2000, new_token()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    requests = memoryview(b"".join(
        f"POST /3/device/{token} HTTP/1.1\r\nHost: x\r\napns-id: {i}\r\n"
        f"Content-Length: 10\r\n\r\n{{\"aps\":{{}}}}".encode() for i in ids))
    answers = bytearray()
    reading_from = time.monotonic() + 0.7  # until then the server answers into a full socket
    deadline = time.monotonic() + 15
    try:
        while answers.count(b"HTTP/1.1 200") < count and time.monotonic() < deadline:
            try:  # sending and reading apart: a full socket either way must not stop the other
                if requests:
                    requests = requests[sock.send(requests[:16384]):]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.002)
            try:
                if time.monotonic() > reading_from:
                    answers += sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                time.sleep(0.002)
    finally:
        sock.close()
    echoed = [line.split(b": ")[1].decode() for line in bytes(answers).split(b"\r\n")
              if line.startswith(b"apns-id: ")]
    assert echoed == ids


def test_tls_transport_resends_nothing_and_loses_nothing_on_a_full_socket(certs):
    """``TlsTransport`` over a socketpair whose send buffer is tiny, written the way both
    protocols write (a buffer, ``del out[:written]``, again on EPOLLOUT): 1 MB arrives intact
    and in order, including the last piece of ciphertext the socket did not take at first."""
    from rawsse.server.tls import TlsTransport, server_context

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    theirs.setblocking(False)
    transport = TlsTransport(ours.fileno(), server_context(f"{certs}/server.pem",
                                                          f"{certs}/server-key.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(certs, ["h2"]).wrap_bio(incoming, outgoing, server_hostname="localhost")

    def client_io() -> None:
        if outgoing.pending:
            theirs.sendall(outgoing.read())
        try:
            incoming.write(theirs.recv(65536))
        except BlockingIOError:
            pass

    try:
        for _ in range(50):  # the handshake, both ends in this thread
            try:
                client.do_handshake()
                handshaken = True
            except ssl.SSLWantReadError:
                handshaken = False
            client_io()
            try:
                done = transport.handshake()
            except ssl.SSLWantReadError:
                done = False
            client_io()
            if handshaken and done:
                break
        assert transport.alpn() == "h2"
        sent = os.urandom(1 << 20)
        out, received = bytearray(sent), bytearray()
        deadline = time.monotonic() + 10
        while len(received) < len(sent) and time.monotonic() < deadline:
            if out:
                try:
                    del out[:transport.write(out)]
                except BlockingIOError:
                    pass
            client_io()
            try:
                while True:
                    received += client.read(65536)
            except ssl.SSLWantReadError:
                pass
        assert len(received) == len(sent) and received == sent
    finally:
        ours.close()
        theirs.close()


def test_drain_over_tls_sends_goaway_answers_its_streams_then_close_notify(start_server, certs):
    """SIGTERM with HTTP/2 streams in flight over TLS: GOAWAY Shutdown, each stream answered,
    then the TLS session ends cleanly (close_notify, which the ssl module reads as EOF)."""
    import hpack

    from rawsse.h2 import frames as f
    from test_h2_hostile import RawH2, frame, goaway_of

    holder, tls_port = reserve_port()
    srv = start_server("--workers", "1", "--response-delay", "uniform:500ms-500ms",
                       "--drain-seconds", "0.5", "--tls-listen", f"127.0.0.1:{tls_port}",
                       "--tls-cert", f"{certs}/server.pem", "--tls-key", f"{certs}/server-key.pem")
    srv.tls_port = tls_port
    conn = RawH2.__new__(RawH2)  # its frame reader, over TLS
    conn.sock, conn.buffer = tls_socket(srv, certs, ["h2"]), b""
    try:
        conn.send(f.PREFACE + frame(f.SETTINGS, 0, 0))
        encoder = hpack.Encoder()
        ids = list(range(1, 20, 2))
        conn.send(*(frame(f.HEADERS, f.END_HEADERS, i, encoder.encode(
            [(":method", "POST"), (":scheme", "https"), (":path", f"/3/device/{new_token()}")]))
            + frame(f.DATA, f.END_STREAM, i, b"{}") for i in ids))
        time.sleep(0.2)  # all read by the server, answers held by --response-delay
        srv.signal(signal.SIGTERM)
        frames_ = conn.frames(timeout=5)
        assert goaway_of(frames_) == (ids[-1], f.NO_ERROR, {"reason": "Shutdown"})
        answered = {s: dict(hpack.Decoder().decode(p))[":status"]
                    for t, _, s, p in frames_ if t == f.HEADERS}
        assert answered == {i: "200" for i in ids}
    finally:
        conn.close()
        holder.close()
    assert "Traceback" not in srv.output()


def test_tls_1_2_is_served(tls, certs):
    context = client_context(certs, ["http/1.1"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection(("127.0.0.1", tls.tls_port), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert sock.version() == "TLSv1.2"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def served_certificate(port: int) -> bytes:
    """The DER certificate the listener on ``port`` presents (not verified: compared)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as sock:
            return sock.getpeercert(binary_form=True)


def certificate_in(path: str) -> bytes:
    with open(path) as file:
        return ssl.PEM_cert_to_DER_cert(file.read())


def test_a_reload_serves_a_renewed_certificate_and_refuses_a_bad_one(start_server, tmp_path):
    """``systemctl reload`` (SIGHUP) is how a renewed certificate is taken: the master checks
    the files as at start, then each new worker loads them. A bad pair refuses the reload with
    one line, and the workers serving the old certificate stay."""
    first, second, serving = (str(tmp_path / name) for name in ("first", "second", "serving"))
    for directory in (first, second):
        assert rawsse("certs", directory, "--name", "push.test").returncode == 0
    shutil.copytree(first, serving)
    holder, tls_port = reserve_port()
    try:
        srv = start_server("--workers", "1", "--tls-listen", f"127.0.0.1:{tls_port}",
                           "--tls-cert", f"{serving}/server.pem",
                           "--tls-key", f"{serving}/server-key.pem")
    finally:
        holder.close()
    was = served_certificate(tls_port)
    assert was == certificate_in(f"{first}/server.pem")
    pids = [w["pid"] for w in get_json(srv.host, srv.admin_port, "/stats")["workers"]]

    shutil.copy(f"{second}/server.pem", f"{serving}/server.pem")  # the key no longer matches
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP refused" in srv.output(), timeout=10)
    assert "--tls-key" in srv.output().split("SIGHUP refused", 1)[1].splitlines()[0]
    assert [w["pid"] for w in get_json(srv.host, srv.admin_port, "/stats")["workers"]] == pids
    assert served_certificate(tls_port) == was

    shutil.copy(f"{second}/server-key.pem", f"{serving}/server-key.pem")
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: "rolling restart finished" in srv.output(), timeout=20)
    assert served_certificate(tls_port) == certificate_in(f"{second}/server.pem")
