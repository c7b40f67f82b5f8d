"""A child's side of its socketpair with the master (workers and the Redis agent alike)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import orjson

log = logging.getLogger(__name__)


def receive_from_master(sock: socket.socket, who: str) -> dict[str, Any] | None:
    """One message from the master, or None if none is waiting. EOF means the master is gone
    (killed): nobody will reap or respawn this child, so it exits at once."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    if not data:
        log.error("%s: master went away; exiting", who)
        os._exit(1)
    message: dict[str, Any] = orjson.loads(data)
    return message
