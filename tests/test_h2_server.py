"""HTTP/2 with prior knowledge against a real ``rawsse serve``, the ``h2`` library as the client
over a real socket: Apple's reason table, concurrency, flow control, resets, PING, delivery."""

from __future__ import annotations

import json
import socket
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

import test_push_api
from test_push_api import admin, assert_apns_error, device, new_token
from wire import Response

# The HTTP/1.1 reason table (method, path, headers, body, status, reason), reused as it is
# (through the module: a test function imported by name would be collected here again).
REASON_CASES = test_push_api.test_apple_reasons.pytestmark[0].args[1]


class H2Client:
    """One HTTP/2 connection (prior knowledge) driven by the ``h2`` library."""

    def __init__(self, host: str, port: int, window: int | None = None,
                 timeout: float = 5.0, source: tuple[str, int] | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=source)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.ack_data = True  # credit DATA back at once (a tiny-window test turns it off)
        self.responses: dict[int, dict] = {}
        self.events: list = []
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, method: str, path: str, headers: dict | None = None, body: bytes = b"",
              end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":path", path.encode()),
                  (b":scheme", b"http"), (b":authority", b"rawsse")]
        fields += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
        self.responses[stream_id] = {"headers": {}, "body": b"", "ended": False, "reset": None}
        self.conn.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            self.send_body(stream_id, body, end)
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> None:
        """Send ``body`` as the windows allow, waiting for WINDOW_UPDATEs in between."""
        while body:
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self.flush()
                before = self.conn.local_flow_control_window(stream_id)
                self.pump(lambda: self.conn.local_flow_control_window(stream_id) > before)
                continue
            chunk, body = body[:window], body[window:]
            self.conn.send_data(stream_id, chunk, end_stream=end and not body)
        self.flush()

    def pump(self, until, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("no answer in time")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            for event in self.conn.receive_data(data):
                self._on_event(event)
            self.flush()

    def _on_event(self, event) -> None:
        self.events.append(event)
        stream_id = getattr(event, "stream_id", None)
        response = self.responses.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived) and response is not None:
            response["headers"] = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h2.events.DataReceived) and response is not None:
            response["body"] += event.data
            if self.ack_data:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded) and response is not None:
            response["ended"] = True
        elif isinstance(event, h2.events.StreamReset) and response is not None:
            response["reset"] = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    def done(self, stream_id: int) -> bool:
        response = self.responses[stream_id]
        return response["ended"] or response["reset"] is not None

    def wait(self, stream_id: int) -> Response:
        self.pump(lambda: self.done(stream_id))
        return self.response(stream_id)

    def response(self, stream_id: int) -> Response:
        r = self.responses[stream_id]
        headers = dict(r["headers"])
        return Response(int(headers.pop(":status", 0)), headers, r["body"])

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> Response:
        return self.wait(self.start(method, path, headers, body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(server):
    c = H2Client(server.host, server.port)
    yield c
    c.close()


@pytest.mark.parametrize("method,path,headers,body,status,reason", REASON_CASES)
def test_apple_reasons_over_http2(client, method, path, headers, body, status, reason):
    assert_apns_error(client.request(method, path, body, headers), status, reason)


def test_push_answers_200_with_the_apns_id_sent(client):
    apns_id = "0f3a1a2e-0c54-4c0b-9d9a-8c2a4b5b6c7d"
    response = client.request("POST", f"/3/device/{new_token()}", b'{"aps":{}}',
                              {"apns-id": apns_id, "apns-topic": "com.example"})
    assert response.status == 200 and response.headers["apns-id"] == apns_id
    assert response.body == b""


def test_unregistered_token_gets_410_with_timestamp(server, client):
    token = new_token()
    admin(server, "PUT", f"/admin/tokens/{token}", {"state": "unregistered"})
    assert_apns_error(client.request("POST", f"/3/device/{token}", b"{}"), 410, "Unregistered")


def test_payload_limits_over_http2(client):
    assert client.request("POST", f"/3/device/{new_token()}", b"x" * 4096).status == 200
    assert client.request("POST", f"/3/device/{new_token()}", b"x" * 5120,
                          {"apns-push-type": "voip"}).status == 200


def test_body_without_content_length_and_host_instead_of_authority(server):
    """node-apn sends no content-length; aioapns sends host, not :authority."""
    c = H2Client(server.host, server.port)
    try:
        stream_id = c.conn.get_next_available_stream_id()
        c.responses[stream_id] = {"headers": {}, "body": b"", "ended": False, "reset": None}
        c.conn.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"http"),
                                        (b":path", f"/3/device/{new_token()}".encode()),
                                        (b"host", b"api.push.apple.com")])
        c.conn.send_data(stream_id, b'{"aps":{}}', end_stream=True)
        c.flush()
        assert c.wait(stream_id).status == 200
    finally:
        c.close()


def test_push_from_http2_reaches_an_http1_device_stream(server, client):
    token = new_token()
    reader = device(server, token)
    response = client.request("POST", f"/3/device/{token}", b'{"mdm":"h2"}')
    assert response.status == 200
    event = reader.next_event()
    assert event.id == response.headers["apns-id"] and event.data == '{"mdm":"h2"}'


def test_sse_over_http2_gets_an_error_naming_http11(client):
    response = client.request("GET", f"/events?token={new_token()}")
    assert response.status == 505
    assert "HTTP/1.1" in response.json()["detail"]


def test_a_thousand_concurrent_streams_on_one_connection(client):
    client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 1000)
    ids = [client.start("POST", f"/3/device/{new_token()}", body=b"{}") for _ in range(1000)]
    client.pump(lambda: all(client.done(i) for i in ids), timeout=30)
    assert {client.response(i).status for i in ids} == {200}


def test_stream_over_the_limit_is_refused(start_server):
    srv = start_server("--h2-max-streams", "2", "--response-delay", "uniform:300ms-300ms")
    c = H2Client(srv.host, srv.port)
    try:
        # h2 itself holds back streams over the server's limit: announce the limit late.
        ids = [c.start("POST", f"/3/device/{new_token()}", body=b"{}") for _ in range(3)]
        c.pump(lambda: all(c.done(i) for i in ids))
        assert [c.response(i).status for i in ids[:2]] == [200, 200]
        assert c.responses[ids[2]]["reset"] == 7  # REFUSED_STREAM
    finally:
        c.close()


def test_client_reset_cancels_the_stream_and_the_connection_goes_on(start_server):
    srv = start_server("--response-delay", "uniform:200ms-200ms")
    c = H2Client(srv.host, srv.port)
    try:
        cancelled = c.start("POST", f"/3/device/{new_token()}", body=b"{}")
        c.conn.reset_stream(cancelled)
        c.flush()
        kept = c.start("POST", f"/3/device/{new_token()}", body=b"{}")
        assert c.wait(kept).status == 200
        time.sleep(0.3)
        c.conn.ping(b"12345678")
        c.flush()
        c.pump(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in c.events))
        assert not any(getattr(e, "stream_id", None) == cancelled
                       and isinstance(e, h2.events.ResponseReceived) for e in c.events)
    finally:
        c.close()


def test_ping_is_answered_with_its_payload(client):
    client.conn.ping(b"rawsse!!")
    client.flush()
    client.pump(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    ack = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)][0]
    assert ack.ping_data == b"rawsse!!"


def test_answer_waits_for_a_tiny_window_and_flows_when_it_opens(server):
    """A client announcing a 10-byte window gets the 400 JSON body 10 bytes at a time."""
    c = H2Client(server.host, server.port, window=10)
    c.ack_data = False
    try:
        stream_id = c.start("POST", "/3/device/zz", body=b"x")
        c.pump(lambda: len(c.responses[stream_id]["body"]) == 10)
        time.sleep(0.1)
        c.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            c.pump(lambda: c.done(stream_id), timeout=0.5)  # nothing beyond the window
        c.sock.settimeout(5)
        c.ack_data = True
        c.conn.acknowledge_received_data(10, stream_id)
        c.flush()
        response = c.wait(stream_id)
        assert json.loads(response.body) == {"reason": "BadDeviceToken"}
    finally:
        c.close()


def test_body_larger_than_the_window_is_let_through(client):
    """200 KB to the admin-sized limit path: the server credits windows as it reads."""
    body = b"x" * 200_000
    response = client.request("POST", f"/3/device/{new_token()}", body)
    assert_apns_error(response, 413, "PayloadTooLarge")
    # and the connection still serves
    assert client.request("POST", f"/3/device/{new_token()}", b"{}").status == 200



def _raw_answers(server, blocks: list[bytes], body: bytes = b'{"aps":{}}',
                 padded: bool = False) -> list[dict]:
    """Send each hand-made request header block on one raw connection (stream 1, 3, ...), each
    followed by ``body`` (``padded``: both frames padded, HEADERS with priority fields); the
    answers' fields, in stream order (the ``hpack`` decoder)."""
    import hpack

    from rawsse.h2 import frames as f

    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        out = [f.PREFACE, f.header(0, f.SETTINGS, 0, 0)]
        for i, block in enumerate(blocks):
            headers, data, flags = block, body, 0
            if padded:  # §6.1, §6.2: pad length, [priority,] content, padding
                headers = b"\x03" + b"\x00\x00\x00\x00\x10" + block + b"\x00" * 3
                data = b"\x05" + body + b"\x00" * 5
                flags = f.PADDED
            out += [f.header(len(headers), f.HEADERS,
                             f.END_HEADERS | flags | (f.PRIORITY_FLAG if padded else 0), 2 * i + 1),
                    headers, f.header(len(data), f.DATA, f.END_STREAM | flags, 2 * i + 1), data]
        sock.sendall(b"".join(out))
        answers: dict[int, dict] = {}
        decoder, data = hpack.Decoder(), b""
        while len(answers) < len(blocks):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(answers)} answers"
            data += chunk
            while len(data) >= 9:
                high, low, type_, _, stream_id = f.HEADER.unpack_from(data)
                end = 9 + (high << 16 | low)
                if len(data) < end:
                    break
                if type_ == f.HEADERS:
                    answers[stream_id] = dict(decoder.decode(data[9:end], raw=True))
                assert type_ != f.GOAWAY, data[9:end]
                data = data[end:]
        return [answers[2 * i + 1] for i in range(len(blocks))]
    finally:
        sock.close()


def test_a_repeated_block_suffix_follows_the_dynamic_table(server):
    """nghttp2's shape (``:path`` a literal without indexing, the rest indexes) with the same
    bytes after ``:path`` twice around a change of the entry they index: the server's cached
    suffix must not outlive the entry (the answer echoes the apns-id the index names)."""
    ids = [f"0f3a1a2e-0c54-4c0b-9d9a-8c2a4b5b6c{i:02d}".encode() for i in range(2)]

    def path(i: int) -> bytes:  # never indexed (§6.2.3), name :path (4), plain value
        value = f"/3/device/{new_token()}".encode()
        return bytes((0x14, len(value))) + value

    def index_apns_id(apns_id: bytes) -> bytes:  # with incremental indexing, new name
        return b"\x40\x07apns-id" + bytes((len(apns_id),)) + apns_id

    suffix = b"\x83\x86\xbe"  # :method POST, :scheme http, dynamic entry 62 (the newest)
    answers = _raw_answers(server, [
        path(0) + b"\x83\x86" + index_apns_id(ids[0]),
        path(1) + suffix,  # 62 = ids[0]
        path(2) + b"\x83\x86" + index_apns_id(ids[1]),
        path(3) + suffix,  # the same bytes: 62 = ids[1] now
        path(4) + suffix,
    ])
    assert [a[b":status"] for a in answers] == [b"200"] * 5
    assert [a[b"apns-id"] for a in answers] == [ids[0], ids[0], ids[1], ids[1], ids[1]]


def test_padded_frames_and_priority_fields_are_stripped(server):
    """§6.1, §6.2: a padded HEADERS with priority fields and a padded DATA serve the push
    (content-length is checked against the body without its padding)."""
    body = b'{"aps":{}}'
    value = f"/3/device/{new_token()}".encode()
    block = b"\x83\x86" + bytes((0x04, len(value))) + value + b"\x0f\x0d" + bytes((2,)) + b"%d" % len(body)
    answers = _raw_answers(server, [block], body, padded=True)
    assert answers[0][b":status"] == b"200"


def test_live_figures_over_http2_get_an_error_naming_them(server):
    """``/stats/events`` on the operator listener over h2c: refused as a device stream is (an
    SSE stream is HTTP/1.1 here), in words about the live figures, not about devices."""
    c = H2Client(server.host, server.admin_port)
    try:
        response = c.request("GET", "/stats/events")
    finally:
        c.close()
    assert response.status == 505
    detail = response.json()["detail"]
    assert "/stats/events" in detail and "HTTP/1.1" in detail and "device" not in detail
