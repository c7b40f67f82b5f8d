"""``rawsse push --http2`` against a real ``rawsse serve``: every push delivered once, the stream
limit taken from the server's SETTINGS, statuses by reason, a server killed or draining mid-run
(GOAWAY: nothing counted twice), TLS with ALPN h2; and the request HPACK encoder decoded by the
``hpack`` library."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
from typing import Any, Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from conftest import launch
from loadtools import ENV, Devices, rawsse, run_push, wait_counter, wait_streams
from rawsse.load.h2request import INDEXED, LITERAL, PRIME, H2RequestEncoder
from rawsse.load.loadgen import fleet_token
from wire import wait_for

RUN_WAIT = 20.0


@pytest.fixture(scope="module")
def h2_server() -> Iterator[Any]:
    server, holders = launch("--keepalive", "0", "--h2-max-streams", "10")
    yield server
    server.stop()
    for holder in holders:
        holder.close()


def accounted(report: dict[str, Any]) -> int:
    """Pushes with an outcome: every status, every push lost or reset (connect errors are not
    pushes); a push counted twice shows here."""
    return sum(report["statuses"].values()) + sum(
        n for kind, n in report["errors"].items() if kind.startswith(("lost_", "reset_")))


# -- the request encoder -------------------------------------------------------------------------

@pytest.mark.parametrize("headers", ["fleet", "none"])
def test_request_blocks_decode_with_the_hpack_library(headers: str) -> None:
    """The first block of a connection puts the constant fields in the table, later ones index
    them; a table too small for them gets literals: the same fields every time."""
    args = argparse.Namespace(headers=headers, no_stamp=False, expiration=0.0, broadcast=False,
                              prefix=None, payload='{"mdm":"pushmagic<serial>"}')
    encoder = H2RequestEncoder(args, "127.0.0.1:8378", "/base", "https")
    token = "ab" * 100  # a path over 127 bytes: a multi-byte length (RFC 7541 §5.1)
    decoder = hpack.Decoder()
    blocks = [encoder.encode(token.encode(), b"SERIAL", 1.7e9, table)
              for table in (PRIME, INDEXED, INDEXED, LITERAL)]
    for block, body in blocks:
        fields = decoder.decode(block)
        assert fields[:5] == [(":method", "POST"), (":scheme", "https"),
                              (":authority", "127.0.0.1:8378"),
                              (":path", f"/base/3/device/{token}"),
                              ("content-length", str(len(body)))]
        assert body == b'{"mdm":"pushmagicSERIAL"}'
        rest = dict(fields[5:])
        assert rest.pop("apns-expiration") == "0" and len(rest.pop("apns-id")) == 36
        assert rest == ({"content-type": "application/json", "user-agent": "Go-http-client/2.0",
                         "accept-encoding": "gzip"} if headers == "fleet" else {})
    assert len(blocks[1][0]) < len(blocks[0][0]) - 20 * (headers == "fleet")
    broadcast, _ = encoder.encode(None, b"", 1.7e9, INDEXED)
    assert (":path", "/base/broadcast") in decoder.decode(broadcast)


# -- runs against the server ---------------------------------------------------------------------

def test_pushes_reach_connected_devices_exactly_once(h2_server, tmp_path) -> None:
    devices = Devices(h2_server.url, tmp_path, "--ramp", "0", "--expect-events", "200", count=20,
                      duration=RUN_WAIT)
    try:
        assert wait_streams(h2_server.admin_url, 20) == 20
        push = run_push(h2_server.url, tmp_path, "--http2", "--tokens", "fleet:0-19",
                        "--count", "200", "--senders", "2", "--streams", "10")
        report = devices.wait()
    finally:
        devices.kill()
    assert push["statuses"] == {"200": 200} and push["errors"] == {}
    assert report["events"] == 200 and report["duplicates"] == 0


def test_streams_are_capped_by_the_servers_settings(h2_server, tmp_path) -> None:
    """Asked for 100 streams, the server allows 10: none is refused, all are answered."""
    push = run_push(h2_server.url, tmp_path, "--http2", "--tokens", "fleet:100-199",
                    "--count", "300", "--senders", "1", "--streams", "100")
    assert push["statuses"] == {"200": 300} and push["errors"] == {}
    figures = push["http2"]
    assert figures["server_max_streams"] == 10 and figures["streams_in_flight"] == 10
    assert figures["resent"] == {}  # no REFUSED_STREAM
    assert figures["batches"] >= 30  # at most 10 streams per batch


def test_statuses_by_reason(start_server, tmp_path) -> None:
    server = start_server("--strict-tokens")  # Fleet's short test tokens: 400 BadDeviceToken
    push = run_push(server.url, tmp_path, "--http2", "--tokens", "fleet:0-9", expect=1)
    assert push["statuses"] == {"400 BadDeviceToken": 10}


def start_push(url: str, report: Any, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(rawsse("push", "--url", url, "--report", str(report), "--quiet",
                                   "--http2", *flags),
                            env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        _, stderr = proc.communicate(timeout=RUN_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()  # ours, by PID
            proc.communicate()
    return stderr


def read_report(path: Any) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def accepted_so_far(log: Any) -> int:
    """The ``accepted`` of the last progress line a run wrote to ``log`` (one a second)."""
    found = re.findall(r"^push t=.* accepted (\d+) ", log.read_text(), re.M)
    return int(found[-1]) if found else 0


def test_server_killed_mid_run(start_server, tmp_path) -> None:
    """As for HTTP/1.1: exit 3 after --give-up-after, in-flight pushes counted as lost."""
    server = start_server("--response-delay", "100ms")
    report, log = tmp_path / "push.json", tmp_path / "push.log"
    with open(log, "w") as progress:  # the run's progress lines, read while it runs
        proc = subprocess.Popen(
            rawsse("push", "--url", server.url, "--report", str(report), "--http2", "--tokens",
                   "fleet:0-9", "--rate", "100", "--duration", "30", "--give-up-after", "1"),
            env=ENV, stderr=progress, start_new_session=True)
    try:
        # 20 answered, by the tool's own count, however long it took to start
        assert wait_for(lambda: accepted_so_far(log) >= 20, timeout=RUN_WAIT), log.read_text()
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server we started, by its process group
        proc.wait(RUN_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()  # ours, by PID
            proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 3, stderr
    assert f"lost the connection to {server.url} for 1 s" in stderr
    result = read_report(report)
    assert result["ended"] == "gave_up" and result["accepted"] >= 20
    assert any(kind.startswith("lost_") for kind in result["errors"]), result["errors"]
    assert accounted(result) == result["sent"]


def test_goaway_on_drain_counts_nothing_twice(start_server, tmp_path) -> None:
    """SIGTERM: the server sends GOAWAY and answers every stream up to its last-stream-id."""
    server = start_server("--response-delay", "300ms", "--drain-seconds", "3")
    report = tmp_path / "push.json"
    proc = start_push(server.url, report, "--tokens", "fleet:0-49", "--rate", "200",
                      "--duration", "30", "--give-up-after", "1", "--senders", "2")
    # 100 pushes received first (a second's worth at 200/s), however long the tool took to
    # start: the drain answers every one of them (3 s for the 300 ms delay).
    assert wait_counter(server.admin_url, "pushes_received", 100, timeout=RUN_WAIT) >= 100
    server.signal(signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == 3, stderr
    result = read_report(report)
    assert result["http2"]["goaways"] >= 1
    assert accounted(result) == result["sent"], result
    lost = {kind: n for kind, n in result["errors"].items() if kind.startswith("lost_")}
    # Streams up to the last-stream-id were all answered; those above it were to be resent on a
    # new connection, which the stopped server no longer takes: unanswered when the run gave up.
    assert lost.pop("lost_gave_up", 0) <= result["http2"]["resent"].get("goaway", 0), result
    assert lost == {}, result
    assert result["accepted"] >= 100  # those received before the SIGTERM


# -- TLS -----------------------------------------------------------------------------------------

def make_certificate(directory: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl): (cert, key)."""
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost", "-days", "1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=20)
    return cert, key


class TlsFront:
    """A TLS terminator in a thread (Python's ssl, ALPN ``alpn``): each connection is relayed
    to ``backend`` as h2c, so the client's TLS path meets the real server behind it."""

    def __init__(self, cert: str, key: str, backend: tuple[str, int], alpn: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols([alpn])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.backend = backend
        self.stopping = False
        self.threads: list[threading.Thread] = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                raw, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            thread = threading.Thread(target=self._relay, args=(raw,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(5)
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        with tls, socket.create_connection(self.backend) as plain:
            tls.setblocking(False)
            while not self.stopping:
                ready, _, _ = select.select([tls, plain], [], [], 0.2)
                if tls in ready or tls.pending():
                    try:
                        data = tls.recv(65536)
                    except ssl.SSLWantReadError:
                        data = None
                    except (ssl.SSLError, OSError):
                        return
                    if data == b"":
                        return
                    if data:
                        plain.sendall(data)
                if plain in ready:
                    data = plain.recv(65536)
                    if not data:
                        return
                    tls.setblocking(True)
                    tls.sendall(data)
                    tls.setblocking(False)

    def close(self) -> None:
        self.stopping = True
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("alpn", ["h2", "http/1.1"])
def test_tls_with_alpn_h2(h2_server, certificate, tmp_path, alpn: str) -> None:
    cert, key = certificate
    front = TlsFront(cert, key, (h2_server.host, h2_server.port), alpn)
    try:
        url = f"https://localhost:{front.port}"
        if alpn == "h2":
            push = run_push(url, tmp_path, "--http2", "--cacert", cert, "--tokens",
                            "fleet:200-219", "--count", "100", "--senders", "2")
            assert push["statuses"] == {"200": 100} and push["errors"] == {}
        else:  # the server would speak HTTP/1.1: refused, named, and the run gives up
            push = run_push(url, tmp_path, "--http2", "--cacert", cert, "--tokens", "fleet:0",
                            "--give-up-after", "1", "--senders", "1", expect=3)
            assert set(push["errors"]) == {"connect_no_h2"}
    finally:
        front.close()


def test_tls_certificate_not_trusted(h2_server, certificate, tmp_path) -> None:
    cert, key = certificate
    other, _ = make_certificate(tmp_path)  # a CA that did not sign the server's certificate
    front = TlsFront(cert, key, (h2_server.host, h2_server.port), "h2")
    try:
        push = run_push(f"https://127.0.0.1:{front.port}", tmp_path, "--http2", "--cacert",
                        other, "--tokens", "fleet:0", "--give-up-after", "1", "--senders", "1",
                        expect=3)
    finally:
        front.close()
    assert set(push["errors"]) == {"connect_tls_verify"}


def serve_has_tls() -> bool:
    done = subprocess.run(rawsse("serve", "--help"), env=ENV, capture_output=True, text=True,
                          timeout=20)
    return "--tls-listen" in done.stdout


def test_tls_against_the_servers_own_listener(start_server, certificate, tmp_path) -> None:
    if not serve_has_tls():
        pytest.skip("rawsse serve has no --tls-listen yet (being added in parallel)")
    cert, key = certificate
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    server = start_server("--tls-listen", f"127.0.0.1:{port}", "--tls-cert", cert,
                          "--tls-key", key)
    push = run_push(f"https://127.0.0.1:{port}", tmp_path, "--http2", "--cacert", cert,
                    "--tokens", "fleet:0-9", "--count", "50")
    assert push["statuses"] == {"200": 50}, server.output()


def test_cli_refuses_https_without_http2(tmp_path) -> None:
    for flags, named in ((["--url", "https://127.0.0.1:1"], "--url"),
                         (["--url", "http://127.0.0.1:1", "--http2", "--cacert", "x.pem"],
                          "--cacert"),
                         (["--url", "https://127.0.0.1:1", "--http2", "--cacert",
                           str(tmp_path / "missing.pem")], "--cacert"),
                         (["--http2", "--streams", "0"], "--streams")):
        done = subprocess.run(rawsse("push", "--tokens", "fleet:0", *flags), env=ENV,
                              capture_output=True, text=True, timeout=20)
        assert done.returncode == 2 and named in done.stderr, done.stderr


# -- an independent server: the h2 library, scripted ---------------------------------------------

class ScriptedPeer:
    """An HTTP/2 server made with the ``h2`` library in a thread, one connection at a time. The
    first connection answers its first stream, refuses its second (REFUSED_STREAM) and, at its
    third, sends GOAWAY with that stream as last-stream-id and answers it: any later stream was
    never processed. Every later connection answers everything. ``answered`` lists the paths
    answered 200, so a push delivered twice shows."""

    def __init__(self, window: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.window = window
        self.answered: list[str] = []
        self.connections = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            with sock:
                self._connection(sock, scripted=self.connections == 0)
            self.connections += 1

    def _connection(self, sock: socket.socket, scripted: bool) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 4,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.2)
        paths: dict[int, str] = {}
        ended = 0
        while not self.stopping:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    paths[event.stream_id] = dict(event.headers)[b":path"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended += 1
                    stream = event.stream_id
                    if scripted and ended == 2:
                        conn.reset_stream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
                    elif scripted and ended > 3:
                        pass  # above the GOAWAY's last-stream-id: never processed
                    else:
                        conn.send_headers(stream, [(":status", "200")], end_stream=True)
                        self.answered.append(paths[stream])
                        if scripted and ended == 3:
                            conn.close_connection(last_stream_id=stream)
            sock.sendall(conn.data_to_send())

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("window", [65535, 7])
def test_refused_and_goaway_streams_are_sent_again_once(tmp_path, window: int) -> None:
    """REFUSED_STREAM and the streams above a GOAWAY's last-stream-id are resent on a new
    connection and counted once; a 7-byte stream window makes every body wait for
    WINDOW_UPDATEs (flow control, RFC 9113 §6.9)."""
    peer = ScriptedPeer(window)
    try:
        push = run_push(f"http://127.0.0.1:{peer.port}", tmp_path, "--http2", "--tokens",
                        "fleet:0-11", "--senders", "1", "--streams", "4", timeout=RUN_WAIT)
    finally:
        peer.close()
    assert push["statuses"] == {"200": 12} and push["errors"] == {}, push
    assert sorted(peer.answered) == sorted(f"/3/device/{fleet_token(i)}" for i in range(12))
    figures = push["http2"]
    assert figures["goaways"] == 1 and figures["server_max_streams"] == 4
    assert figures["resent"]["refused"] == 1
    if window > 100:  # four streams opened at once: the fourth was above the last-stream-id
        assert figures["resent"]["goaway"] == 1
