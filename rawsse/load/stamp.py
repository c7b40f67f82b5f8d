"""Latency stamps carried in the ``apns-id``, and the histogram that collects latencies.

The push driver sends each push with an ``apns-id`` that is a UUID version 7 (RFC 9562 §5.7)
whose timestamp is the push's *scheduled* send time; the server echoes that id in the event's
``id:`` line (``rawsse.server.frames.encode_event``), so a device computes end-to-end latency as
receive wall time − ``stamp_time(id)`` without any side channel. Measuring from the scheduled
time, not the actual one, avoids coordinated omission when the driver is rate-paced (giltene/wrk2
README; tsenart/vegeta does the same).

Layout (RFC 9562 §5.7 and §6.2 "Method 3"): 48-bit Unix milliseconds, version ``7``, then the
12-bit ``rand_a`` field holds the sub-millisecond fraction (``frac × 4096``, ≈0.24 µs steps), the
variant bits ``10``, and 62 random bits in ``rand_b``. The id stays a canonical lowercase UUID, so
the server's ``BadMessageId`` check (Apple: "canonical UUID, lowercase 8-4-4-4-12") accepts it.

A v7 id minted elsewhere (not by method 3) carries random ``rand_a`` bits: its stamp is read at
millisecond precision plus up to 1 ms of noise. Any other UUID version reads as unstamped (None).
"""

from __future__ import annotations

import math
import random
import re
import time

# 2**12 steps per millisecond in rand_a (RFC 9562 §6.2 method 3).
_SUBMS_STEPS = 4096
_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62
_V7_PATTERN = (r"([0-9a-fA-F]{8})-([0-9a-fA-F]{4})-7([0-9a-fA-F]{3})-[89abAB][0-9a-fA-F]{3}"
               r"-[0-9a-fA-F]{12}")
_V7_TEXT = re.compile(_V7_PATTERN)
_V7_BYTES = re.compile(_V7_PATTERN.encode())


# The id's bytes: ``ID_PREFIX % stamp_fields(now)`` (the time: one per instant, shared by the
# pushes sent in one loop turn) then ``ID_RANDOM % (RAND_HIGH | r >> 48, r & RAND_LOW)`` for 62
# random bits ``r``: no big-integer arithmetic per push (what ``rawsse push`` sends).
ID_PREFIX = b"%08x-%04x-7%03x-"
ID_RANDOM = b"%04x-%012x"
ID_FORMAT = ID_PREFIX + ID_RANDOM
RAND_HIGH = 0b10 << 14  # the variant bits above the 14 random bits of the fourth group
RAND_LOW = (1 << 48) - 1


def stamp_fields(now: float) -> tuple[int, int, int]:
    """The first three groups of ``new_stamped_id(now)`` as numbers for ``ID_PREFIX``: the high
    32 and low 16 bits of the Unix milliseconds, and the sub-millisecond steps."""
    ms, sub_ns = divmod(round(now * 1e9), 1_000_000)
    ms &= 0xFFFF_FFFF_FFFF
    return ms >> 16, ms & 0xFFFF, sub_ns * _SUBMS_STEPS // 1_000_000


def new_stamped_id(now: float | None = None) -> str:
    """A lowercase UUIDv7 whose time fields encode ``now`` (Unix seconds; default: the clock).

    Returns:
        ``xxxxxxxx-xxxx-7xxx-[89ab]xxx-xxxxxxxxxxxx``, unique by its 62 random bits.
    """
    r = random.getrandbits(62)
    return (ID_FORMAT % (*stamp_fields(time.time() if now is None else now),
                         RAND_HIGH | r >> 48, r & RAND_LOW)).decode()


def stamp_time(apns_id: str | bytes) -> float | None:
    """The Unix time (seconds) a v7 ``apns_id`` was stamped with, or None if it is not one.

    Accepts upper case too (an echo need not preserve case); rejects anything that is not the
    36-character 8-4-4-4-12 form with version 7 and the RFC variant. Called once per received
    event, hence one precompiled match and two ``int`` parses (≈1 µs).
    """
    if isinstance(apns_id, (bytes, bytearray)):
        match_bytes = _V7_BYTES.fullmatch(apns_id)
        if match_bytes is None:
            return None
        ms_hex, sub_hex = match_bytes.group(1) + match_bytes.group(2), match_bytes.group(3)
    else:
        match_text = _V7_TEXT.fullmatch(apns_id)
        if match_text is None:
            return None
        ms_hex, sub_hex = match_text.group(1) + match_text.group(2), match_text.group(3)
    return (int(ms_hex, 16) + int(sub_hex, 16) / _SUBMS_STEPS) / 1000.0


_GROWTH = 1.01
_log = math.log  # record() runs per answer read: module globals, not attribute lookups
_LOG_GROWTH = math.log(_GROWTH)


class LatencyHistogram:
    """Latencies in log-spaced buckets: fixed memory, mergeable across processes.

    Bucket ``i`` holds values in ``[GROWTH**i, GROWTH**(i+1))`` microseconds (values under 1 µs go
    to bucket 0), so a percentile is off by at most half a bucket, 0.5 %, whatever the range:
    HdrHistogram's idea (HdrHistogram/HdrHistogram; 3 significant digits is its usual setting) at
    2 significant digits, which is what a p99 in a report needs. Count, max and sum are exact.
    """

    GROWTH = _GROWTH
    __slots__ = ("buckets", "count", "max_ms", "sum_ms", "negative")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max_ms = 0.0
        self.sum_ms = 0.0
        # Receive time before the stamp: only clock steps or resolution make this; recorded as 0.
        self.negative = 0

    def record(self, ms: float, n: int = 1) -> None:
        """Add one latency in milliseconds (``n`` of them: pushes sent and answered together)."""
        if ms < 0.0:
            self.negative += n
            ms = 0.0
        us = ms * 1000.0
        index = int(_log(us) / _LOG_GROWTH) if us > 1.0 else 0
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + n
        self.count += n
        self.sum_ms += ms * n
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: "LatencyHistogram") -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.negative += other.negative
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, q: float) -> float:
        """The value (ms) at quantile ``q`` in [0, 100]: the geometric middle of its bucket,
        capped at the exact max. 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                middle_us = self.GROWTH ** (index + 0.5) if index else 0.5
                return min(middle_us / 1000.0, self.max_ms)
        return self.max_ms  # pragma: no cover - ranks never exceed the count

    def summary(self) -> dict[str, float]:
        """``{"count", "p50", "p90", "p99", "max", "mean"}`` in milliseconds, 3 decimals."""
        return {
            "count": self.count,
            "p50": round(self.percentile(50), 3),
            "p90": round(self.percentile(90), 3),
            "p99": round(self.percentile(99), 3),
            "max": round(self.max_ms, 3),
            "mean": round(self.sum_ms / self.count, 3) if self.count else 0.0,
        }

    def cdf(self) -> list[tuple[float, float]]:
        """(latency ms, fraction of values ≤ it) at each bucket's upper edge (the last capped at
        the exact max), from (the first bucket's lower edge, 0): a step plot drawn "post"."""
        if not self.count:
            return []
        indexes = sorted(self.buckets)
        first_ms = self.GROWTH ** indexes[0] / 1000.0 if indexes[0] else 0.0
        points, seen = [(min(first_ms, self.max_ms), 0.0)], 0
        for index in indexes:
            seen += self.buckets[index]
            points.append((min(self.GROWTH ** (index + 1) / 1000.0, self.max_ms),
                           seen / self.count))
        return points

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form for sending between processes (keys become strings in JSON)."""
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "count": self.count,
                "max_ms": self.max_ms, "sum_ms": self.sum_ms, "negative": self.negative}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyHistogram":
        hist = cls()
        hist.buckets = {int(k): int(v) for k, v in data.get("buckets", {}).items()}
        hist.count = int(data.get("count", 0))
        hist.max_ms = float(data.get("max_ms", 0.0))
        hist.sum_ms = float(data.get("sum_ms", 0.0))
        hist.negative = int(data.get("negative", 0))
        return hist
