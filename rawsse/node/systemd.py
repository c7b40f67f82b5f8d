"""sd_notify(3) without a dependency: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

The protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` lines in one datagram to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).
Only the master speaks (``NotifyAccess=main``). Outside systemd every call is a no-op, and a
failure to notify is logged at debug level and never raised: the service must not die because
its supervisor's socket is gone (gunicorn ``systemd.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    __slots__ = ("address", "sock", "watchdog_interval")

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.sock: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if not sent."""
        if self.address is None:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto("\n".join(assignments).encode(), self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", assignments, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def reloading(self) -> bool:
        # systemd ≥ 253 may ignore RELOADING=1 without MONOTONIC_USEC (sd_notify(3)).
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _watchdog_interval(env: "os._Environ[str] | dict[str, str]") -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``WATCHDOG_USEC`` (the usual convention), if the
    watchdog is meant for this process (``WATCHDOG_PID`` unset or equal to our pid)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
