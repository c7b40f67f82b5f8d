"""Small fast unit tests of the pure parts: frames (golden bytes), config parsing, push validation,
and the CLI's one-line errors. No server, except the CLI cases that run ``python -m rawsse``."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from rawsse.apns import apple as apns
from rawsse.apns import answers
from rawsse.server import http1_wire
from rawsse.server import sse as frames
from rawsse.server.exchange import Answer, Request
from rawsse.config import (ConfigError, FaultRule, parse_address, parse_distribution,
                           parse_duration, parse_fault)
from rawsse.apns.validation import IdGenerator, PushRejected, answer_id, check_push

# -- frames: golden bytes --------------------------------------------------------------------------

SSE_HEAD = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\n"
            b"Connection: close\r\n"
            b"\r\n")


def test_sse_head_is_close_delimited_and_unbuffered():
    assert frames.SSE_HEAD == SSE_HEAD
    assert b"Content-Length" not in frames.SSE_HEAD and b"Transfer-Encoding" not in frames.SSE_HEAD


def test_keepalive_is_the_comment_fleet_expects():
    assert frames.SSE_KEEPALIVE == b": keepalive\n\n"


@pytest.mark.parametrize("payload, data_lines", [
    (b'{"mdm":"pushmagic1"}', b'data: {"mdm":"pushmagic1"}\n'),
    (b"a\nb", b"data: a\ndata: b\n"),
    (b"a\r\nb", b"data: a\ndata: b\n"),
    (b"a\rb", b"data: a\ndata: b\n"),
    # WHATWG: CRLF, LF and a lone CR each end a line; empty lines survive as empty data lines.
    (b"a\r\n\rb\n", b"data: a\ndata: \ndata: b\ndata: \n"),
    (b"\n", b"data: \ndata: \n"),
], ids=["single-line", "lf", "crlf", "cr", "mixed", "only-newline"])
def test_encode_event_golden_bytes(payload, data_lines):
    assert frames.encode_event(b"id-1", payload) == b"id: id-1\nevent: ping\n" + data_lines + b"\n"


def sse_data(frame: bytes) -> str:
    """What a WHATWG client (or Fleet's, which joins data lines with LF) rebuilds from a frame."""
    lines = frame.decode().split("\n")
    assert lines[-2:] == ["", ""], "an event ends with a blank line"
    data = []
    for line in lines[:-2]:
        name, _, value = line.partition(":")
        assert name in ("id", "event", "data"), line
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    return "\n".join(data)


@pytest.mark.parametrize("payload", [b"x", b"a\nb\nc", b"a\r\nb", b"a\rb", b"{\n}\n", b"\r\r\n"])
def test_encoded_payload_round_trips_with_line_breaks_normalised(payload):
    expected = payload.decode().replace("\r\n", "\n").replace("\r", "\n")
    assert sse_data(frames.encode_event(b"i", payload)) == expected


def test_retry_preambles_are_jittered_within_half_either_way():
    preambles = frames.retry_preambles(5000)
    values = []
    for preamble in preambles:
        assert preamble.startswith(SSE_HEAD) and preamble.endswith(b"\n\n")
        match = re.fullmatch(rb"retry: (\d+)\n\n", preamble[len(SSE_HEAD):])
        assert match, preamble
        values.append(int(match.group(1)))
    assert all(2500 <= v <= 7500 for v in values), values
    assert len(set(values)) > len(values) // 2, "jittered, not one value"
    assert max(values) - min(values) > 2000, "spread over the ±50% window"
    assert frames.retry_preambles(5000) == preambles, "built once, deterministic per value"


def test_retry_zero_sends_the_head_alone():
    assert frames.retry_preambles(0) == (SSE_HEAD,)


def test_response_golden_bytes():
    answer = Answer(200, b"ok", b"text/plain", ((b"apns-id", b"x"),))
    data = http1_wire.serialize(answer, http1_wire.CLOSE)
    assert re.fullmatch(rb"HTTP/1\.1 200 OK\r\nConnection: close\r\nDate: [A-Z][a-z]{2}, \d\d "
                        rb"[A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\napns-id: x\r\n"
                        rb"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nok", data), data


def test_error_bodies_are_apple_json():
    assert answers.reason_body("BadDeviceToken") == b'{"reason":"BadDeviceToken"}'
    assert answers.reason_body("Unregistered", 1700000000123) == \
        b'{"reason":"Unregistered","timestamp":1700000000123}'
    error = answers.error(400, "BadDeviceToken", b"id-1")
    assert b"Content-Type: application/json\r\n" in http1_wire.serialize(error)
    assert error.headers == ((b"apns-id", b"id-1"),)


def test_status_lines():
    assert http1_wire.STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"
    assert http1_wire.STATUS_LINE[431] == b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    assert http1_wire.STATUS_LINE[505] == b"HTTP/1.1 505 HTTP Version Not Supported\r\n"
    assert http1_wire.CONTINUE_100 == b"HTTP/1.1 100 Continue\r\n\r\n"


# -- config: durations, distributions, faults, addresses -------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("2s", 2.0), ("1.5", 1.5), ("15", 15.0), (".5s", 0.5), ("100us", 1e-4),
    ("2m", 120.0), ("24h", 86400.0), ("30d", 30 * 86400.0), (" 3s ", 3.0), ("0", 0.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text, "--x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["xyz", "", "-1", "5 parsecs", "1.2.3s", "ms", "1e3"])
def test_bad_duration_names_the_flag(text):
    with pytest.raises(ConfigError) as error:
        parse_duration(text, "--keepalive")
    assert error.value.flag == "--keepalive"
    assert str(error.value).startswith("--keepalive: ")
    assert "\n" not in str(error.value)


def test_distributions_parse_and_sample_within_bounds():
    rng = random.Random(7)
    fixed = parse_distribution("100ms", "--delivery-delay")
    assert (fixed.kind, fixed.a, fixed.is_zero) == ("fixed", 0.1, False)
    assert parse_distribution("0", "--delivery-delay").is_zero
    uniform = parse_distribution("uniform:50ms-2s", "--delivery-delay")
    assert (uniform.kind, uniform.a, uniform.b) == ("uniform", 0.05, 2.0)
    assert all(0.05 <= uniform.sample(rng) <= 2.0 for _ in range(1000))
    exp = parse_distribution("exp:200ms", "--delivery-delay")
    samples = [exp.sample(rng) for _ in range(4000)]
    assert min(samples) >= 0 and 0.17 < sum(samples) / len(samples) < 0.23
    normal = parse_distribution("normal:300ms,50ms", "--response-delay")
    assert (normal.kind, normal.a, normal.b) == ("normal", 0.3, 0.05)
    assert all(normal.sample(rng) >= 0 for _ in range(1000))
    assert parse_distribution("UNIFORM:1s-2s", "--x").kind == "uniform"


@pytest.mark.parametrize("text, words", [
    ("uniform:2s-1s", "upper bound"),
    ("uniform:50ms", "LOW-HIGH"),
    ("uniform:a-b", "not a duration"),
    ("normal:300ms", "MEAN,SD"),
    ("gamma:1s", "unknown distribution"),
    ("fast", "not a duration"),
])
def test_bad_distribution_names_the_flag(text, words):
    with pytest.raises(ConfigError) as error:
        parse_distribution(text, "--delivery-delay")
    assert str(error.value).startswith("--delivery-delay: ")
    assert words in str(error.value)


@pytest.mark.parametrize("text, rule", [
    ("5%:503:ServiceUnavailable", FaultRule(0.05, 503, "ServiceUnavailable")),
    ("1%:429", FaultRule(0.01, 429, "TooManyRequests")),
    ("0.5%:TooManyRequests", FaultRule(0.005, 429, "TooManyRequests")),
    ("100%:410", FaultRule(1.0, 410, "Unregistered")),
    ("2%:500", FaultRule(0.02, 500, "InternalServerError")),
    ("0%:503:Shutdown", FaultRule(0.0, 503, "Shutdown")),
])
def test_parse_fault(text, rule):
    assert parse_fault(text) == rule


@pytest.mark.parametrize("text, words", [
    ("5:503", "PERCENT%:STATUS[:REASON]"),
    ("5%", "PERCENT%:STATUS[:REASON]"),
    ("5%:503:ServiceUnavailable:x", "PERCENT%:STATUS[:REASON]"),
    ("x%:503", "not a percentage"),
    ("150%:503", "between 0 and 100"),
    ("nan%:503", "between 0 and 100"),
    ("5%::", "name a status or a reason"),
    ("5%:418", "no APNs reason"),
    ("5%:503:NotAReason", "not an APNs reason"),
    # the reason and the status must agree with Apple's table ("Handling notification responses
    # from APNs")
    ("5%:503:TooManyRequests", "APNs answers TooManyRequests with 429, not 503"),
    ("5%:400:Unregistered", "APNs answers Unregistered with 410, not 400"),
])
def test_bad_fault_rule_names_the_flag_and_the_problem(text, words):
    with pytest.raises(ConfigError) as error:
        parse_fault(text, "--fault")
    assert str(error.value).startswith("--fault: ")
    assert words in str(error.value)


@pytest.mark.parametrize("text, address", [
    ("0.0.0.0:8378", ("0.0.0.0", 8378)), (":8378", ("0.0.0.0", 8378)),
    ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:8378", ("::1", 8378)),
])
def test_parse_address(text, address):
    assert parse_address(text, "--listen") == address


@pytest.mark.parametrize("text", ["8378", "host:port", "host:99999", "host:", "nonsense"])
def test_bad_address_names_the_flag(text):
    with pytest.raises(ConfigError, match=r"^--listen: "):
        parse_address(text, "--listen")


# -- push validation (pure: validate_push with a predictable id source) ----------------------------

class CountingIds(IdGenerator):
    """Ids ``…-000000000001``, ``…-000000000002``: a test can tell which one was generated."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def new(self) -> bytes:
        self.count += 1
        return b"00000000-0000-4000-8000-%012d" % self.count


NOW = 1_800_000_000.0
TTL = 86_400.0
TOKEN = b"746f6b656e31"  # hex("token1")
GIVEN_ID = b"6F1A2B3C-0000-4000-8000-00000000ABCD"


class Checked:
    """What ``check_push`` returned for an accepted push, by name."""

    def __init__(self, token: bytes, expires: float, delay: object) -> None:
        self.token, self.expires, self.delay = token, expires, delay


def validate(token: bytes = TOKEN, headers: dict[bytes, bytes] | None = None,
             body: bytes = b'{"mdm":"m"}', duplicate: bool = False,
             strict: bool = False) -> tuple[bytes, Checked | PushRejected]:
    """(the answer's apns-id, what check_push returned or raised), as the push route sees it."""
    request = Request(None, False, b"POST", b"/3/device/" + token)  # type: ignore[arg-type]
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    request.duplicate = request.duplicate or duplicate
    request.body = body
    try:
        apns_id, *checked = check_push(request, token, NOW, TTL, strict, CountingIds())
    except PushRejected as rejected:
        return answer_id(request.apns_id, CountingIds()), rejected
    return apns_id, Checked(*checked)


def reason_of(result: Checked | PushRejected) -> str:
    assert isinstance(result, PushRejected), result
    assert result.status == apns.REASON_STATUS[result.reason]
    return result.reason


def test_fleet_push_is_accepted_with_a_fresh_id_and_the_default_ttl():
    apns_id, request = validate()
    assert apns_id == b"00000000-0000-4000-8000-000000000001"
    assert isinstance(request, Checked)
    assert request.token == b"token1"
    assert request.expires == NOW + TTL
    assert request.delay is None


def test_token_case_does_not_matter():
    _, lower = validate(TOKEN.lower())
    _, upper = validate(TOKEN.upper())
    assert lower.token == upper.token == b"token1"


def test_given_apns_id_is_echoed_as_sent():
    apns_id, request = validate(headers={b"apns-id": GIVEN_ID})
    assert apns_id == GIVEN_ID and isinstance(request, Checked)


def test_bad_apns_id_is_rejected_and_echoed_as_sent():
    apns_id, result = validate(headers={b"apns-id": b"not-a-uuid"})
    assert reason_of(result) == "BadMessageId"
    assert apns_id == b"not-a-uuid"


@pytest.mark.parametrize("headers, token, body, reason", [
    ({b"apns-push-type": b"bogus"}, TOKEN, b"x", "InvalidPushType"),
    ({b"apns-expiration": b"soon"}, TOKEN, b"x", "BadExpirationDate"),
    ({b"apns-expiration": b""}, TOKEN, b"x", "BadExpirationDate"),
    ({b"apns-priority": b"7"}, TOKEN, b"x", "BadPriority"),
    ({b"apns-collapse-id": b"c" * 65}, TOKEN, b"x", "BadCollapseId"),
    ({}, b"", b"x", "MissingDeviceToken"),
    ({}, b"abc", b"x", "BadDeviceToken"),
    ({}, b"zz", b"x", "BadDeviceToken"),
    ({}, b"not-hex-token", b"x", "BadDeviceToken"),
    ({}, TOKEN, b"", "PayloadEmpty"),
    ({}, TOKEN, b"x" * 4097, "PayloadTooLarge"),
    ({b"apns-push-type": b"voip"}, TOKEN, b"x" * 5121, "PayloadTooLarge"),
    ({b"rawsse-delivery-delay": b"whenever"}, TOKEN, b"x", "BadDeliveryDelay"),
    # Fleet's mock checks push type before the token (fleetdm/fleet
    # cmd/apple-apns-mock/handlers.go): first error wins.
    ({b"apns-push-type": b"bogus"}, b"zz", b"", "InvalidPushType"),
    ({b"apns-priority": b"7"}, b"zz", b"", "BadPriority"),
    ({}, b"zz", b"", "BadDeviceToken"),
])
def test_rejections(headers, token, body, reason):
    _, result = validate(token, headers, body)
    if reason == "BadDeliveryDelay":  # rawsse's own header, not in Apple's table
        assert isinstance(result, PushRejected) and (result.status, result.reason) == (400, reason)
    else:
        assert reason_of(result) == reason


def test_duplicate_apns_header_is_rejected_first():
    _, result = validate(b"zz", {b"apns-push-type": b"bogus"}, b"", duplicate=True)
    assert reason_of(result) == "DuplicateHeaders"


@pytest.mark.parametrize("headers, body", [
    ({}, b"x" * 4096),
    ({b"apns-push-type": b"voip"}, b"x" * 5120),
    ({b"apns-push-type": b"mdm", b"apns-priority": b"10", b"apns-topic": b"com.apple.x"}, b"x"),
    ({b"apns-priority": b"5", b"apns-collapse-id": b"c" * 64}, b"x"),
    ({b"rawsse-delivery-delay": b"uniform:1s-2s"}, b"x"),
])
def test_limits_and_valid_headers_are_accepted(headers, body):
    _, result = validate(headers=headers, body=body)
    assert isinstance(result, Checked), result


@pytest.mark.parametrize("value, expires", [
    (b"0", 0.0),                                   # deliver now or discard
    (b"1", 0.0),                                   # in the past: same
    (b"-5", 0.0),
    (b"%d" % (NOW + 3600), NOW + 3600),
    (b"%d" % (NOW + 40 * 86400), NOW + apns.MAX_STORAGE_SECONDS),  # Apple keeps 30 days at most
])
def test_expiration(value, expires):
    _, request = validate(headers={b"apns-expiration": value})
    assert isinstance(request, Checked) and request.expires == expires


def test_strict_tokens_need_32_bytes():
    assert reason_of(validate(b"ab" * 31, strict=True)[1]) == "BadDeviceToken"
    assert isinstance(validate(b"ab" * 32, strict=True)[1], Checked)
    assert isinstance(validate(b"ab" * 31)[1], Checked)


def test_generated_ids_are_distinct_lowercase_v4_uuids():
    ids = IdGenerator()
    made = [ids.new() for _ in range(1000)]
    assert len(set(made)) == 1000
    for apns_id in made[:50] + made[-50:]:
        assert re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                            apns_id), apns_id


# -- CLI: a bad flag value is one line on stderr naming the flag, exit status 2 --------------------

@pytest.mark.parametrize("flag, value", [
    ("--keepalive", "xyz"),
    ("--fault", "5:503"),
    ("--fault", "5%:503:TooManyRequests"),
    ("--listen", "nonsense"),
    ("--delivery-delay", "uniform:2s-1s"),
    ("--header-timeout", "0"),
    ("--broadcast-worker-wait", "0"),
    ("--broadcast-worker-wait", "121"),
])
def test_cli_bad_flag_is_one_line_naming_the_flag(flag, value):
    args = [sys.executable, "-m", "rawsse", "serve", "--listen", "127.0.0.1:0", flag, value]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=20)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done
    assert len(lines) == 1, done.stderr
    assert flag in lines[0] and lines[0].startswith("rawsse serve: "), lines[0]
    assert done.stdout == ""


def test_is_apns_id_accepts_canonical_uuids_only():
    from rawsse.apns.validation import is_apns_id

    assert is_apns_id(b"6f1a2b3c-0000-4000-8000-00000000abcd")
    assert is_apns_id(GIVEN_ID)  # Fleet's README shows Apple echoing upper case
    for bad in (b"", b"x", b"6f1a2b3c00004000800000000000abcd",
                b"6f1a2b3c-0000-4000-8000-00000000abcd\n", b"a" * 9000):
        assert not is_apns_id(bad), bad


def test_connection_header_is_said_once_and_only_when_asked():
    answer = Answer(200, b"ok")
    assert b"Connection" not in http1_wire.serialize(answer)
    closing = http1_wire.serialize(answer, http1_wire.CLOSE)
    assert closing.count(b"Connection: close\r\n") == 1
    assert closing.endswith(b"\r\n\r\nok")
    kept = http1_wire.serialize(answer, http1_wire.KEEP_ALIVE_10)
    assert kept.count(b"Connection: keep-alive\r\n") == 1
