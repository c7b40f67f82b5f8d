"""The pending-push state file: what a graceful stop keeps and the next start loads.

Format: one JSON document, ``{"version": 1, "saved_at": <unix s>, "pending": [[token hex,
expires unix s, base64 SSE frame], ...]}``, written to a temporary file and renamed into place so
a crash mid-write never leaves a torn file. Expired entries are dropped on load. Files are
created 0600: they hold the pushes' payloads.

Parts: each worker saves its own pending pushes to a part file, ``.<name>.worker<i>`` beside
``--state-file`` (or in the master's private 0700 directory without one); the master merges the
parts into the state file at stop, and at start merges any parts a killed master left behind
(``leftover_parts``).
"""

from __future__ import annotations

import base64
import glob
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a stale temporary file of the same name keeps its own mode
    with open(fd, "w") as f:
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
    received = time.monotonic()  # their latency, if a device takes them live, counts from here
    try:
        for token_hex, expires, frame in document["pending"]:
            if expires > now:
                pending[bytes.fromhex(token_hex)] = Push(base64.b64decode(frame), float(expires),
                                                          received)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"state file {path} has a malformed entry: {exc}") from None
    return pending


def part_path(directory: str, state_file: str, index: int) -> str:
    """Where worker ``index`` saves its pending pushes for the master."""
    return os.path.join(directory, f".{os.path.basename(state_file)}.worker{index}")


def leftover_parts(directory: str, state_file: str) -> list[str]:
    """Part files in ``directory`` for ``state_file``, whatever the worker count was."""
    prefix = os.path.join(glob.escape(directory), glob.escape(f".{os.path.basename(state_file)}"))
    return sorted(path for path in glob.glob(prefix + ".worker*")
                  if path.rsplit(".worker", 1)[1].isdigit())


def merge_leftover_parts(directory: str, path: str, pending: dict[bytes, Push]) -> int:
    """Merge into ``pending`` the parts the workers of a killed master saved for ``path``
    (newer than the state file, so merged over it), write the result back to ``path``, then
    remove the parts: a crash now loses nothing and a later start does not apply them twice.
    Returns how many pushes the parts held. Raises OSError if ``path`` cannot be written."""
    parts = leftover_parts(directory, path)
    recovered = 0
    for part in parts:
        found = load(part)
        pending.update(found)
        recovered += len(found)
    if parts:
        save(path, pending.items())
        for part in parts:
            os.unlink(part)
    return recovered
