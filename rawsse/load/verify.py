"""``rawsse push --verify``: after the run, ask the server what became of every push it answered
``200``, and fail the run if any was neither delivered nor pending.

Theory of operation
-------------------
The senders note the ``apns-id`` of each ``200`` (``rawsse.load.h1answers`` for HTTP/1.1; the
HTTP/2 sender reads it from the answer's header block). After the run the ids go to the server's
deliveries API (``POST /admin/deliveries`` on ``--admin-url``, ``MAX_BATCH`` ids a request),
which answers each one's fate from every worker's and node's delivery log
(``rawsse/apns/deliveries.py``). A fate still ``unknown`` may be a push in flight between nodes:
those are asked again every ``RETRY_SECONDS`` until ``--verify-wait`` has passed. Delivered and
pending pushes are fine; anything else (expired, discarded, rejected, unknown: evicted from a
log that is too short for the run, or lost) is missing and makes the run exit 1.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rawsse.config import ConfigError

MAX_BATCH = 1000  # the server's limit per request (rawsse/apns/deliveries.py MAX_IDS)
RETRY_SECONDS = 0.25
REQUEST_TIMEOUT = 10.0
SHOWN_MISSING = 20  # missing apns-ids listed in the report


class VerifyError(Exception):
    """The deliveries API could not answer; ``unreachable`` when it could not be reached."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def default_admin_url(url: str) -> str:
    """The operator listener a server on ``url`` has by default: its host, port + 1."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port + 1}"


def check_admin_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError("--admin-url", f"{url!r} is not an http://HOST:PORT URL (the server's "
                                         "--admin-listen)")
    return url.rstrip("/")


def verify(admin_url: str, ids: list[bytes], wait: float) -> dict[str, Any]:
    """The fate of every id, asked in batches, ``unknown`` ones again until ``wait`` passed."""
    deadline = time.monotonic() + wait
    asked = list(dict.fromkeys(i.decode("ascii", "replace") for i in ids if i))
    fates: dict[str, str] = {}
    late: set[str] = set()
    todo = asked
    while todo:
        for start in range(0, len(todo), MAX_BATCH):
            answer = _ask(admin_url, todo[start:start + MAX_BATCH])
            fates.update(answer["fates"])
            late.update(answer.get("late_nodes") or ())
        todo = [i for i in todo if fates.get(i) == "unknown"]
        if not todo or time.monotonic() + RETRY_SECONDS > deadline:
            break
        time.sleep(RETRY_SECONDS)
    counts: dict[str, int] = {}
    for fate in fates.values():
        counts[fate] = counts.get(fate, 0) + 1
    missing = [i for i in asked if fates.get(i) not in ("delivered", "pending")]
    return {"admin_url": admin_url, "checked": len(asked),
            "delivered": counts.get("delivered", 0), "pending": counts.get("pending", 0),
            "missing": len(missing), "fates": dict(sorted(counts.items())),
            "missing_ids": missing[:SHOWN_MISSING], "late_nodes": sorted(late)}


def _ask(admin_url: str, ids: list[str]) -> dict[str, Any]:
    request = urllib.request.Request(f"{admin_url}/admin/deliveries", method="POST",
                                     data=json.dumps({"apns_ids": ids}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise VerifyError(_refusal(exc)) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise VerifyError(f"cannot ask --admin-url {admin_url}: {reason}", unreachable=True) from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except ValueError:
        body = {}
    if body.get("reason") == "DeliveryLogOff":
        return "the server keeps no delivery log (it runs with --delivery-log 0)"
    if exc.code == 404:
        return (f"{exc.url} answered 404: is --admin-url the server's operator listener "
                "(--admin-listen)?")
    return f"{exc.url} answered {exc.code} {body.get('reason', '')} {body.get('detail', '')}"


def summary(result: dict[str, Any]) -> str:
    """The closing line's account of a verification that found pushes missing."""
    kinds = ", ".join(f"{fate} {n}" for fate, n in result["fates"].items()
                      if fate not in ("delivered", "pending"))
    late = f"; nodes that did not answer: {', '.join(result['late_nodes'])}" \
        if result["late_nodes"] else ""
    return (f"--verify: {result['missing']} of {result['checked']} pushes answered 200 were "
            f"neither delivered nor pending ({kinds}), e.g. {result['missing_ids'][0]}{late}")
