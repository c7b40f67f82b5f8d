"""One Redis connection used as a pipeline: whatever was queued while a batch was in flight
leaves as the next batch, in one write and one round trip.

Why: per-push cost on a node is round-trip bound, and pipelining is what moves it (measured on
loopback, 2 vCPUs, Redis 7.0, redis-py + hiredis + uvloop, loops of 20,000 operations: 14.6k
sequential ``GETDEL``/s against 71k/s in pipelined batches of 1000). Batches form by themselves:
under load the queue fills during the round trip of the batch before, so a batch is as large as the
load makes it (capped at ``MAX_BATCH``), and an idle node sends each command at once.

Rules
-----
- One connection, one batch in flight: commands run in Redis in the order they were queued. The
  workers rely on it (a node's CLAIM, ROUTE and RELEASE for one token are issued by one worker,
  in order, and must run in that order).
- Never retried, never reconnected here: a command whose reply was not read has an unknown
  outcome, so it fails (its push is answered 503, at worst delivered too, never a 200 then lost)
  and the connection is reported lost (``on_lost``); the agent reconnects and resyncs. redis-py's
  own retry is off (``Retry(NoBackoff(), 0)``) for the same reason.
- A command that waited longer than ``MAX_AGE`` fails without running: its worker has given up
  (mesh timeout 5 s) and answered 503, so running it late could deliver a push a sender retries.
- An error reply (``ResponseError``) fails that command only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable

from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

MAX_BATCH = 1000
BATCH_TIMEOUT = 3.0  # a batch not answered by then: Redis is hung (SIGSTOP, swap) → lost
MAX_AGE = 4.0  # below the workers' mesh request timeout (mesh.REQUEST_TIMEOUT = 5 s)


class Unavailable(RedisError):
    """Redis is not connected (or the command waited too long): the command did not run."""


Done = Callable[[Any], None]  # gets the reply, or an Exception


class Pipeline:
    def __init__(self, on_lost: Callable[[BaseException], None]) -> None:
        self.on_lost = on_lost
        self.conn: Any = None  # redis.asyncio.Connection while up
        self.queue: list[tuple[tuple[Any, ...], Done, float]] = []
        self.wakeup = asyncio.Event()
        self.busy = False
        self.batches = 0
        self.commands = 0

    # -- queueing ---------------------------------------------------------------------------

    def call(self, args: tuple[Any, ...], done: Done) -> None:
        """Run ``args`` with the next batch; ``done(reply or exception)`` afterwards."""
        if self.conn is None:
            done(Unavailable("redis is not connected"))
            return
        self.queue.append((args, done, time.monotonic()))
        self.wakeup.set()

    async def ask(self, *args: Any) -> Any:
        """``call`` for the agent's own work (stats, questions to the other nodes): the reply,
        or raises. A caller may stop waiting (a bounded wait): the late reply is dropped."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(reply: Any) -> None:
            if not future.done():  # cancelled with the task awaiting it
                future.set_result(reply)

        self.call(args, settle)
        reply = await future
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def idle(self) -> bool:
        return not self.queue and not self.busy

    # -- connection ---------------------------------------------------------------------------

    def attach(self, conn: Any) -> None:
        self.conn = conn

    def detach(self, why: BaseException) -> None:
        """Redis went away: everything queued fails now (it never ran)."""
        self.conn = None
        queued, self.queue = self.queue, []
        self._fail(queued, Unavailable(f"redis connection lost: {why}"))

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """The task that sends batches, forever."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue and self.conn is not None:
                batch = self._take_batch()
                if batch:
                    self.busy = True
                    try:
                        await self._execute(self.conn, batch)
                    finally:
                        self.busy = False

    def _take_batch(self) -> list[tuple[tuple[Any, ...], Done, float]]:
        batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
        oldest = time.monotonic() - MAX_AGE
        if batch[0][2] >= oldest:
            return batch
        late = [item for item in batch if item[2] < oldest]
        self._fail(late, Unavailable("redis too slow: gave up before sending"))
        return [item for item in batch if item[2] >= oldest]

    async def _execute(self, conn: Any, batch: list[tuple[tuple[Any, ...], Done, float]]) -> None:
        replies: list[Any] = []
        error: BaseException | None = None
        try:
            if not conn.is_connected:  # redis-py would reconnect silently: never here
                raise Unavailable("redis connection closed")
            async with asyncio.timeout(BATCH_TIMEOUT):
                await conn.send_packed_command(conn.pack_commands([args for args, _, _ in batch]),
                                               check_health=False)
                for _ in batch:
                    try:
                        replies.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        replies.append(exc)
        except TimeoutError:
            error = Unavailable(f"no reply from redis within {BATCH_TIMEOUT:g}s")
        except (RedisError, OSError) as exc:
            error = exc
        self.batches += 1
        self.commands += len(replies)
        for (_, done, _), reply in zip(batch, replies):
            self._call(done, reply)
        if error is not None:
            self.conn = None  # nothing more is sent on it; the agent reconnects
            self._fail(batch[len(replies):], error)
            self.on_lost(error)

    def _fail(self, items: list[tuple[tuple[Any, ...], Done, float]], error: BaseException) -> None:
        for _, done, _ in items:
            self._call(done, error)

    @staticmethod
    def _call(done: Done, reply: Any) -> None:
        try:
            done(reply)
        except Exception:
            log.exception("redis reply handler failed")
