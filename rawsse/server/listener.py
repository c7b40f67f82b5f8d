"""Listening sockets: bound with SO_REUSEPORT in every worker, accepted from the epoll loop."""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

ACCEPTS_PER_WAKEUP = 256  # a connect storm cannot starve the loop's other work (tornado's cap)
EMFILE_PAUSE_SECONDS = 0.1  # asyncio's accept backoff: retry later instead of spinning
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind_listener(address: tuple[str, int], backlog: int) -> socket.socket:
    """A non-blocking listener with SO_REUSEPORT (each prefork worker binds its own, so the kernel
    spreads accepts over per-worker queues, socket(7)) and TCP_NODELAY, which accepted sockets
    inherit on Linux: small SSE events must not wait for Nagle."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts on one listening socket, at most ``ACCEPTS_PER_WAKEUP`` per loop turn."""

    __slots__ = ("sock", "fd", "worker", "operator", "tls", "paused")

    def __init__(self, sock: socket.socket, worker: "Worker", operator: bool,
                 tls: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.worker = worker
        self.operator = operator
        self.tls = tls  # --tls-listen: the connection starts with a TLS handshake
        self.paused = True  # until ``resume``: a booting worker binds first, accepts later

    def handle_events(self, events: int) -> None:
        worker = self.worker
        # (fd, address) without building a socket object per connection: socket.accept() wraps
        # this private call in a new socket object that the server would only detach again.
        accept = self.sock._accept  # type: ignore[attr-defined]
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                fd, _addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                worker.stats.accept_errors[name] = worker.stats.accept_errors.get(name, 0) + 1
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    self.pause(EMFILE_PAUSE_SECONDS)
                return
            if self.tls:
                worker.accept_tls(fd)
            else:
                worker.accept(fd, self.operator)

    def pause(self, seconds: float) -> None:
        if not self.paused:
            self.paused = True
            self.worker.loop.remove(self.fd)
            self.worker.loop.call_later(seconds, self.resume)

    def resume(self) -> None:
        if self.paused and self.fd >= 0:
            self.paused = False
            self.worker.loop.add(self.fd, self)

    def close(self, reason: str = "shutdown") -> None:
        if self.fd >= 0:
            if not self.paused:
                self.worker.loop.remove(self.fd)
            self.fd = -1
            self.sock.close()
