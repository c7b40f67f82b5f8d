"""An HTTP/1.1 connection's answers: the pipelining queue, written in request order.

Theory of operation
-------------------
``Http1Connection`` (``http1.py``) reads requests and queues each in ``responses`` as it
completes; this class is its half that the routes see (the ``Channel`` of ``exchange.py``:
``answer``, ``become_stream``) and that turns answers into bytes in ``out``: an answer fills its
request's ``slot`` now or later (a push waiting for its owner worker, ``--response-delay``), and
only the answered prefix of the queue is serialized (``http1_wire.py``), then written by the
read that brought the requests, or once per loop turn (``connection.py``). It also keeps epoll
interest in step with what the connection can do (``_update_events``): reading pauses while
``MAX_QUEUED`` requests are unanswered or ``MAX_OUT`` bytes unsent.

Rules
-----
- RFC 9112 §9.3.2: answers leave in request order; after an answer with ``Connection: close``
  nothing more is written (§9.6); a device stream takes the socket once every answer before
  its ``GET /events`` is out.
- The common case costs the fewest calls: a 200 without a body (a push's) at the head of the
  queue on a kept-alive connection is appended to ``out`` from its preformatted status and Date
  lines in ``answer`` itself (``answer_ok``: a push's plain 200, with no ``Answer`` made),
  and the write at the end of a read skips ``_finished`` and
  ``_update_events`` when nothing they decide can change.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from time import time

import httptools

from rawsse.apns import answers
from rawsse.server import http1_wire as wire
from rawsse.server.connection import GONE, LINGER, READABLE, ClientConnection
from rawsse.server.exchange import Answer, Request
from rawsse.server.loop import EPOLLOUT
from rawsse.server.transport import SocketTransport

log = logging.getLogger("rawsse.server.http1")  # the connection's logger, as before the split

# What the connection does once a request's answer is written (``Request.after``).
KEEP, CLOSE, KEEP_10, STREAM, INTERIM = 0, 1, 2, 3, 4

MAX_QUEUED = 256  # unanswered pipelined requests before reading pauses
# The same on the operator listener, where no scraper pipelines and each /stats or /metrics
# asks every worker and renders ~7 KB: 1,000 pipelined /metrics on one connection to a 2-worker
# node took 0.35 s of the worker's loop (``render_metrics`` alone 255 us, timed with timeit), so
# 256 queued on each of 20 connections held a worker for seconds.
MAX_QUEUED_OPERATOR = 4
MAX_OUT = 256 * 1024  # unsent response bytes before reading pauses

_CONNECTION = (wire.KEEP, wire.CLOSE, wire.KEEP_ALIVE_10)  # indexed by KEEP, CLOSE, KEEP_10
_DATE, _EMPTY_BODY = wire.DATE, wire.EMPTY_BODY  # (DATE is updated in place)
# ``answer_ok``'s pieces: the apns-id line around the id, and what stands for its answer.
_APNS_ID_LINE, _CRLF_EMPTY_BODY = b"apns-id: ", b"\r\n" + wire.EMPTY_BODY
_PLAIN_200 = Answer(200)


class Http1Answers(ClientConnection):
    """The answering half of ``Http1Connection`` (which alone is ever made)."""

    __slots__ = ("parser", "request", "operator", "responses", "reading", "closing", "held")

    parser: httptools.HttpRequestParser | None  # dropped once nothing more is parsed
    request: Request | None  # the request being parsed (http1.py)
    operator: bool  # accepted on the operator (admin) listener
    responses: deque[Request]  # requests in order, each until its answer is written
    reading: bool
    closing: bool  # the last answer is queued: nothing after it is read or written
    held: bytes | None  # read but not parsed yet: the queue was full (http1.py)

    def _parse_held(self) -> None:
        """Parse what was held back once the queue has room again (http1.py)."""
        raise NotImplementedError

    # -- answers (the Channel of exchange.py) -----------------------------------------------

    def answer(self, request: Request, answer: Answer) -> None:
        """Fill ``request``'s place in the queue; written once every earlier one is."""
        if request.slot is not None:
            return
        request.slot = answer
        if answer.close:
            request.after = CLOSE
        if self.fd < 0:
            return
        responses = self.responses
        if request.after == KEEP and responses and responses[0] is request:
            # The common case (a push answered during the read that brought it, nothing earlier
            # unanswered): its bytes go to ``out`` here, without _write_ready's loop; a 200
            # with no body (a push's) is its preformatted status and Date lines and its header
            # lines, as serialize() would write them, without a call.
            responses.popleft()
            out = self.out
            if answer.status == 200 and not answer.body and answer.content_type is None:
                if time() >= _DATE[0]:
                    wire.date_header()
                out += _DATE[2]
                for name, value in answer.headers:
                    out += name + b": " + value + b"\r\n"
                out += _EMPTY_BODY
            else:
                out += wire.serialize(answer)
            if self.flush_scheduled:
                if not responses or responses[0].slot is None:
                    return  # written at the end of the read, or of the turn
            elif not responses:
                # Answered outside a read (a forwarded push, once its owner holds it) with
                # nothing else queued: written now, not by a flush at the end of the turn (a
                # call_soon and three calls per forwarded push). Answers that come together
                # for one connection still leave in one write: the first schedules the flush.
                self._flush()
                return
        self._write_ready()

    def answer_ok(self, request: Request, apns_id: bytes) -> None:
        """``answer`` of a push's plain 200 carrying ``apns_id``: in the common case (at the
        head of the queue on a kept-alive connection) its status and Date lines and its one
        header line go to ``out`` with no ``Answer`` made; otherwise it is ``answer``'s."""
        responses = self.responses
        if (request.slot is None and request.after == KEEP and self.fd >= 0 and responses
                and responses[0] is request):
            request.slot = _PLAIN_200  # answered: a second answer is ignored
            responses.popleft()
            if time() >= _DATE[0]:
                wire.date_header()
            out = self.out
            out += _DATE[2]
            out += _APNS_ID_LINE + apns_id
            out += _CRLF_EMPTY_BODY
            if self.flush_scheduled:
                if not responses or responses[0].slot is None:
                    return  # written at the end of the read, or of the turn
            elif not responses:  # answered outside a read, nothing else queued (answer)
                self._flush()
                return
            self._write_ready()
            return
        self.answer(request, Answer(200, b"", None, ((b"apns-id", apns_id),)))

    def become_stream(self, request: Request, token: bytes) -> None:
        """After earlier answers are out, hand the socket to a device stream for ``token``."""
        request.slot, request.after = token, STREAM
        self._write_ready()

    def refuse(self, status: int, reason: str, detail: str) -> None:
        """Malformed HTTP: a JSON 4xx and a close; nothing after it is parsed (a request that
        completed later would be served, its answer never written). Counted; logged at debug."""
        self.host.stats.bad_requests += 1
        log.debug("fd %d: %d %s (%s)", self.fd, status, reason, detail)
        self.parser = None
        self._queue_answer(answers.error(status, reason), CLOSE)

    def _queue_answer(self, answer: Answer, after: int) -> None:
        """An answer that belongs to no complete request (a protocol error, a refusal)."""
        request = Request(self, self.operator)
        request.after = after
        self.responses.append(request)
        self.answer(request, answer)

    def _write_ready(self) -> None:
        responses = self.responses
        out = self.out
        while responses and responses[0].slot is not None:
            request = responses.popleft()
            after = request.after
            if after == STREAM:
                self._hand_to_stream(request.slot)
                return
            if after == INTERIM:
                out += request.slot
                continue
            out += wire.serialize(request.slot, _CONNECTION[after])
            if after == CLOSE:
                self.closing = True
                responses.clear()
                break
        if not self.flush_scheduled:  # (set while a read is parsed: _read writes at its end)
            self.schedule_flush()

    def _finished(self) -> bool:
        # Half-close only once every answer is out: a client that shut down its side after
        # sending may still be owed a push answer another worker has not acknowledged yet.
        return self.closing and not self.responses

    def _flush(self) -> None:
        """Write ``out``. The common case (a plain socket reading on, nothing held, the queue
        short) keeps reading and needs no EPOLLOUT once the write took everything: nothing
        for ``_finished`` and ``_update_events`` to change, so they are not called."""
        out = self.out
        if (not out or self.closing or self.events != READABLE or self.held is not None
                or self.transport.__class__ is not SocketTransport
                or len(self.responses) >= MAX_QUEUED_OPERATOR):
            ClientConnection._flush(self)
            return
        # The plain socket's write as ClientConnection._flush makes it (its _PLAIN note), here
        # rather than in a method both call: that would be a call more on every HTTP/2 flush.
        try:
            written = os.write(self.fd, out)
        except BlockingIOError:
            written = 0
        except GONE:
            self.close("client")
            return
        del out[:written]
        if out:
            self._update_events()  # EPOLLOUT until the rest is written

    def _update_events(self) -> None:
        if self.fd < 0:
            return
        limit = MAX_QUEUED_OPERATOR if self.operator else MAX_QUEUED
        self.reading = reading = (not self.closing and len(self.out) < MAX_OUT
                                  and len(self.responses) < limit)
        if reading and self.held is not None:
            self.host.loop.call_soon(self._parse_held)
        events = (READABLE if reading or self.state == LINGER else 0) | (EPOLLOUT if self.out else 0)
        if events != self.events:
            self.events = events
            self.host.loop.modify(self.fd, events)

    def _hand_to_stream(self, token: bytes) -> None:
        self.fd = -1
        fd = self.transport.detach()
        # Break the parser <-> protocol and request <-> protocol cycles at once (no GC needed).
        self.parser = None
        self.request = None
        self.host.http_conns.discard(self)
        self.host.place_stream(fd, token, bytes(self.out), self.events)
