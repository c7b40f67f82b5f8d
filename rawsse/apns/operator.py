"""The operator routes: liveness, ``/stats``, ``/metrics``, the live view (``/dashboard``, its
page, and ``/stats/events``, its figures: ``rawsse/server/dashboard.py``, ``statsevents.py``), and
the admin routes that set the simulated outcomes (``admin.py``) at run time.

They are served on the operator listener only (``--admin-listen``, by default loopback on the
public port + 1: on the public listener any sender could mark devices unregistered), or on the
public one too when the operator asks for it (``--admin-listen public``: ``admin_listen`` is
None); ``/healthz`` is on both. To add an admin route: a path in ``OperatorRoutes.routes`` and a
handler taking ``(request, rest)``, where ``rest`` is what follows the route's path; an admin
change goes through ``_apply`` so that every worker (and, in Redis mode, every node) holds it
before the answer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from rawsse.apns import answers, deliveries
from rawsse.apns.admin import AdminError
from rawsse.server import dashboard
from rawsse.apns.validation import PushRejected, is_apns_id, parse_token
from rawsse.server.exchange import Answer, Request
from rawsse.server.metrics import render_metrics
from rawsse.server.statsevents import VIEWER_TOKEN

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_TOKENS = b"/admin/tokens"
_DELIVERIES = b"/admin/deliveries"
_WITH_REST = (_TOKENS, _DELIVERIES)  # routes that take /<something> after their path


class OperatorRoutes:
    __slots__ = ("worker", "routes")

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.routes: dict[bytes, Callable[[Request, bytes], None]] = {
            b"/healthz": self.healthz,
            b"/stats": self.stats,
            b"/metrics": self.metrics,
            b"/stats/events": self.stats_events,
            b"/dashboard": self.dashboard,
            _TOKENS: self.admin_tokens,
            b"/admin/faults": self.admin_faults,
            b"/admin/auth": self.admin_auth,
            _DELIVERIES: self.admin_deliveries,
        }

    def handle(self, request: Request) -> None:
        base, rest = request.path, b""
        for route in _WITH_REST:
            if base.startswith(route + b"/"):
                base, rest = route, base[len(route) + 1:]
                break
        handler = self.routes.get(base)
        served_here = request.operator or self.worker.config.admin_listen is None
        if handler is None or (base != b"/healthz" and not served_here):
            request.answer(answers.error(404, "BadPath"))
            return
        handler(request, rest)

    def healthz(self, request: Request, rest: bytes) -> None:
        request.answer(Answer(200, b"ok\n", answers.TEXT))

    def stats(self, request: Request, rest: bytes) -> None:
        self.worker.router.collect_stats(
            lambda doc: request.answer(answers.json(200, doc, indent=True)))

    def metrics(self, request: Request, rest: bytes) -> None:
        self.worker.router.collect_stats(
            lambda doc: request.answer(Answer(200, render_metrics(doc), _METRICS_TYPE)))

    def stats_events(self, request: Request, rest: bytes) -> None:
        """The figures as SSE, one event a second, served by worker 0 (``statsevents.py``)."""
        if request.method != b"GET":
            request.answer(answers.error(405, "MethodNotAllowed"))
            return
        request.become_stream(VIEWER_TOKEN)

    def dashboard(self, request: Request, rest: bytes) -> None:
        if request.method != b"GET":
            request.answer(answers.error(405, "MethodNotAllowed"))
            return
        request.answer(dashboard.ANSWER)

    def admin_tokens(self, request: Request, rest: bytes) -> None:
        """GET lists; PUT/POST /admin/tokens/<hex> {"state": ...}; DELETE one or all."""
        method = request.method
        if method == b"GET" and not rest:
            request.answer(answers.json(200, self.worker.admin.describe_tokens()))
        elif method in (b"PUT", b"POST") and rest:
            body = _json_body(request)
            if body is not None:
                self._apply(request, {**body, "op": "set_token", "token": rest.decode("latin-1")})
        elif method == b"DELETE" and rest:
            self._apply(request, {"op": "set_token", "token": rest.decode("latin-1"),
                                  "state": "active"})
        elif method == b"DELETE":
            self._apply(request, {"op": "clear_tokens"})
        else:
            request.answer(answers.error(405, "MethodNotAllowed"))

    def admin_faults(self, request: Request, rest: bytes) -> None:
        """GET lists; POST adds one rule; PUT replaces all ({"rules": [...]}); DELETE clears."""
        method = request.method
        if method == b"GET":
            request.answer(answers.json(200, self.worker.admin.describe_faults()))
        elif method in (b"POST", b"PUT"):
            body = _json_body(request)
            if body is not None:
                op = "add_fault" if method == b"POST" else "set_faults"
                self._apply(request, {**body, "op": op})
        elif method == b"DELETE":
            self._apply(request, {"op": "clear_faults"})
        else:
            request.answer(answers.error(405, "MethodNotAllowed"))

    def admin_auth(self, request: Request, rest: bytes) -> None:
        """GET lists; POST adds revocations or sets the clock offset; PUT replaces the whole
        state; DELETE clears it (``auth_admin.py``)."""
        method = request.method
        if method == b"GET":
            request.answer(answers.json(200, self.worker.admin.auth.describe()))
        elif method in (b"POST", b"PUT"):
            body = _json_body(request)
            if body is not None:
                self._apply(request, {**body, "op": "update_auth" if method == b"POST"
                                      else "set_auth"})
        elif method == b"DELETE":
            self._apply(request, {"op": "clear_auth"})
    def admin_deliveries(self, request: Request, rest: bytes) -> None:
        """GET ?token=<hex>: its pending push and recent deliveries; GET /<apns-id>: that
        push's fate; POST {"apns_ids": [...]}: the fate of each (``deliveries.py``)."""
        from rawsse.apns.routes import query_value  # routes imports this module

        find = self.worker.router.find_deliveries
        if request.method == b"GET" and rest:
            apns_id = rest.decode("latin-1")
            if not is_apns_id(rest):
                request.answer(answers.error(400, "BadMessageId"))
                return
            deliveries.find_then_confirm(find, [apns_id], lambda found, by_token: _answer_fate(
                request, apns_id, found, by_token))
        elif request.method == b"GET":
            try:
                token = parse_token(query_value(request.query, b"token"), False).hex()
            except PushRejected as rejected:
                request.answer(answers.error(rejected.status, rejected.reason))
                return
            find({"tokens": [token]}, lambda found: _answer(
                request, deliveries.Found(found), lambda f: deliveries.token_document(token, f)))
        elif request.method == b"POST":
            ids = _apns_ids(request)
            if ids is not None:
                deliveries.find_then_confirm(find, ids, lambda found, by_token: _answer(
                    request, found, lambda f: deliveries.fates(ids, f, by_token)))
        else:
            request.answer(answers.error(405, "MethodNotAllowed"))

    def _apply(self, request: Request, command: dict[str, Any]) -> None:
        """Apply here, then on every other worker (and node) before answering. ``apply``
        checks every field before it changes anything and only commands whose values every
        worker, the mesh and Redis can carry pass (``admin.py``), so a change is refused
        everywhere or held everywhere."""
        command.pop("stamp", None)  # an operator's change is stamped when applied (admin.py)
        admin = self.worker.admin
        try:
            answer = admin.apply(command)
        except AdminError as exc:
            request.answer(answers.json(400, {"reason": "BadAdminRequest", "detail": str(exc)}))
            return
        self.worker.router.share_admin(admin.replayable(command),
                                       lambda: request.answer(answers.json(200, answer)))


_LOG_OFF = {"reason": "DeliveryLogOff",
            "detail": "no delivery log is kept: the node runs with --delivery-log 0"}


def _answer(request: Request, found: "deliveries.Found",
            document: Callable[["deliveries.Found"], dict[str, Any]]) -> None:
    if found.off:
        request.answer(answers.json(409, _LOG_OFF))
    else:
        request.answer(answers.json(200, document(found), indent=True))


def _answer_fate(request: Request, apns_id: str, found: "deliveries.Found",
                 by_token: "deliveries.Found | None") -> None:
    events = found.of_id(apns_id)
    if found.off:
        request.answer(answers.json(409, _LOG_OFF))
    elif not events:
        request.answer(answers.json(404, {
            "reason": "UnknownApnsId", "late_nodes": found.late,
            "detail": "no delivery log holds this apns-id (each keeps its worker's last "
                      "--delivery-log outcomes)"}))
    else:
        request.answer(answers.json(200, deliveries.fate_document(apns_id, events, by_token,
                                                                  found.late), indent=True))


def _apns_ids(request: Request) -> list[str] | None:
    """The body's ``apns_ids`` (each a UUID, at most ``MAX_IDS``), or None once answered 400."""
    body = _json_body(request)
    if body is None:
        return None
    ids = body.get("apns_ids")
    problem = ""
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        problem = 'the body must be {"apns_ids": ["<uuid>", ...]}'
    elif len(ids) > deliveries.MAX_IDS:
        problem = f"{len(ids)} apns_ids: at most {deliveries.MAX_IDS} per request"
    elif not all(is_apns_id(i.encode("latin-1", "replace")) for i in ids):
        problem = "every apns_id must be a UUID (8-4-4-4-12 hex digits)"
    if problem:
        request.answer(answers.json(400, {"reason": "BadAdminRequest", "detail": problem}))
        return None
    return ids


def _json_body(request: Request) -> dict[str, Any] | None:
    """The request's JSON object (a bare string is a fault rule), or None once answered 400."""
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        request.answer(answers.json(400, {"reason": "BadAdminRequest",
                                          "detail": f"body is not JSON: {exc}"}))
        return None
    if isinstance(body, str):  # a bare rule string is accepted as {"rule": ...}
        body = {"rule": body}
    if not isinstance(body, dict):
        request.answer(answers.json(400, {"reason": "BadAdminRequest",
                                          "detail": "body must be a JSON object"}))
        return None
    body.pop("op", None)
    return body
