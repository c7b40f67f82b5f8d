"""What each request means: the APNs push route, the SSE route, broadcast, operator and admin.

``handle(request)`` runs once per complete request, whatever protocol made it (``Request`` in
``rawsse/server/exchange.py``); ``body_limit(request)`` lets a protocol refuse an oversized body
before reading it. Handlers answer through the request (``request.answer(Answer)`` now or later,
``request.become_stream(token)``) and reach the rest of the node through the worker's ``Router``
(``routing.py``); they never touch a socket, a parser or a status line.

Route map:
  POST /3/device/<token>      push (APNs provider API)             public listener
  GET  /events?token=<hex>    device stream (SSE)                  public listener
  POST /broadcast[?prefix=]   one event to every stream            public listener
  GET  /healthz               liveness                             both listeners
  GET  /stats, /metrics       JSON and Prometheus                  operator listener*
  GET  /dashboard             the live view (a page)               operator listener*
  GET  /stats/events          its figures, SSE, one a second       operator listener*
  /admin/tokens[/<hex>]       per-token simulated states           operator listener*
  /admin/faults               fault rules                          operator listener*
  /admin/auth                 revoked keys and certificates         operator listener*
  /admin/deliveries[/<id>]    what became of pushes (delivery log) operator listener*
  (* the public listener too with --admin-listen public)

The push path, one for every push: once checked and its frame made, a push is one call,
``worker.router.submit_plain``, with its fields (no ``Push`` and, where its 200 is plain: no
--response-delay, no sandbox id, no partial or callback made for it). The router knows where
the token lives (``routing.py``). In a one-worker node that call is the owner's
``take_plain`` itself (``Delivery.take_plain``: written to the device's live stream at once,
else ``Delivery.accept``); in a prefork worker it is ``Mesh.submit_plain``, which computes
``owner_of`` once and hands this worker's shard to the same ``take_plain`` or forwards the
push. What this worker's owner decided is the call's value, answered here at once (a plain
200 by ``Channel.answer_ok``, no ``Answer``); ``None``: the push went elsewhere and is
answered once its owner holds it. Its clock is the loop turn's (``loop.now``, and
``wall_offset`` for unix time), not a call per push.

A new admin route is one entry in ``Routes._operator`` and a handler (see ``operator.py``);
a new APNs reason is a row in ``apple.REASON_STATUS`` and a check in ``validation.py``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from rawsse.apns import answers
from rawsse.apns.apple import REASON_STATUS
from rawsse.apns.deliverylog import wall_offset
from rawsse.apns.operator import OperatorRoutes
from rawsse.apns.routing import HELD, UNREACHABLE, Accepted
from rawsse.apns.validation import (
    PushRejected, answer_id, check_push, parse_broadcast_prefix, parse_token,
    payload_limit,
)
from rawsse.server import sse
from rawsse.server.sse import CR, LF, ONE_LINE_EVENT
from rawsse.server.exchange import Answer, Request

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

PUSH_PREFIX = b"/3/device/"
_PUSH_PREFIX_LEN = len(PUSH_PREFIX)
# A byte as an int: ``b"/" in text`` first tries its operand as an integer, and the TypeError it
# raises and clears inside costs ~2,000 instructions (callgrind), ``SLASH in text`` a memchr.
SLASH = ord("/")
# The largest body a non-push route reads (admin JSON); the protocols discard what is beyond it.
OTHER_BODY_LIMIT = 1024 * 1024


class Routes:
    __slots__ = ("worker", "config", "stats", "operator", "development", "auth", "answer_now",
                 "default_delay", "plain_200", "_answered", "wall_offset")

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.config = config = worker.config
        self.stats = worker.stats
        self.operator = OperatorRoutes(worker)
        self.development = config.environment == "development"
        # Decided once, not per push: no --response-delay, no --delivery-delay to sample.
        self.answer_now = config.response_delay.is_zero
        # A 200 that is only its apns-id, now: no --response-delay, no sandbox unique id.
        self.plain_200 = self.answer_now and not self.development
        self.default_delay = None if config.delivery_delay.is_zero else config.delivery_delay
        # Bound once: each push's answer is a partial of it (one C object, no closure cells,
        # and no Python frame of its own when called, as a lambda would have).
        self._answered = self._push_answered
        self.auth = worker.auth  # None under --auth off
        # Unix time = the loop's monotonic ``now`` + this, reset every tick (``reset_clock``):
        # a push reads the clock of its loop turn, not ``time.time()`` (a call per push).
        self.wall_offset = wall_offset()

    def reset_clock(self) -> None:
        """Follow the wall clock (NTP slews it, an operator may set it): once a tick."""
        self.wall_offset = wall_offset()

    # -- entry points from a protocol ---------------------------------------------------------

    def body_limit(self, request: Request) -> int:
        """The largest body ``request`` may carry (Apple's 4096 or 5120 for a push)."""
        if request.path.startswith(PUSH_PREFIX):
            return payload_limit(request.headers)
        return OTHER_BODY_LIMIT

    def handle(self, request: Request) -> None:
        path = request.path
        if path[:_PUSH_PREFIX_LEN] == PUSH_PREFIX and not (request.body_too_large
                                                           or request.operator):
            self.push(request, path[_PUSH_PREFIX_LEN:])  # nearly every request
        elif request.body_too_large:
            self.stats.reject(413, "PayloadTooLarge")
            apns_id = self._answer_id(request)
            if path.startswith(PUSH_PREFIX):
                self._log_rejection(apns_id, None, 413, "PayloadTooLarge")
            request.answer(answers.error(413, "PayloadTooLarge", apns_id))
        elif request.operator and (path.startswith(PUSH_PREFIX) or path == b"/events"):
            # The operator listener serves operators only: pushes and devices use --listen.
            request.answer(answers.error(404, "BadPath"))
        elif path == b"/events":
            self.events(request)
        elif path == b"/broadcast":
            self.broadcast(request)
        else:
            self.operator.handle(request)

    def answer(self, request: Request, answer: Answer) -> None:
        """Answer a push now, or after ``--response-delay``."""
        delay = self.config.response_delay
        if delay.is_zero:
            request.answer(answer)
        else:
            self.worker.loop.call_later(delay.sample(), request.answer, answer)

    # -- POST /3/device/<token> ---------------------------------------------------------------

    def push(self, request: Request, token_text: bytes) -> None:
        worker = self.worker
        if request.method != b"POST":
            self.stats.reject(405, "MethodNotAllowed")
            request.answer(answers.error(405, "MethodNotAllowed", self._answer_id(request)))
            return
        if SLASH in token_text:
            self.stats.reject(404, "BadPath")
            request.answer(answers.error(404, "BadPath", self._answer_id(request)))
            return
        self.stats.pushes_received += 1
        received = worker.loop.now
        now = received + self.wall_offset
        if self.auth is not None:  # --auth token|cert|any: once per connection (auth.py)
            reason = self.auth.refusal(request, now)
            if reason is not None:
                self._push_error(request, self._answer_id(request), REASON_STATUS[reason], reason)
                return
        config = self.config
        try:
            apns_id, token, expires, delay_given = check_push(
                request, token_text, now, config.default_ttl, config.strict_tokens, worker.ids)
        except PushRejected as rejected:
            self._push_error(request, self._answer_id(request), rejected.status, rejected.reason)
            return
        admin = worker.admin
        if admin.token_states or admin.faults:  # a simulated outcome is set: not the hot path
            if self._simulated(request, apns_id, token, now):
                return
        body = request.body
        frame = (ONE_LINE_EVENT % (apns_id, body) if LF not in body and CR not in body
                 else sse.encode_event(apns_id, body))
        distribution = delay_given or self.default_delay
        delay = 0.0 if distribution is None else distribution.sample()
        # Read, then called: ``router.submit_plain(...)`` is a method call's lookup, which
        # Python 3.11 does not specialize for an instance attribute (~120 instructions more a
        # call, callgrind).
        submit_plain = worker.router.submit_plain
        if self.plain_200:  # the hot path: one call, no Push, partial or callback made
            accepted = submit_plain(token, frame, expires, received, delay, self._answered,
                                    request, apns_id)
            if accepted is HELD:  # this worker owns the token and holds the push now
                self.stats.pushes_ok += 1
                request.channel.answer_ok(request, apns_id)
                return
        else:  # --response-delay or the sandbox's unique id: a forwarded push's answer is ours
            accepted = submit_plain(token, frame, expires, received, delay,
                                    partial(self._answered, request, apns_id), None, b"")
        if accepted is not None:  # this worker's owner decided (None: answered when held)
            self._push_answered(request, apns_id, accepted)

    def _simulated(self, request: Request, apns_id: bytes, token: bytes, now: float) -> bool:
        """Answer the push as its token's state or a fault rule says, if one does."""
        admin = self.worker.admin
        outcome = admin.token_outcome(token)
        if outcome is not None:
            self._push_error(request, apns_id, *outcome, token=token)
            return True
        fault = admin.pick_fault()
        if fault is not None:
            self.stats.faulted += 1
            timestamp = int(now * 1000) if fault.status == 410 else None
            self._push_error(request, apns_id, fault.status, fault.reason, timestamp,
                             token)
            return True
        return False

    def _answer_id(self, request: Request) -> bytes:
        """The apns-id an answer carries (``validation.answer_id``)."""
        return answer_id(request.apns_id, self.worker.ids)

    def _push_answered(self, request: Request, apns_id: bytes, accepted: Accepted) -> None:
        """200 once the owner of the token holds the push; 503 when a bounded queue was full
        or the owner is unreachable, so the sender retries (never a 200 that is then dropped)."""
        if accepted is HELD:
            self.stats.pushes_ok += 1
            if self.development:  # Apple's sandbox: an id to look the push up in its console
                answer = Answer(200, b"", None, ((b"apns-id", apns_id),
                                                 (b"apns-unique-id", self.worker.ids.new())))
            else:
                answer = Answer(200, b"", None, ((b"apns-id", apns_id),))
            if self.answer_now:  # the hot path: no further call
                request.channel.answer(request, answer)
            else:
                self.answer(request, answer)
            return
        if accepted is UNREACHABLE:  # the owner worker, node or Redis
            self.stats.owner_unavailable += 1
        else:  # a bounded queue is full: back-pressure
            self.stats.queue_full += 1
        self.stats.reject(503, "ServiceUnavailable")
        self._log_rejection(apns_id, None, 503, "ServiceUnavailable")
        self.answer(request, answers.error(503, "ServiceUnavailable", apns_id))

    def _push_error(self, request: Request, apns_id: bytes, status: int, reason: str,
                    timestamp: int | None = None, token: bytes | None = None) -> None:
        self.stats.reject(status, reason)
        self._log_rejection(apns_id, token, status, reason)
        if status == 410 and timestamp is None:
            timestamp = int(time.time() * 1000)
        self.answer(request, answers.error(status, reason, apns_id, timestamp))

    def _log_rejection(self, apns_id: bytes, token: bytes | None, status: int,
                       reason: str) -> None:
        """Record a refused push in the delivery log (``deliverylog.py``), if it is on."""
        log = self.worker.registry.log
        if log is not None:
            log.rejected(apns_id, token, status, reason)

    # -- GET /events?token= -------------------------------------------------------------------

    def events(self, request: Request) -> None:
        if request.method != b"GET":
            request.answer(answers.error(405, "MethodNotAllowed"))
            return
        try:
            token = parse_token(query_value(request.query, b"token"), self.config.strict_tokens)
        except PushRejected as rejected:
            request.answer(answers.error(rejected.status, rejected.reason))
            return
        request.become_stream(token)

    # -- POST /broadcast ----------------------------------------------------------------------

    def broadcast(self, request: Request) -> None:
        if request.method != b"POST":
            request.answer(answers.error(405, "MethodNotAllowed"))
            return
        body = request.body
        if not body:
            request.answer(answers.error(400, "PayloadEmpty"))
            return
        # A broadcast reaches every device as a push, so Apple's payload and apns-id rules hold
        # for it too; they also keep every line of the event under the 8192 bytes Fleet's
        # device client reads per line (fleetdm/fleet pkg/mdm/apnsmock/client.go),
        # which a longer line would disconnect.
        if len(body) > payload_limit(request.headers):
            self.stats.reject(413, "PayloadTooLarge")
            request.answer(answers.error(413, "PayloadTooLarge"))
            return
        given = request.apns_id
        if given is not None and request.bad_id:
            request.answer(answers.error(400, "BadMessageId"))
            return
        apns_id = given if given else self.worker.ids.new()
        try:
            prefix_text = parse_broadcast_prefix(query_value(request.query, b"prefix"))
        except PushRejected as rejected:
            request.answer(answers.error(rejected.status, rejected.reason))
            return
        frame = sse.encode_event(apns_id, body)  # the same bytes on every stream of every node
        self.worker.router.broadcast(frame, prefix_text.decode(),
                                     lambda reached: request.answer(answers.json(
                                         200, {"apns_id": apns_id.decode(), **reached})))


def query_value(query: bytes, name: bytes) -> bytes:
    """The first value of ``name`` in a query string (percent-decoded), or b""."""
    if not query:
        return b""
    prefix = name + b"="
    for part in query.split(b"&"):
        if part.startswith(prefix):
            value = part[len(prefix):]
            return unquote_to_bytes(value) if b"%" in value else value
    return b""
