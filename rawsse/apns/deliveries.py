"""``/admin/deliveries``: what became of a push, or what a token received, from every worker's
delivery log (``deliverylog.py``) and, in Redis mode, every node's.

Theory of operation
-------------------
The route asks its ``Router`` (``find_deliveries``): every worker of the node answers with its
log entries for the apns-ids or tokens asked and the pushes it holds for those tokens; in Redis
mode the node's agent asks the other nodes through Redis (``rawsse/cluster/agent_deliveries.py``)
and adds the device's pending push stored there. This module merges those answers; it does no
I/O.

A push's fate is its latest entry: delivered, expired, discarded (also: replaced by a newer push
for its token), rejected (status and reason). An entry saying where it was held (stored,
delayed, routed to another node, stored in Redis, given back by a stream) is confirmed by a
second query, by token: ``pending`` if the push is still held, ``expired`` if its expiry passed,
``discarded`` if a newer push for the token was stored after it (Redis replaces a pending push
without saying which), else ``unknown``. So is an apns-id no log holds any more (each keeps
the last ``--delivery-log`` outcomes per worker).
"""

from __future__ import annotations

import time
from typing import Any, Callable

Document = dict[str, Any]

MAX_IDS = 1000  # apns-ids per POST /admin/deliveries: 40 KB of JSON, under the 64 KiB an
# operator request body may hold (server/http1.py MAX_BODY); rawsse push --verify sends batches
RECENT = 100  # deliveries and events a token query shows, newest first

_DELIVERED = ("delivered", "delivered_on_connect")
_HELD = ("stored", "delayed", "routed", "stored_in_redis", "requeued")
_STORING = ("stored", "stored_in_redis")
_FINAL = {"delivered": "delivered", "delivered_on_connect": "delivered", "expired": "expired",
          "discarded": "discarded", "replaced": "discarded", "rejected": "rejected"}
_HELD_WHERE: dict[str, str] = {"pending": "its token's pending push, in its worker",
               "delayed": "waiting out its delivery delay",
               "redis": "its token's pending push, in Redis"}
FATES = ("delivered", "pending", "expired", "discarded", "rejected", "unknown")


class Found:
    """The merged answers of every worker (and node) to one query."""

    def __init__(self, found: Document) -> None:
        answers = found.get("answers") or []
        self.late: list[str] = sorted(found.get("late") or [])
        self.off = bool(answers) and all(answer.get("off") for answer in answers)
        entries: list[Document] = []
        self.waiting: list[Document] = list(found.get("redis_waiting") or [])
        for answer in answers:
            place = {"worker": answer.get("worker"), "node": answer.get("node")}
            entries.extend({**entry, **place} for entry in answer.get("entries") or [])
            self.waiting.extend({**held, **place} for held in answer.get("waiting") or [])
        entries.sort(key=lambda entry: entry["at"])  # stable: one worker's order is kept
        self.entries = entries

    def of_id(self, apns_id: str) -> list[Document]:
        wanted = apns_id.lower()
        return [entry for entry in self.entries if entry["apns_id"].lower() == wanted]

    def of_token(self, token: str) -> list[Document]:
        return [entry for entry in self.entries if entry["token"] == token]

    def held(self, apns_id: str) -> Document | None:
        wanted = apns_id.lower()
        return next((held for held in self.waiting if held["apns_id"].lower() == wanted), None)


def provisional(events: list[Document]) -> str:
    """The fate the entries alone give: final, or ``held`` (to be confirmed by token)."""
    if not events:
        return "unknown"
    return _FINAL.get(events[-1]["event"], "held")


def confirm(events: list[Document], by_token: Found, now: float) -> tuple[str, str]:
    """(fate, detail) of a push whose latest entry says it was held (module docstring)."""
    last = events[-1]
    apns_id = last["apns_id"]
    if 0 < last.get("expires", 0) < now:  # even if still held: a stream would not get it
        return "expired", "its apns-expiration passed before a stream came"
    held = by_token.held(apns_id)
    if held is not None:
        where: str = held["where"]
        return "pending", _HELD_WHERE.get(where, where)
    later = [entry for entry in by_token.of_token(last["token"])
             if entry["at"] >= last["at"] and entry["apns_id"].lower() != apns_id.lower()
             and entry["event"] in _STORING]
    if later:
        return "discarded", f"replaced by {later[0]['apns_id']} (newest wins)"
    return "unknown", f"last {last['event']}; no log holds what came after"


def delivery(events: list[Document], written: Document) -> Document:
    """One delivery as the API shows it: when accepted and written, the delay, where."""
    accepted = next((entry["at"] for entry in events
                     if entry["event"] in _HELD and entry["at"] <= written["at"]), None)
    if accepted is None and written["event"] == "delivered":
        accepted = written["at"]  # written the moment its owner took it
    return {"apns_id": written["apns_id"], "token": written["token"], "accepted": accepted,
            "written": written["at"],
            "delay_ms": None if accepted is None else round((written["at"] - accepted) * 1000, 3),
            "bytes": written.get("bytes"), "on_connect": written["event"] == "delivered_on_connect",
            "worker": written["worker"], "node": written["node"]}


def token_document(token: str, found: Found) -> Document:
    """``GET /admin/deliveries?token=``: the token's pending push and recent deliveries."""
    events = found.of_token(token)
    writes = [entry for entry in events if entry["event"] in _DELIVERED]
    by_id: dict[str, list[Document]] = {}
    for entry in events:
        by_id.setdefault(entry["apns_id"].lower(), []).append(entry)
    held = [entry for entry in found.waiting if entry["token"] == token]
    return {
        "token": token,
        "pending": next((entry for entry in held if entry["where"] != "delayed"), None),
        "delayed": [entry for entry in held if entry["where"] == "delayed"],
        "deliveries": [delivery(by_id[w["apns_id"].lower()], w) for w in reversed(writes)][:RECENT],
        "events": list(reversed(events))[:RECENT],
        "late_nodes": found.late,
    }


def fate_document(apns_id: str, events: list[Document], by_token: Found | None,
                  late: list[str]) -> Document:
    """``GET /admin/deliveries/<apns-id>``: that push's fate and every entry of it."""
    fate = provisional(events)
    doc: Document = {"apns_id": apns_id, "fate": fate, "token": events[-1]["token"]}
    if fate == "held":
        fate, doc["detail"] = confirm(events, by_token or Found({}), time.time())
        doc["fate"] = fate
        if fate == "pending" and by_token is not None:
            doc["pending"] = by_token.held(apns_id)
    last = events[-1]
    if fate == "rejected":
        doc.update(status=last["status"], reason=last["reason"])
    elif fate == "delivered":
        doc["delivered"] = delivery(events, last)
    elif last["event"] == "replaced":
        doc["detail"] = "replaced by a newer push for its token (newest wins)"
    doc["events"] = events
    doc["late_nodes"] = late
    return doc


def held_tokens(found: Found, ids: list[str]) -> list[str]:
    """Tokens of the pushes whose fate needs confirming (their latest entry says held)."""
    tokens = set()
    for apns_id in ids:
        events = found.of_id(apns_id)
        if provisional(events) == "held" and events[-1]["token"]:
            tokens.add(events[-1]["token"])
    return sorted(tokens)


def fates(ids: list[str], found: Found, by_token: Found | None) -> Document:
    """``POST /admin/deliveries``: the fate of each apns-id, and the counts."""
    now = time.time()
    result: dict[str, str] = {}
    for apns_id in ids:
        events = found.of_id(apns_id)
        fate = provisional(events)
        if fate == "held":
            fate = confirm(events, by_token or Found({}), now)[0]
        result[apns_id] = fate
    counts = dict.fromkeys(FATES, 0)
    for fate in result.values():
        counts[fate] += 1
    late = sorted(set(found.late) | set(by_token.late if by_token else ()))
    return {"fates": result, "counts": counts, "late_nodes": late}


def find_then_confirm(find: Callable[[Document, Callable[[Document], None]], None],
                      ids: list[str], done: Callable[[Found, Found | None], None]) -> None:
    """Query ``ids``; then, if any is held somewhere, its tokens (module docstring)."""
    def by_id(answer: Document) -> None:
        found = Found(answer)
        tokens = held_tokens(found, ids)
        if not tokens:
            done(found, None)
            return
        find({"tokens": tokens}, lambda second: done(found, Found(second)))

    find({"ids": ids}, by_id)
