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

from rawsse.apns import answers
from rawsse.apns.admin import AdminError
from rawsse.server import dashboard
from rawsse.server.exchange import Answer, Request
from rawsse.server.metrics import render_metrics
from rawsse.server.statsevents import VIEWER_TOKEN

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_TOKENS = b"/admin/tokens"


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
        }

    def handle(self, request: Request) -> None:
        base, rest = request.path, b""
        if base.startswith(_TOKENS + b"/"):
            base, rest = _TOKENS, base[len(_TOKENS) + 1:]
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
