"""The pending-push state file: what a graceful stop keeps and the next start loads.

Format: one JSON document, ``{"version": 1, "saved_at": <unix s>, "pending": [[token hex,
expires unix s, base64 SSE frame], ...]}``, written to a temporary file and renamed into place so
a crash mid-write never leaves a torn file. Expired entries are dropped on load.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Iterable

from rawsse.apns.registry import Push

VERSION = 1


class StateFileError(ValueError):
    """The state file exists but cannot be used; the message says why."""


def save(path: str, items: Iterable[tuple[bytes, Push]]) -> int:
    entries = [[token.hex(), push.expires, base64.b64encode(push.frame).decode()]
               for token, push in items]
    document = {"version": VERSION, "saved_at": time.time(), "pending": entries}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(document, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(entries)


def load(path: str, now: float | None = None) -> dict[bytes, Push]:
    """Pending pushes from ``path`` (empty if there is no file). Raises StateFileError."""
    try:
        with open(path) as f:
            document = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StateFileError(f"cannot read state file {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != VERSION:
        raise StateFileError(f"state file {path} is not a rawsse v{VERSION} state file")
    now = time.time() if now is None else now
    pending: dict[bytes, Push] = {}
    try:
        for token_hex, expires, frame in document["pending"]:
            if expires > now:
                pending[bytes.fromhex(token_hex)] = Push(base64.b64decode(frame), float(expires))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"state file {path} has a malformed entry: {exc}") from None
    return pending
