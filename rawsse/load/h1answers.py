"""The answers to ``rawsse push``'s HTTP/1.1 requests, read in order (RFC 9112 §9.3.2).

Theory of operation
-------------------
A push's usual answer is a 200 with an empty body (``HTTP/1.1 200 OK``, ``Date``, ``apns-id``,
``Content-Length: 0``: rawsse's and every APNs mock's). ``AnswerReader.feed`` reads it with a few
bytes operations on the head (find its end, lower-case it, check the status line and that its one
``Content-Length`` is ``0``) and counts it, with no Python object per answer; from then on an
answer of the same layout (``_layout``: its length, and the same bytes but for header values)
is recognised with a few slice compares and no search. Any other answer
whose framing is as plain (an HTTP/1.1 status of 200-599 other than 204 and 304, one
``Content-Length`` of digits, no ``Connection`` or ``Transfer-Encoding``) is read the same way,
its body sliced out, and handed to the driver (``400`` with Apple's JSON reason, ``410`` with its
timestamp, ``503``...). An answer split over reads waits, unparsed, for the rest.

Anything else (a ``Connection`` header, chunked bodies, informational answers, a head or body
beyond ``HEAD_LIMIT``/``BODY_LIMIT``, bytes that are not HTTP) goes from that answer on to
httptools (llhttp) for the rest of the connection, which reads every case of RFC 9112 right:
``Connection: close`` ends the connection after its answer, a malformed answer ends it as
``bad_response``. A connection starts on the fast path again after a reconnect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from rawsse.load.driver import Driver

HEAD_LIMIT = 64 * 1024  # an answer head still open past this: httptools decides what it is
BODY_LIMIT = 1 << 20  # a body larger than this is streamed by httptools, not buffered here
_SPACE = ord(" ")
_INFORMATIONAL = ord("1")
_NO_BODY = (b"204", b"304")  # a Content-Length there does not frame a body (RFC 9112 §6.3)
_CONTENT_LENGTH = b"\r\ncontent-length:"
_APNS_ID = b"\r\napns-id:"
RELEARN = 64


class AnswerReader:
    """One connection's answers: ``feed`` each read; ``ended`` says why it must close."""

    __slots__ = ("driver", "plain", "layout", "relearn", "unparsed", "parser", "ended", "limit",
                 "answered", "body", "apns_id")

    def __init__(self, driver: "Driver") -> None:
        self.driver = driver
        self.plain = False  # a 200 is only counted (``reset``)
        # the last common answer's length and constant spans (``_layout``), learned again after
        # RELEARN common answers that did not fit it (a server's answers changed shape)
        self.layout: tuple[int, tuple[tuple[int, int, bytes], ...]] | None = None
        self.relearn = 1
        self.unparsed = b""  # the start of an answer whose end has not come yet
        self.parser: Any = None  # httptools, from the first answer the fast path does not read
        self.ended: str | None = None  # "closed" (Connection: close, out of step), "bad_response"
        # the httptools callbacks' state
        self.limit = self.answered = 0
        self.body: list[bytes] = []
        self.apns_id = b""

    def reset(self) -> None:
        """A new connection: the fast path again."""
        driver = self.driver  # no broadcast answer to read, no apns-id to note (--verify)
        self.plain = driver.broadcasts is None and driver.verify_ids is None
        self.unparsed = b""
        self.parser = None
        self.ended = None
        self.body = []

    def feed(self, data: bytes, limit: int) -> int:
        """The answers complete in what came so far, at most ``limit`` (the pushes in flight;
        one more is an answer to nothing asked: ``ended``); returns how many."""
        if self.parser is not None:
            return self._feed_parser(data, limit)
        if self.unparsed:
            data = self.unparsed + data
            self.unparsed = b""
        plain, layout = self.plain, self.layout
        pos = answered = common = 0
        size = len(data)
        while answered < limit:
            if layout is not None and pos + layout[0] <= size:  # the common answer again?
                for start, stop, constant in layout[1]:
                    if data[pos + start:pos + stop] != constant:
                        break
                else:
                    common += 1
                    answered += 1
                    pos += layout[0]
                    if pos == size:
                        break
                    continue
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = data[pos:end].lower()
            # the common answer: its one Content-Length (the first one found) is its last line,
            # "0"; ``find`` rather than ``in``, which tries the operand as an int first
            if (plain and head[:13] == b"http/1.1 200 " and head[-2:] == b" 0"
                    and head.find(_CONTENT_LENGTH) == len(head) - 19
                    and head.find(b"\r\nconnection:") < 0
                    and head.find(b"\r\ntransfer-encoding:") < 0):
                common += 1
                self.relearn -= 1
                if not self.relearn:
                    self.relearn = RELEARN
                    self.layout = layout = _layout(data[pos:end + 4])
                pos = end + 4
            else:
                body_end = self._plain_answer(data, pos, end, head)
                if body_end < 0 or body_end > size:  # for httptools; the body is still coming
                    break
                pos = body_end
            answered += 1
            if pos == size:
                break
        self.driver.accepted += common
        if pos < size:
            answered += self._rest(data, pos, limit - answered)
        return answered

    def _rest(self, data: bytes, pos: int, limit: int) -> int:
        """What follows the last answer read: the start of the next one (kept for the next
        read), an answer to nothing asked, or one for httptools from here on."""
        rest = data[pos:]
        end = rest.find(b"\r\n\r\n")
        if not limit and end >= 0:
            self.ended = "closed"  # an answer to nothing we asked: out of step
            return 0
        if end < 0 and len(rest) <= HEAD_LIMIT:
            self.unparsed = rest
            return 0
        if end >= 0:
            body_end = self._plain_answer(rest, 0, end, rest[:end].lower(), count=False)
            if 0 <= body_end and len(rest) < body_end:
                self.unparsed = rest
                return 0
        self.parser = httptools.HttpResponseParser(self)
        return self._feed_parser(rest, limit)

    def _plain_answer(self, data: bytes, pos: int, end: int, head: bytes,
                      count: bool = True) -> int:
        """An answer framed by one Content-Length: handed to the driver (when ``count``) once
        its body is here; returns where it ends (beyond ``data`` while the body is still
        coming), -1 when only httptools can read it."""
        status = head[9:12]
        if (not head.startswith(b"http/1.1 ") or len(head) < 13 or head[12] != _SPACE
                or not status.isdigit() or status[0] == _INFORMATIONAL or status in _NO_BODY
                or head.find(b"\r\nconnection:") >= 0
                or head.find(b"\r\ntransfer-encoding:") >= 0):
            return -1
        at = head.find(_CONTENT_LENGTH)
        if at < 0 or head.find(_CONTENT_LENGTH, at + 1) >= 0:
            return -1
        at += len(_CONTENT_LENGTH)
        line_end = head.find(b"\r\n", at)
        value = (head[at:] if line_end < 0 else head[at:line_end]).strip()
        if not value.isdigit() or int(value) > BODY_LIMIT:
            return -1
        body_end = end + 4 + int(value)
        if count and body_end <= len(data):
            apns_id = b""
            if self.driver.verify_ids is not None:
                apns_id = _field(data, pos, head, _APNS_ID)
            self.driver.answer(int(status), data[end + 4:body_end], apns_id)
        return body_end

    def _feed_parser(self, data: bytes, limit: int) -> int:
        self.limit, self.answered = limit, 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.ended is None:
                self.ended = "bad_response"
        return self.answered

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 7 and name.lower() == b"apns-id":
            self.apns_id = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        body = b"".join(self.body) if self.body else b""
        apns_id, self.apns_id, self.body = self.apns_id, b"", []
        if status < 200:  # informational (RFC 9110 §15.2): the answer is still to come
            return
        if self.answered == self.limit or self.ended is not None:
            self.ended = "closed"  # an answer to nothing we asked, or after Connection: close
            return
        self.answered += 1
        self.driver.answer(status, body, apns_id)
        if not parser.should_keep_alive():
            self.ended = "closed"


def _field(data: bytes, pos: int, head: bytes, name: bytes) -> bytes:
    """The value of header ``name`` (lower case, from ``\\r\\n`` to its colon) in the head that
    starts at ``pos`` of ``data`` (``head`` is it lower-cased), as sent; b"" without one."""
    at = head.find(name)
    if at < 0:
        return b""
    start = pos + at + len(name)
    return data[start:data.index(b"\r\n", start)].strip()


def _layout(answer: bytes) -> tuple[int, tuple[tuple[int, int, bytes], ...]]:
    """A common answer's length and its constant spans ``(start, end, bytes)``: everything but
    its header values (the status line, each ``\\r\\nName: ``, the last line ``Content-Length: 0``
    and the blank line whole). An answer of that length whose spans are all the same bytes has
    the same status and the same header names in the same places (a value holds no CRLF, RFC
    9110 §5.5), so it is the common answer too: a few slice compares, no search."""
    spans = []
    start = 0
    line_end = answer.find(b"\r\n")  # the status line's
    while True:
        line = line_end + 2
        line_end = answer.find(b"\r\n", line)
        if line_end >= len(answer) - 4:  # the last header: Content-Length: 0, constant
            break
        value = answer.find(b":", line) + 1
        while answer[value:value + 1] in (b" ", b"\t"):
            value += 1
        spans.append((start, value, answer[start:value]))
        start = line_end
    spans.append((start, len(answer), answer[start:]))
    return len(answer), tuple(spans)
