"""What every client connection of a worker does with its socket, whatever protocol it speaks.

A connection (HTTP/1.1 in ``http1.py``, HTTP/2 in ``rawsse/h2/connection.py``) reads and writes
through its transport (``transport.py``; a plain socket's two calls are made here directly),
collects what it has to send in ``out`` and writes it once per loop turn (``schedule_flush``: a
read of 32 pipelined requests, or a batch of answers from the owner workers, fills many answers,
and one write carries them all; one write per answer was 22 % of a pipelined push's CPU, measured
with py-spy); HTTP/1.1 writes what one read answers at the end of that read instead, so a
keep-alive push does not wait for the end of the turn (``Http1Connection._read``). It keeps
epoll interest in step with what it can do (``_update_events``), and ends with a lingering
close: it half-closes once everything is out and reads to EOF for up to ``LINGER_SECONDS``,
because closing with unread input sends an RST that can destroy the last answers before the
client reads them (RFC 9112 §9.6; Apache's lingering close). Each protocol says when it has
nothing left to send (``_finished``), what it reads (``_read``, ``_update_events``) and what it
drops at the end (``_forget``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rawsse.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from rawsse.server.transport import SocketTransport

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

READABLE = EPOLLIN | EPOLLRDHUP
LINGER = -1  # the ``state`` of a lingering connection, whatever the protocol's other states
LINGER_SECONDS = 2.0
# Errors that mean "the client went away": counted, never logged (tornado's errno sets).
GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
# _PLAIN: a plain socket (``SocketTransport``, the push path) is read and written here with the
# very calls its methods make (``os.readv``, ``os.write`` on the connection's fd): a Python call
# less per read and per write. Any other transport (TLS) is asked.


class ClientConnection:
    __slots__ = ("host", "transport", "fd", "out", "events", "flush_scheduled", "state",
                 "deadline", "auth")

    host: "Worker"
    transport: Any  # SocketTransport, or a TLS transport with the same calls
    fd: int
    out: bytearray
    events: int
    flush_scheduled: bool
    state: int
    deadline: float
    auth: Any  # what the connection proved (rawsse/apns/auth.py); None until its first push

    def authenticated(self) -> None:
        """The connection's first provider token was accepted (HTTP/2 raises its stream limit)."""

    # -- what each protocol says ---------------------------------------------------------------

    def _read(self) -> None:
        raise NotImplementedError

    def _end_of_input(self) -> None:
        """The client closed its side (a read of 0)."""
        raise NotImplementedError

    def _finished(self) -> bool:
        """Nothing more will be sent: once ``out`` is written, linger and close."""
        raise NotImplementedError

    def _update_events(self) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop what the connection holds once it is closed (breaks reference cycles)."""

    # -- events, reading and writing -----------------------------------------------------------

    def _receive(self) -> int:
        """Read into the worker's one shared buffer (``host.read_view``): how many bytes came,
        or 0 when there is nothing to parse (nothing waiting; the client gone, and the
        connection closed; its end of input, and ``_end_of_input`` called)."""
        transport = self.transport
        try:
            if transport.__class__ is SocketTransport:  # see _PLAIN
                n: int = os.readv(self.fd, self.host.read_buffers)
            else:
                n = transport.readv(self.host.read_buffers)
        except BlockingIOError:
            return 0
        except OSError:
            self.close("client")
            return 0
        if n == 0:
            self._end_of_input()
        return n

    def handle_events(self, events: int) -> None:
        if events & EPOLLOUT:
            self._flush()
            if self.fd < 0:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self._read()

    def schedule_flush(self) -> None:
        """Write ``out`` at the end of this loop turn, once for everything the turn added."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.host.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self.flush_scheduled = False
        if self.fd >= 0:
            self._flush()

    def _flush(self) -> None:
        out = self.out
        if out:
            transport = self.transport
            try:
                if transport.__class__ is SocketTransport:  # see _PLAIN
                    written = os.write(self.fd, out)
                else:
                    written = transport.write(out)
            except BlockingIOError:
                written = 0
            except GONE:
                self.close("client")
                return
            del out[:written]
        if not out and self.state != LINGER and self._finished():
            self._start_linger()
            return
        self._update_events()

    # -- ending --------------------------------------------------------------------------------

    def _start_linger(self) -> None:
        self.state = LINGER
        self.deadline = self.host.loop.now + LINGER_SECONDS
        try:
            self.transport.shutdown_write()
        except OSError:
            self.close("client")
            return
        self._update_events()

    def close(self, reason: str = "client") -> None:
        if end_connection(self, reason):
            self._forget()


def end_connection(conn: Any, reason: str) -> bool:
    """Take ``conn`` (anything with ``host``, ``fd`` and ``transport``: a connection, a TLS
    handshake) out of its worker: unregister, close the transport, forget it, count why. False
    when it had ended already."""
    fd = conn.fd
    if fd < 0:
        return False
    conn.fd = -1
    host = conn.host
    host.loop.remove(fd)
    conn.transport.close()
    host.http_conns.discard(conn)
    host.stats.disconnect(reason)
    return True


def detach_connection(conn: "ClientConnection") -> int:
    """Take ``conn`` out of its worker without closing its socket, which another process holds
    now too (a sender's connection handed to a less-loaded worker, ``rawsse/node/balance.py``);
    returns the fd, whose copy here the caller closes. Nothing is counted as a disconnect."""
    fd = conn.fd
    conn.fd = -1
    host = conn.host
    host.loop.remove(fd)
    host.http_conns.discard(conn)
    conn.transport.detach()
    conn._forget()
    return fd
