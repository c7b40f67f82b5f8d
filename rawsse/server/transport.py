"""The transport seam: how a connection reads and writes its socket.

A protocol object (``http1.py``) never calls ``os.read``/``os.write`` itself; it asks its
transport. ``SocketTransport`` is the plain TCP socket: a non-blocking fd. ``TlsTransport``
(``tls.py``: a non-blocking ``ssl.SSLObject`` over two ``ssl.MemoryBIO``, Python's "Memory BIO
support") offers the same calls with decrypted bytes, so it replaces this one per connection
without a change to the protocol code; its ``detach`` refuses (a TLS session cannot follow
its fd).

Errors follow the socket's: ``BlockingIOError`` when nothing can be read or written now,
``OSError`` (``ConnectionResetError``, ``BrokenPipeError``…) when the peer is gone, a read of 0
at end of input.
"""

from __future__ import annotations

import os
import socket
from typing import Any


class SocketTransport:
    """A plain, non-blocking TCP socket (one slot: HTTP connections are short-lived but many
    arrive at once in a reconnect storm)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readv(self, buffers: list[Any]) -> int:
        """Read into ``buffers`` (the worker's one shared read buffer); bytes read, 0 at EOF."""
        return os.readv(self.fd, buffers)

    def write(self, data: Any) -> int:
        """Write what the kernel takes now; bytes written."""
        return os.write(self.fd, data)

    def shutdown_write(self) -> None:
        """Half-close: send FIN after what was written, keep reading (lingering close)."""
        sock = socket.socket(fileno=self.fd)
        try:
            sock.shutdown(socket.SHUT_WR)
        finally:
            sock.detach()

    def detach(self) -> int:
        """Give up the fd without closing it (it becomes a device stream's); returns it."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
