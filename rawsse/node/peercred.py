"""Who may connect to a node's mesh sockets: this node's own processes, nobody else.

The mesh listens on abstract-namespace unix sockets (``wire.address``), which any local process
can find in ``/proc/net/unix`` and connect to: file permissions do not apply to abstract names
(unix(7), "Abstract sockets"). So every accepted connection is checked with ``SO_PEERCRED``
(unix(7): the pid, uid and gid of the peer at ``connect``): the peer must run as our uid and be
a child of this node's master (the workers and the Redis agent are forked by it), read from the
``PPid`` line of ``/proc/<pid>/status`` (proc(5)).
"""

from __future__ import annotations

import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def parent_of(pid: int) -> int:
    """The parent pid of ``pid``; 0 if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def refusal(sock: socket.socket, master_pid: int) -> str | None:
    """Why the peer of ``sock`` is not one of this node's processes, or None if it is."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _UCRED.size))
    if uid != os.getuid():
        return f"pid {pid} runs as uid {uid}"
    if parent_of(pid) != master_pid:
        return f"pid {pid} is not a process of this node (master pid {master_pid})"
    return None


def admit(sock: socket.socket, master_pid: int) -> bool:
    """True if ``sock``'s peer is one of this node's processes; otherwise close it and say so."""
    why = refusal(sock, master_pid)
    if why is None:
        return True
    log.warning("mesh connection refused: %s", why)
    sock.close()
    return False
