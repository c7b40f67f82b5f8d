"""The open-file limit, raised once per process (server workers, the master, load tools)."""

from __future__ import annotations

import resource


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the soft limit now in force.

    systemd leaves the soft limit at 1024 so that ``select()`` users do not break, and expects an
    epoll server to raise it itself (systemd.exec(5), ``LimitNOFILE=``). An infinite hard limit
    is left alone: the kernel refuses a soft limit above ``fs.nr_open``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
