"""The other nodes of a cluster: who they are (``P nodes``), and asking each of them one question.

Used by the Redis agent (``agent.py``) for what needs every node's answer: a broadcast taken
here (``broadcast.py``), a deliveries query (``agent_deliveries.py``), and any other question of
that shape ("ask every node, wait a bounded time, name who did not answer"): register a topic
on every node with ``answer_with``, call ``ask``.

Membership
----------
Every agent's heartbeat (``beat``, each stats interval) puts its node in the sorted set
``P nodes`` with the time it lapses as its score (Unix ms, a few intervals ahead). A node is
*live* while its score is ahead of the clock. A node that stops beating (killed, hung, cut off
from Redis) is *lapsed*: it stays listed ``LAPSED_KEEP_SECONDS`` more, so a question asked
meanwhile names it as missing instead of forgetting it. A node that stops cleanly removes itself
(``leave``, at the start of its drain) and is not missed.

Questions
---------
``ask(topic, body, wait)`` publishes one message to each other live node's own channel
``P node:<id>`` (the one its agent already reads for routed pushes: no other subscription) and
waits at most ``wait`` seconds for the replies, which come back on this node's channel. The
outcome has each reply and names every node that did not give one, with why: lapsed; not
subscribed (``PUBLISH`` reached no one: its agent is down); no answer in time (stopped, hung or
slower than the wait: it may still act on the question); Redis unreachable (the nodes last seen
are named, or ``*`` when none was ever seen). This node is never asked: it answers for itself
without Redis.

Messages, beside ``scripts.py``'s ``P`` and ``E`` on the same channels::

    Q  id (u64)  topic length (u8)  topic  origin length (u8)  origin  body   a question
    R  id (u64)  node length (u8)  node  body                                 node's reply

Ids start at a random 64-bit value in each agent, so a reply meant for an agent that has been
replaced since (same node id) matches no question and is dropped, as is one after its wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from rawsse.cluster.pipeline import Pipeline
    from rawsse.cluster.scripts import Keys

log = logging.getLogger(__name__)

QUESTION, REPLY = b"Q", b"R"
MESSAGES = (QUESTION, REPLY)
# How long a node that stopped beating without leaving is still named as missing. Long enough
# for an operator to notice a node that died during a test run; a restarted node with the same
# --node-id simply beats again.
LAPSED_KEEP_SECONDS = 600.0
EVERY_OTHER = "*"  # stands for nodes that could not be named (none seen before Redis went down)

_HEAD = struct.Struct("!QB")  # id, then the length of the topic (question) or node (reply)
_LENGTH = struct.Struct("!B")

Handler = Callable[[bytes], Awaitable[bytes]]


@dataclass
class Outcome:
    """What ``ask`` got: each answering node's reply, and why each other node gave none."""

    replies: dict[str, bytes] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


class _Question:
    """One question in flight: the nodes it reached and their replies so far."""

    __slots__ = ("asked", "expected", "replies", "complete")

    def __init__(self) -> None:
        self.asked = False  # P nodes was read: ``expected`` is every node the question went to
        self.expected: set[str] = set()
        self.replies: dict[str, bytes] = {}
        self.complete = asyncio.Event()

    def add(self, node: str, body: bytes) -> None:
        if node in self.expected and node not in self.replies:
            self.replies[node] = body
            self.check()

    def check(self) -> None:
        if self.expected.issubset(self.replies):
            self.complete.set()


class Nodes:
    """This node's view of the others, and its questions to them (module docstring)."""

    def __init__(self, keys: "Keys", pipeline: "Pipeline", is_up: Callable[[], bool]) -> None:
        self.keys = keys
        self.me = keys.node.decode()
        self.key = keys.prefix + b"nodes"
        self.pipeline = pipeline
        self.is_up = is_up
        self.live: list[str] = []  # as of the last read, this node included
        self.lapsed: list[str] = []
        self.handlers: dict[bytes, Handler] = {}
        self.questions: dict[int, _Question] = {}
        self._next_id = random.getrandbits(64)
        self._answering: set[asyncio.Task[None]] = set()
        self.counters = dict.fromkeys(("questions_out", "questions_in", "unanswered"), 0)

    # -- membership ---------------------------------------------------------------------------

    async def beat(self, lapse_seconds: float) -> list[str]:
        """Our heartbeat, the long-lapsed pruned, then the live nodes (one pipelined batch)."""
        now_ms = _now_ms()
        replies = await asyncio.gather(
            self.pipeline.ask("ZADD", self.key, now_ms + int(lapse_seconds * 1000), self.keys.node),
            self.pipeline.ask("ZREMRANGEBYSCORE", self.key, "-inf",
                              now_ms - int(LAPSED_KEEP_SECONDS * 1000)),
            self._read(), return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return self.live

    async def read(self) -> list[str]:
        """The live nodes now (this one included); ``lapsed`` is refreshed too."""
        await self._read()
        return self.live

    async def _read(self) -> None:
        entries = await self.pipeline.ask("ZRANGE", self.key, 0, -1, "WITHSCORES")
        now_ms = _now_ms()
        live: list[str] = []
        lapsed: list[str] = []
        for name, score in _pairs(entries):
            (live if float(score) > now_ms else lapsed).append(name.decode(errors="replace"))
        self.live, self.lapsed = live, lapsed

    async def leave(self) -> None:
        """A clean stop: off the list at once, so no other node waits for us or misses us."""
        await self.pipeline.ask("ZREM", self.key, self.keys.node)

    # -- asking -------------------------------------------------------------------------------

    def answer_with(self, topic: bytes, handler: Handler) -> None:
        """Answer questions on ``topic`` with ``await handler(body)`` (the reply's body)."""
        self.handlers[topic] = handler

    async def ask(self, topic: bytes, body: bytes, wait: float) -> Outcome:
        """Ask every other live node; at most ``wait`` seconds (module docstring)."""
        outcome = Outcome()
        self.counters["questions_out"] += 1
        if not self.is_up():
            return self._unreachable(outcome)
        rid = self._new_id()
        question = self.questions[rid] = _Question()
        deadline = asyncio.get_running_loop().time() + wait
        try:
            async with asyncio.timeout_at(deadline):
                await self._publish(rid, topic, body, question, outcome)
                await question.complete.wait()
        except Exception as exc:  # the wait is over, or Redis went away while asking
            if not isinstance(exc, TimeoutError):
                log.warning("asking the other nodes failed: %s", exc)
            if not question.asked:
                return self._unreachable(outcome)
        finally:
            del self.questions[rid]
        outcome.replies = question.replies
        late = question.expected.difference(question.replies)
        for node in late:
            outcome.missing[node] = f"no answer within {wait:g}s (it may still act on it)"
        self.counters["unanswered"] += len(outcome.missing)
        return outcome

    async def _publish(self, rid: int, topic: bytes, body: bytes, question: _Question,
                       outcome: Outcome) -> None:
        """One message to each other live node's channel; the nodes it cannot reach go in
        ``outcome.missing``, the others in ``question.expected``."""
        live = await self.read()
        question.asked = True
        for node in self.lapsed:
            if node != self.me:
                outcome.missing[node] = "lapsed: its heartbeat in P nodes stopped"
        targets = [node for node in live if node != self.me]
        message = _question(rid, topic, self.keys.node, body)
        question.expected.update(targets)  # before publishing: a reply may beat the PUBLISH's
        reached = await asyncio.gather(*(
            self.pipeline.ask("PUBLISH", self.keys.channel_prefix + node.encode(), message)
            for node in targets), return_exceptions=True)
        for node, count in zip(targets, reached):
            if isinstance(count, BaseException) or count == 0:
                question.expected.discard(node)
                outcome.missing[node] = ("Redis unreachable: not asked"
                                         if isinstance(count, BaseException)
                                         else "not subscribed to its channel: its agent is down")
        question.check()

    def _unreachable(self, outcome: Outcome) -> Outcome:
        """Redis is down: name the other nodes last seen (or every other, unnamed)."""
        known = [node for node in (*self.live, *self.lapsed) if node != self.me]
        for node in known or [EVERY_OTHER]:
            outcome.missing[node] = "Redis unreachable: not asked"
        self.counters["unanswered"] += len(outcome.missing)
        return outcome

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFFFFFF
        return self._next_id

    # -- messages on our channel ----------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        """A ``Q`` or ``R`` message read on this node's channel."""
        try:
            if data[:1] == QUESTION:
                self._on_question(*_parse_question(data))
            else:
                rid, node, body = _parse_reply(data)
                question = self.questions.get(rid)
                if question is not None:
                    question.add(node.decode(errors="replace"), body)
        except (ValueError, struct.error) as exc:
            log.error("bad message on %s: %s", self.keys.channel.decode(), exc)

    def _on_question(self, rid: int, topic: bytes, origin: bytes, body: bytes) -> None:
        handler = self.handlers.get(topic)
        if handler is None:
            log.error("a question on %r from node %s: no such topic here (another rawsse "
                      "version?)", topic, origin.decode(errors="replace"))
            return
        self.counters["questions_in"] += 1
        task = asyncio.ensure_future(self._answer(handler, rid, origin, body))
        self._answering.add(task)  # a reference until it is done (asyncio keeps weak ones)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, handler: Handler, rid: int, origin: bytes, body: bytes) -> None:
        try:
            reply = await handler(body)
        except TimeoutError:  # the asking node has stopped waiting, and names us late
            log.warning("answering node %s: this node's answer took too long",
                        origin.decode(errors="replace"))
            return
        except Exception:
            log.exception("answering node %s failed", origin.decode(errors="replace"))
            return
        # Sent whatever our Redis state: a failure just leaves us missing in the answer there.
        self.pipeline.call(("PUBLISH", self.keys.channel_prefix + origin,
                            _reply(rid, self.keys.node, reply)), _ignore)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pairs(entries: Any) -> list[tuple[bytes, Any]]:
    """``ZRANGE … WITHSCORES`` as (member, score) pairs: RESP2 replies a flat list, RESP3
    a list of pairs."""
    if entries and isinstance(entries[0], (list, tuple)):
        return [(member, score) for member, score in entries]
    return list(zip(entries[::2], entries[1::2]))


def _question(rid: int, topic: bytes, origin: bytes, body: bytes) -> bytes:
    return QUESTION + _HEAD.pack(rid, len(topic)) + topic + _LENGTH.pack(len(origin)) + origin + body


def _parse_question(data: bytes) -> tuple[int, bytes, bytes, bytes]:
    rid, length = _HEAD.unpack_from(data, 1)
    start = 1 + _HEAD.size
    topic, start = data[start:start + length], start + length
    (length,) = _LENGTH.unpack_from(data, start)
    start += _LENGTH.size
    return rid, topic, data[start:start + length], data[start + length:]


def _reply(rid: int, node: bytes, body: bytes) -> bytes:
    return REPLY + _HEAD.pack(rid, len(node)) + node + body


def _parse_reply(data: bytes) -> tuple[int, bytes, bytes]:
    rid, length = _HEAD.unpack_from(data, 1)
    start = 1 + _HEAD.size
    return rid, data[start:start + length], data[start + length:]


def _ignore(reply: Any) -> None:
    pass
