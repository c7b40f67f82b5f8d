"""What each request means: the APNs push route, the SSE route, broadcast, operator and admin.

``dispatch(conn)`` runs once per complete request, inside httptools' ``on_message_complete``;
``headers_complete(conn)`` runs earlier for ``Expect: 100-continue`` and oversized bodies. Handlers
answer through the connection (``respond``, ``reserve``+``fill``, ``become_stream``) and never touch a
socket themselves.

Route map (SPEC §1–3):
  POST /3/device/<token>      push (APNs provider API)             public listener
  GET  /events?token=<hex>    device stream (SSE)                  public listener
  POST /broadcast[?prefix=]   one event to every stream            public listener
  GET  /healthz               liveness                             both listeners
  GET  /stats, /metrics       JSON and Prometheus                  operator listener*
  /admin/tokens[/<hex>]       per-token simulated states           operator listener*
  /admin/faults               fault rules                          operator listener*
  (* the public listener too when no --admin-listen is given)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

import orjson

from rawsse.server import frames
from rawsse.apns.admin import AdminError
from rawsse.server.http1 import DISCARD_BODY, Conn
from rawsse.apns.validation import PushRejected, is_apns_id, parse_token, payload_limit, validate_push
from rawsse.apns.registry import Push

log = logging.getLogger(__name__)

PUSH_PREFIX = b"/3/device/"
_JSON = b"application/json"


class Routes:
    __slots__ = ("worker", "config", "stats", "_operator")

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.config = worker.config
        self.stats = worker.stats
        self._operator: dict[bytes, Callable[[Conn, bytes, bytes, bytes], None]] = {
            b"/healthz": self.healthz,
            b"/stats": self.stats_route,
            b"/metrics": self.metrics_route,
            b"/admin/tokens": self.admin_tokens,
            b"/admin/faults": self.admin_faults,
        }

    # -- entry points from Conn ---------------------------------------------------------------

    def headers_complete(self, conn: Conn) -> None:
        """Refuse an oversized body before reading it; send 100 Continue when asked."""
        headers = conn.headers
        length_text = headers.get(b"content-length")
        if length_text is not None and length_text.isdigit():
            length = int(length_text)
            limit = payload_limit(headers) if conn.url.startswith(PUSH_PREFIX) else DISCARD_BODY
            if length > DISCARD_BODY or (length > limit and headers.get(b"expect")):
                self.stats.reject(413, "PayloadTooLarge")
                self._error(conn, 413, "PayloadTooLarge", close=True)
                conn.abort()
        expect = headers.get(b"expect")
        # RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored
        # (a 1.0 client does not know interim responses).
        if (expect is not None and expect.lower() == b"100-continue"
                and conn.parser.get_http_version() != "1.0"):
            conn.interim(frames.CONTINUE_100)

    def dispatch(self, conn: Conn) -> None:
        method = conn.parser.get_method()
        path, _, query = conn.url.partition(b"?")
        if conn.too_large:
            self.stats.reject(413, "PayloadTooLarge")
            self._error(conn, 413, "PayloadTooLarge", apns_id=self.worker.ids.new())
            return
        if conn.operator and (path.startswith(PUSH_PREFIX) or path == b"/events"):
            # The operator listener serves operators only: pushes and devices use --listen.
            self._error(conn, 404, "BadPath")
        elif path.startswith(PUSH_PREFIX):
            self.push(conn, method, path[len(PUSH_PREFIX):])
        elif path == b"/events":
            self.events(conn, method, query)
        elif path == b"/broadcast":
            self.broadcast(conn, method, query)
        else:
            self.operator(conn, method, path, query)

    def bad_request(self, conn: Conn, status: int, reason: str, detail: str) -> None:
        """Malformed HTTP: a JSON 4xx and a close. Counted, logged at debug only."""
        self.stats.bad_requests += 1
        log.debug("fd %d: %d %s (%s)", conn.fd, status, reason, detail)
        conn.keep_alive = False
        self._error(conn, status, reason, close=True)

    def reject_h2(self, conn: Conn) -> None:
        """HTTP/2 prior knowledge is not spoken (SPEC §2: HTTP/1.1); say so in plain terms."""
        self.stats.bad_requests += 1
        conn.keep_alive = False
        conn.respond(frames.json_response(505, b'{"reason":"HTTPVersionNotSupported",'
                                               b'"detail":"rawsse speaks HTTP/1.1 only"}', close=True))

    # -- POST /3/device/<token> ---------------------------------------------------------------

    def push(self, conn: Conn, method: bytes, token_text: bytes) -> None:
        worker = self.worker
        if method != b"POST":
            self.stats.reject(405, "MethodNotAllowed")
            self._error(conn, 405, "MethodNotAllowed", apns_id=worker.ids.new())
            return
        if b"/" in token_text:
            self.stats.reject(404, "BadPath")
            self._error(conn, 404, "BadPath", apns_id=worker.ids.new())
            return
        self.stats.pushes_received += 1
        config = self.config
        now = time.time()
        apns_id, request = validate_push(token_text, conn.headers, conn.duplicate, conn.body, now,
                                         config.default_ttl, config.strict_tokens, worker.ids)
        if isinstance(request, PushRejected):
            self._push_error(conn, apns_id, request.status, request.reason)
            return
        outcome = worker.admin.token_outcome(request.token)
        if outcome is not None:
            self._push_error(conn, apns_id, *outcome)
            return
        fault = worker.admin.pick_fault()
        if fault is not None:
            self.stats.faulted += 1
            timestamp = int(now * 1000) if fault.status == 410 else None
            self._push_error(conn, apns_id, fault.status, fault.reason, timestamp)
            return
        push = Push(frames.encode_event(apns_id, request.payload), request.expires)
        delay = (request.delay or config.delivery_delay).sample()
        slot = conn.reserve()
        worker.submit(request.token, push, delay,
                      lambda accepted: self._answer_push(conn, slot, apns_id, accepted))

    def _answer_push(self, conn: Conn, slot: list[Any], apns_id: bytes,
                     accepted: bool | None) -> None:
        """200 once the owner of the token took the push; 503 when a bounded queue was full or
        the owner is unreachable, so the sender retries (never a 200 that is then dropped)."""
        if accepted:
            data = frames.response(200, extra=b"apns-id: %s\r\n" % apns_id)
        else:
            if accepted is None:  # the owner worker, node or Redis could not be reached
                self.stats.owner_unavailable += 1
            else:  # a bounded queue is full: back-pressure
                self.stats.queue_full += 1
            self.stats.reject(503, "ServiceUnavailable")
            data = frames.json_response(503, frames.reason_body("ServiceUnavailable"),
                                        b"apns-id: %s\r\n" % apns_id)
        delay = self.config.response_delay
        conn.fill(slot, data, 0.0 if delay.is_zero else delay.sample())

    def _push_error(self, conn: Conn, apns_id: bytes, status: int, reason: str,
                    timestamp: int | None = None) -> None:
        self.stats.reject(status, reason)
        if status == 410 and timestamp is None:
            timestamp = int(time.time() * 1000)
        body = frames.reason_body(reason, timestamp)
        self._answer(conn, frames.json_response(status, body, b"apns-id: %s\r\n" % apns_id))

    def _answer(self, conn: Conn, data: bytes) -> None:
        delay = self.config.response_delay
        conn.fill(conn.reserve(), data, 0.0 if delay.is_zero else delay.sample())

    # -- GET /events?token= -------------------------------------------------------------------

    def events(self, conn: Conn, method: bytes, query: bytes) -> None:
        if method != b"GET":
            self._error(conn, 405, "MethodNotAllowed")
            return
        token_text = _query_value(query, b"token")
        try:
            token = parse_token(token_text, self.config.strict_tokens)
        except PushRejected as rejected:
            self._error(conn, rejected.status, rejected.reason)
            return
        conn.become_stream(token)

    # -- POST /broadcast ----------------------------------------------------------------------

    def broadcast(self, conn: Conn, method: bytes, query: bytes) -> None:
        worker = self.worker
        if method != b"POST":
            self._error(conn, 405, "MethodNotAllowed")
            return
        if not conn.body:
            self._error(conn, 400, "PayloadEmpty")
            return
        # A broadcast reaches every device as a push, so Apple's payload and apns-id rules hold
        # for it too; they also keep every line of the event under the 8192 bytes Fleet's
        # device client accepts (fleet-apns-mock.md §5.2), which a longer line would disconnect.
        if len(conn.body) > payload_limit(conn.headers):
            self.stats.reject(413, "PayloadTooLarge")
            self._error(conn, 413, "PayloadTooLarge")
            return
        given = conn.headers.get(b"apns-id")
        if given is not None and not is_apns_id(given):
            self._error(conn, 400, "BadMessageId")
            return
        apns_id = given if given else worker.ids.new()
        prefix_text = _query_value(query, b"prefix").lower()
        if prefix_text and not all(c in b"0123456789abcdef" for c in prefix_text):
            self._error(conn, 400, "BadDeviceToken")
            return
        frame = frames.encode_event(apns_id, conn.body)

        slot = conn.reserve()

        def done(streams: int) -> None:
            body = orjson.dumps({"apns_id": apns_id.decode(), "streams": streams})
            conn.fill(slot, frames.json_response(200, body))

        worker.broadcast(frame, prefix_text.decode(), done)

    # -- operator routes ----------------------------------------------------------------------

    def operator(self, conn: Conn, method: bytes, path: bytes, query: bytes) -> None:
        base = path
        rest = b""
        if path.startswith(b"/admin/tokens/"):
            base, rest = b"/admin/tokens", path[len(b"/admin/tokens/"):]
        handler = self._operator.get(base)
        if handler is None or (base != b"/healthz" and not (conn.operator or self.config.admin_listen is None)):
            self._error(conn, 404, "BadPath")
            return
        handler(conn, method, rest, query)

    def healthz(self, conn: Conn, method: bytes, rest: bytes, query: bytes) -> None:
        conn.respond(frames.response(200, b"ok\n", b"text/plain; charset=utf-8"))

    def stats_route(self, conn: Conn, method: bytes, rest: bytes, query: bytes) -> None:
        slot = conn.reserve()
        self.worker.collect_stats(lambda doc: conn.fill(slot, frames.json_response(
            200, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")))

    def metrics_route(self, conn: Conn, method: bytes, rest: bytes, query: bytes) -> None:
        from rawsse.server.metrics import render_metrics

        slot = conn.reserve()
        self.worker.collect_stats(lambda doc: conn.fill(slot, frames.response(
            200, render_metrics(doc), b"text/plain; version=0.0.4; charset=utf-8")))

    def admin_tokens(self, conn: Conn, method: bytes, rest: bytes, query: bytes) -> None:
        """GET lists; PUT/POST /admin/tokens/<hex> {"state": ...}; DELETE one or all."""
        if method == b"GET" and not rest:
            self._json(conn, 200, self.worker.admin.describe_tokens())
            return
        if method in (b"PUT", b"POST") and rest:
            body = self._json_body(conn)
            if body is None:
                return
            self._admin(conn, {**body, "op": "set_token", "token": rest.decode("latin-1")})
        elif method == b"DELETE" and rest:
            self._admin(conn, {"op": "set_token", "token": rest.decode("latin-1"), "state": "active"})
        elif method == b"DELETE":
            self._admin(conn, {"op": "clear_tokens"})
        else:
            self._error(conn, 405, "MethodNotAllowed")

    def admin_faults(self, conn: Conn, method: bytes, rest: bytes, query: bytes) -> None:
        """GET lists; POST adds one rule; PUT replaces all ({"rules": [...]}); DELETE clears."""
        if method == b"GET":
            self._json(conn, 200, self.worker.admin.describe_faults())
        elif method == b"POST":
            body = self._json_body(conn)
            if body is not None:
                self._admin(conn, {**body, "op": "add_fault"})
        elif method == b"PUT":
            body = self._json_body(conn)
            if body is not None:
                self._admin(conn, {**body, "op": "set_faults"})
        elif method == b"DELETE":
            self._admin(conn, {"op": "clear_faults"})
        else:
            self._error(conn, 405, "MethodNotAllowed")

    def _admin(self, conn: Conn, command: dict[str, Any]) -> None:
        command.pop("stamp", None)  # an operator's change is stamped when applied (admin.py)
        try:
            answer = self.worker.admin.apply(command)
        except AdminError as exc:
            self._json(conn, 400, {"reason": "BadAdminRequest", "detail": str(exc)})
            return
        slot = conn.reserve()
        self.worker.share_admin_command(
            self.worker.admin.replayable(command),
            lambda: conn.fill(slot, frames.json_response(200, orjson.dumps(answer))))

    def _json_body(self, conn: Conn) -> dict[str, Any] | None:
        try:
            body = json.loads(conn.body or b"{}")
        except ValueError as exc:
            self._json(conn, 400, {"reason": "BadAdminRequest", "detail": f"body is not JSON: {exc}"})
            return None
        if isinstance(body, str):  # a bare rule string is accepted as {"rule": ...}
            body = {"rule": body}
        if not isinstance(body, dict):
            self._json(conn, 400, {"reason": "BadAdminRequest", "detail": "body must be a JSON object"})
            return None
        body.pop("op", None)
        return body

    # -- helpers ------------------------------------------------------------------------------

    def _json(self, conn: Conn, status: int, doc: Any) -> None:
        conn.respond(frames.json_response(status, orjson.dumps(doc)))

    def _error(self, conn: Conn, status: int, reason: str, apns_id: bytes | None = None,
               close: bool = False) -> None:
        extra = b"apns-id: %s\r\n" % apns_id if apns_id is not None else b""
        conn.respond(frames.json_response(status, frames.reason_body(reason), extra, close=close),
                     close=close)


def _query_value(query: bytes, name: bytes) -> bytes:
    """The first value of ``name`` in a query string (percent-decoded), or b""."""
    if not query:
        return b""
    prefix = name + b"="
    for part in query.split(b"&"):
        if part.startswith(prefix):
            value = part[len(prefix):]
            return unquote_to_bytes(value) if b"%" in value else value
    return b""

