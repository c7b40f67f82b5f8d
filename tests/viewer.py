"""A ``GET /stats/events`` client for tests: the head, then one JSON document per ``data:`` event."""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable


class Viewer:
    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(b"GET /stats/events HTTP/1.1\r\nHost: rawsse\r\n"
                          b"Accept: text/event-stream\r\n\r\n")
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.head = {k.strip().lower(): v.strip()
                     for k, _, v in (line.partition(":") for line in lines[1:])}
        self.raw: list[bytes] = []  # every event's data, as sent

    def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next event's document."""
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"stream ended: {self.buffer!r}")
            self.buffer += chunk
        event, _, self.buffer = self.buffer.partition(b"\n\n")
        data = b"".join(line[len(b"data: "):] for line in event.split(b"\n")
                        if line.startswith(b"data: "))
        if not data:  # retry: or a comment
            return self.next(max(0.01, deadline - time.monotonic()))
        self.raw.append(data)
        return json.loads(data)

    def until(self, predicate: Callable[[dict[str, Any]], bool],
              timeout: float = 5.0) -> dict[str, Any]:
        """Events until one satisfies ``predicate``; that one."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event matched")
            doc = self.next(remaining)
            if predicate(doc):
                return doc

    def close(self) -> None:
        self.sock.close()
