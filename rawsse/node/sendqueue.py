"""An ordered queue of messages for one non-blocking ``SOCK_SEQPACKET`` socket.

Theory of operation
-------------------
Messages leave in the order they were queued, as many as the kernel takes; a message the kernel
refuses (``EAGAIN``) waits, with everything behind it, until the socket is writable again. Each
message may carry fds, passed with ``SCM_RIGHTS`` (``unix(7)``) and closed here once sent: the
receiver has its own copies then.

The queue knows nothing of event loops. Its return values tell the caller when to watch the
socket for writability and when to stop: ``send`` returns True when the socket just became
full, ``flush`` (called once it is writable) returns True when everything has left. The epoll
workers arm ``EPOLLOUT`` from them, the asyncio agent ``loop.add_writer``.

A send that fails with another error raises it, the failed message still first in the queue;
``close`` then hands back every unsent message with its fds still open, for the caller to close
(a stream hand-off that never arrived: the device reconnects) or recover (the agent puts routed
pushes back into Redis).
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque
from typing import Sequence

Unsent = list[tuple[bytes, Sequence[int]]]


class SendQueue:
    """What the kernel has not taken yet of the messages for ``sock``, oldest first."""

    __slots__ = ("sock", "messages", "queued")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: deque[tuple[bytes, Sequence[int]]] = deque()
        self.queued = 0  # bytes waiting, for the caller's back-pressure limit

    @property
    def drained(self) -> bool:
        """True when nothing waits for the kernel."""
        return not self.messages

    def push(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Queue ``message`` (and the fds to pass with it) without sending it yet."""
        self.messages.append((message, fds))
        self.queued += len(message)

    def send(self, message: bytes, fds: Sequence[int] = ()) -> bool:
        """Queue ``message`` and send what the kernel takes, unless older messages already
        wait for writability. True when the socket just became full: watch for writability,
        then ``flush``. Raises ``OSError`` when the socket failed."""
        waiting = bool(self.messages)
        self.push(message, fds)
        return not waiting and not self.flush()

    def flush(self) -> bool:
        """Send what the kernel takes, in order; True when nothing is left (stop watching for
        writability). Raises ``OSError`` when the socket failed."""
        messages, sock = self.messages, self.sock
        while messages:
            message, fds = messages[0]
            try:
                if fds:
                    sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", fds))])
                else:
                    sock.send(message)
            except BlockingIOError:
                return False
            messages.popleft()
            self.queued -= len(message)
            for fd in fds:  # the receiver has its own copy now
                os.close(fd)
        return True

    def close(self) -> Unsent:
        """Empty the queue, handing back what the kernel never took, fds still open. The socket
        stays its owner's to close (after it stops watching it)."""
        unsent = list(self.messages)
        self.messages.clear()
        self.queued = 0
        return unsent
