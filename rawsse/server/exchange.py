"""The protocol seam: a request and its answer as the routes see them, whatever the wire.

Theory of operation
-------------------
A protocol object (HTTP/1.1 today in ``http1.py``; an HTTP/2 stream next) turns bytes into a
``Request`` and hands it to the application (``rawsse.apns.routes.Routes``), which answers by
calling ``request.answer(Answer(...))`` now or later (a push waits for the worker owning its
token), or ``request.become_stream(token)`` for a device; a push's plain 200 (its apns-id the
one header) is ``channel.answer_ok(request, apns_id)``, which each protocol writes without an
``Answer`` object. The request carries its ``channel``,
the protocol object that serializes the answer onto its own wire; the routes never see a socket,
a parser or a status line, so they are tested in-process by feeding a ``Request`` whose channel
records answers (``tests/test_routes.py``).

This is hypercorn's shape (``pgjones/hypercorn src/hypercorn/protocol/events.py``: one small
vocabulary between every protocol and the application) without its cost: one slotted object per
request, and the HTTP/1.1 connection keeps that same object as the request's place in its
pipelining queue, so a push allocates no separate event or response slot.

Rules
-----
- ``headers`` holds only the headers a route reads (``apple.REQUEST_HEADERS``), lower-cased,
  but apns-id, which is ``apns_id`` (None when absent; ``bad_id``: not a canonical UUID);
  ``duplicate`` is set when one that may appear once (``apple.SINGLE_HEADERS``) came twice;
  ``plain``, by a parser that knows (``http1_fast.py``), when none came twice and none but
  apns-id is one the push route checks (``validation.CHECKED_HEADERS``): it reads none.
  They are decided here, once, for every protocol (``add_header``), or by a parser that reads
  the same (``http1_fast.py``).
- ``headers`` is read-only once the request is complete: the HTTP/1.1 fast path hands every
  request with the same header block one shared dict (no copy per push).
- ``body_too_large``: the body went past what any route reads; it was discarded, not kept.
- ``operator``: the request came in on the operator listener (``--admin-listen``).
- An answer is given once; ``channel`` ignores a second one.
"""

from __future__ import annotations

from typing import Any, Protocol

from rawsse.apns.apple import REQUEST_HEADERS, SINGLE_HEADERS, UUID_FORM, UUID_SHAPE

APNS_ID = b"apns-id"
_HEADERS = REQUEST_HEADERS - {APNS_ID}  # what ``headers`` keeps


class Answer:
    """A response as the routes give it: status, extra header lines, body and content type."""

    __slots__ = ("status", "body", "content_type", "headers", "close")

    def __init__(self, status: int, body: bytes = b"", content_type: bytes | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = (), close: bool = False) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers  # (name, value) pairs beyond Date, Content-Type, Content-Length
        self.close = close  # the connection ends after this answer (malformed input)


class Channel(Protocol):
    """What a protocol object offers the requests it made."""

    auth: Any  # what the connection proved to the push route (rawsse/apns/auth.py)

    def answer(self, request: "Request", answer: Answer) -> None: ...

    def answer_ok(self, request: "Request", apns_id: bytes) -> None:
        """``answer(request, Answer(200, headers=((b"apns-id", apns_id),)))``, a push's plain
        200, without the ``Answer`` where the wire can do without (the push route's hot path)."""

    def become_stream(self, request: "Request", token: bytes) -> None: ...

    def authenticated(self) -> None: ...


class Request:
    """One request: what it asks (method, path, query, the kept headers, body) and where its
    answer goes (``channel``). ``slot`` and ``after`` belong to the channel (HTTP/1.1: the
    serialized answer once given, and what the connection does after writing it)."""

    __slots__ = ("method", "path", "query", "headers", "apns_id", "bad_id", "duplicate", "plain",
                 "body", "body_too_large", "operator", "channel", "slot", "after")

    def __init__(self, channel: Channel, operator: bool, method: bytes = b"", path: bytes = b"",
                 query: bytes = b"", headers: dict[bytes, bytes] | None = None,
                 duplicate: bool = False, body: bytes = b"", after: Any = None,
                 apns_id: bytes | None = None, plain: bool = False) -> None:
        """Empty, for a parser to fill as it reads (httptools' callbacks, HTTP/2 frames), or
        whole, from a parser that read it at once (``http1_fast.py``: an ``apns_id`` it gives
        is a canonical UUID; it sets ``bad_id`` itself for one that is not)."""
        self.channel = channel
        self.operator = operator
        self.method = method
        self.path = path
        self.query = query
        self.headers: dict[bytes, bytes] = {} if headers is None else headers
        self.apns_id = apns_id
        self.bad_id = False
        self.duplicate = duplicate
        self.plain = plain
        self.body = body
        self.body_too_large = False
        self.slot: Any = None
        self.after = after

    def set_target(self, target: bytes) -> None:
        """Split a request target (``/3/device/abc?x=1``) into path and query."""
        self.path, _, self.query = target.partition(b"?")

    def add_header(self, name: bytes, value: bytes) -> None:
        """Keep a header a route reads (``name`` lower-case); flag a repeated single one and
        an apns-id that is not a UUID."""
        if name in _HEADERS:  # (the others first: no comparison more for each of them)
            headers = self.headers
            if name in headers and name in SINGLE_HEADERS:
                self.duplicate = True
            headers[name] = value
        elif name == APNS_ID:
            if self.apns_id is not None:
                self.duplicate = True
            self.apns_id = value
            self.bad_id = value.translate(UUID_SHAPE) != UUID_FORM

    def answer(self, answer: Answer) -> None:
        self.channel.answer(self, answer)

    def become_stream(self, token: bytes) -> None:
        """The device's SSE stream for ``token`` starts on this connection after this request."""
        self.channel.become_stream(self, token)
