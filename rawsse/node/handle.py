"""The master's view of one child slot (a worker, or the Redis agent): its process and its
control socket, with the messages the socket did not take yet (``arbiter.py`` drives it)."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

import orjson

from rawsse.node.sendqueue import SendQueue
from rawsse.server.loop import EPOLLOUT, READ_EVENTS

if TYPE_CHECKING:
    from rawsse.node.arbiter import Arbiter

MAX_RESPAWN_DELAY = 30.0


class WorkerHandle:
    """The master's view of one worker slot: its process and its control socket."""

    __slots__ = ("arbiter", "index", "pid", "sock", "fd", "ready", "last_beat", "beat",
                 "deaths", "restarting", "out")

    def __init__(self, arbiter: "Arbiter", index: int) -> None:
        self.arbiter = arbiter
        self.index = index
        self.pid = 0
        self.sock: socket.socket | None = None
        self.fd = -1
        self.ready = False
        self.last_beat = 0.0
        self.beat: dict[str, Any] = {}
        self.deaths: list[float] = []
        self.restarting = False
        # Messages the socket did not take yet (a worker still booting reads nothing); sent in
        # order once it drains, so no admin change is lost on the way to a new worker.
        self.out: SendQueue | None = None

    def attach(self, pid: int, sock: socket.socket) -> None:
        """A new process in this slot, and the master's end of its control socket."""
        self.pid, self.sock, self.fd, self.out = pid, sock, sock.fileno(), SendQueue(sock)
        self.ready = False
        self.last_beat = time.monotonic()
        self.beat = {}

    def record_death(self, now: float) -> float:
        """Count a death; the pause before the respawn: none after the first death in a
        minute, then 1 s doubling up to MAX_RESPAWN_DELAY, so a crash loop cannot hammer the
        devices."""
        self.deaths = [t for t in self.deaths if now - t < 60.0] + [now]
        return 0.0 if len(self.deaths) <= 1 else min(MAX_RESPAWN_DELAY, 2.0 ** (len(self.deaths) - 2))

    def handle_events(self, events: int) -> None:
        if events & EPOLLOUT and self._flush():
            self.arbiter.loop.modify(self.fd, READ_EVENTS)  # all sent: stop waiting to write
        for _ in range(64):
            try:
                data = self.sock.recv(65536)  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close_socket()
                return
            self.arbiter.on_message(self, orjson.loads(data))

    def send(self, message: dict[str, Any]) -> None:
        if self.out is None:
            return
        try:
            full = self.out.send(orjson.dumps(message))
        except OSError:  # the worker is gone: its exit is reaped and handled
            self.out.close()
            return
        if full:
            self.arbiter.loop.modify(self.fd, READ_EVENTS | EPOLLOUT)

    def _flush(self) -> bool:
        """Send what the socket takes, in order; True when nothing is left."""
        if self.out is None:
            return True
        try:
            return self.out.flush()
        except OSError:  # the worker is gone: its exit is reaped and handled
            self.out.close()
            return True

    def close_socket(self) -> None:
        self.out = None
        if self.sock is not None:
            self.arbiter.loop.remove(self.fd)
            self.sock.close()
            self.sock, self.fd = None, -1

    def close(self, reason: str = "") -> None:
        self.close_socket()
