"""A seeded mutation fuzzer for rawsse's HTTP/1.1 listeners (issue 12, item 8).

Each case is a request from ``tests/fuzz/corpus/*.http`` (valid requests and the reproducers of
the bugs found so far), sent as is or after a few mutations (bytes flipped, inserted, deleted,
repeated, numbers made extreme, tokens made long, line ends changed, two requests spliced), to
the public or the operator listener of one real server, whole, byte by byte, or in random
slices. The client then half-closes: whatever the bytes were, the server must answer what it
can and close within ``CASE_SECONDS`` (a case that does not is a hang), and its log must hold
no traceback. The same seed gives the same cases, so a failure is reproduced by its seed and
index (``fuzz/run.py --seed S --only I``).
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "corpus")
CASE_SECONDS = 5.0  # answer and close after the client's half-close, or it is a hang
MODES = ("whole", "bytes", "slices")
BYTE_BY_BYTE_LIMIT = 2048  # longer cases go in slices: one send per byte is slow, not hostile

# Values that broke a parser somewhere, and pieces of the protocol to scatter.
INTERESTING = [
    b"-", b"--5", b"+5", b"0", b"-1", b"1" + b"0" * 309, b"9" * 5000, b"18446744073709551616",
    b"1e9", b"0x10", b" ", b"\t", b"%", b"%zz", b"%00", b"\x00", b"\xff", b"\r\n", b"\n", b"\r",
    b"cd" * 300, b"ab" * 101, b"a" * 301, b"?token=", b"&token=", b"?prefix=", b"/events",
    b"/3/device/", b"/broadcast", b"/metrics", b"/admin/tokens/", b"HTTP/1.0", b"HTTP/2.0",
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
    b"Connection: close\r\n", b"Expect: 100-continue\r\n", b"Upgrade: h2c\r\n",
    b"apns-expiration: ", b"apns-push-type: voip\r\n", b"apns-id: x\r\n", b"0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b'{"state":"bad"}', b'"100%:500"',
]
_NUMBER = re.compile(rb"\d+")


def load_corpus(directory: str = CORPUS) -> list[tuple[str, bytes]]:
    cases = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".http"):
            with open(os.path.join(directory, name), "rb") as f:
                cases.append((name, f.read()))
    return cases


# -- mutations ------------------------------------------------------------------------------------

def _flip(rng: random.Random, data: bytes, other: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]


def _insert(rng: random.Random, data: bytes, other: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.choice(INTERESTING) + data[i:]


def _insert_random(rng: random.Random, data: bytes, other: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.randrange(1, 16)) + data[i:]


def _delete(rng: random.Random, data: bytes, other: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randrange(1, 32):]


def _repeat(rng: random.Random, data: bytes, other: bytes) -> bytes:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randrange(1, 48))
    return data[:j] + data[i:j] * rng.randrange(1, 40) + data[j:]


def _number(rng: random.Random, data: bytes, other: bytes) -> bytes:
    numbers = list(_NUMBER.finditer(data))
    if not numbers:
        return _insert(rng, data, other)
    match = rng.choice(numbers)
    value = rng.choice([b"--5", b"-1", b"0", b"1" + b"0" * 309, b"9" * 5000, b"4294967296",
                        b"18446744073709551616", b"00000000000000000000001"])
    return data[:match.start()] + value + data[match.end():]


def _line_ends(rng: random.Random, data: bytes, other: bytes) -> bytes:
    return data.replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]), rng.randrange(1, 8))


def _truncate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    return data[:rng.randrange(len(data))]


def _splice(rng: random.Random, data: bytes, other: bytes) -> bytes:
    return data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]


MUTATIONS = [_flip, _insert, _insert_random, _delete, _repeat, _number, _line_ends, _truncate,
             _splice]


@dataclass
class Case:
    index: int
    source: str  # the corpus file it was made from
    data: bytes
    mode: str
    operator: bool  # sent to the operator listener
    cuts: list[int]  # slice boundaries, for "slices"
    answer_expected: bool  # an unmutated corpus request: valid or not, it gets an HTTP answer


def make_cases(seed: int, count: int, corpus: list[tuple[str, bytes]]) -> list[Case]:
    """``count`` cases, the same for the same seed and corpus: the first pass sends every corpus
    request unchanged, whole; the rest are mutants."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        name, data = corpus[index] if index < len(corpus) else rng.choice(corpus)
        mode = "whole" if index < len(corpus) else rng.choice(MODES)
        if index >= len(corpus):
            for _ in range(rng.choice((1, 1, 2, 3, 4))):
                if data:
                    data = rng.choice(MUTATIONS)(rng, data, rng.choice(corpus)[1])
        if mode == "bytes" and len(data) > BYTE_BY_BYTE_LIMIT:
            mode = "slices"
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 12)))) \
            if mode == "slices" and len(data) > 1 else []
        operator = rng.random() < 0.5 if index >= len(corpus) else _for_operator(data)
        cases.append(Case(index, name, data, mode, operator, cuts, index < len(corpus)))
    return cases


def _for_operator(data: bytes) -> bool:
    """An unmutated operator request goes to the operator listener (elsewhere it is a 404)."""
    parts = data.split(b" ", 2)
    return len(parts) > 1 and parts[1].startswith((b"/admin", b"/stats", b"/metrics"))


# -- sending --------------------------------------------------------------------------------------

def run_case(case: Case, host: str, port: int, admin_port: int) -> str | None:
    """Send one case and half-close; None when the server closed in time (after an answer, for
    an unmutated corpus request), else what went wrong."""
    sock = socket.create_connection((host, admin_port if case.operator else port), timeout=2)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in _pieces(case):
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN (at shutdown)
            return None  # the server refused early and closed: an answer of its own
        deadline = time.monotonic() + CASE_SECONDS
        head = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"no close within {CASE_SECONDS}s"
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except (socket.timeout, TimeoutError):
                return f"no close within {CASE_SECONDS}s"
            if not data:
                break
            head = head or data[:9]
    finally:
        sock.close()
    # An answer is an HTTP/1.1 status line, or, to the HTTP/2 preface, the server's SETTINGS
    # frame (RFC 9113 §3.4: the server's preface; type 0x4 in the frame header's fourth byte).
    http2 = case.data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") and head[3:4] == b"\x04"
    if case.answer_expected and not head.startswith(b"HTTP/1.1 ") and not http2:
        return f"closed with no answer (got {head!r})"
    return None


def _pieces(case: Case) -> list[bytes]:
    data = case.data
    if case.mode == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    if case.mode == "slices":
        bounds = [0, *case.cuts, len(data)]
        return [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return [data]


def run_cases(cases: list[Case], host: str, port: int, admin_port: int,
              parallel: int = 8, stop_at: float | None = None) -> list[tuple[Case, str]]:
    """Every case (``parallel`` at a time); returns the failures. ``stop_at`` (monotonic) bounds
    the run: cases not started by then are skipped."""
    def one(case: Case) -> tuple[Case, str] | None:
        if stop_at is not None and time.monotonic() > stop_at:
            return None
        try:
            problem = run_case(case, host, port, admin_port)
        except OSError as exc:
            problem = f"client error: {exc!r}"
        return (case, problem) if problem else None

    with ThreadPoolExecutor(parallel) as pool:
        return [failure for failure in pool.map(one, cases) if failure is not None]


def describe(case: Case, problem: str) -> str:
    return (f"case {case.index} ({case.source}, {case.mode}, "
            f"{'operator' if case.operator else 'public'} listener): {problem}: {case.data[:300]!r}")
