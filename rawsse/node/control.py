"""A child's side of its socketpair with the master (workers and the Redis agent alike)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable

import orjson

log = logging.getLogger(__name__)


def receive_from_master(sock: socket.socket, who: str,
                        orphaned: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """One message from the master, or None if none is waiting. EOF means the master is gone
    (killed): nobody will reap or respawn this child, so it stops: ``orphaned()`` (a worker
    saves what it holds first, then stops), or at once without one."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    if not data:
        if orphaned is None:
            log.error("%s: master went away; exiting", who)
            os._exit(1)
        orphaned()
        return None
    message: dict[str, Any] = orjson.loads(data)
    return message
