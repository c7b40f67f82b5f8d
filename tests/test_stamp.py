"""rawsse.load.stamp: UUIDv7 latency stamps (RFC 9562 §5.7, method 3) and the latency histogram."""

from __future__ import annotations

import random
import re
import time
import uuid

import pytest

from rawsse.load.stamp import LatencyHistogram, new_stamped_id, stamp_time

CANONICAL = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_stamped_id_is_a_canonical_lowercase_v7_uuid() -> None:
    apns_id = new_stamped_id()
    assert CANONICAL.match(apns_id), apns_id
    parsed = uuid.UUID(apns_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert str(parsed) == apns_id  # canonical form: what the server's BadMessageId check wants


def test_stamp_round_trips_below_a_microsecond() -> None:
    for now in (1_700_000_000.0, 1_795_300_655.318437, time.time(), 0.0009, 4_000_000_000.5):
        assert stamp_time(new_stamped_id(now)) == pytest.approx(now, abs=1e-6)


def test_default_stamp_is_the_clock() -> None:
    before = time.time()
    stamped = stamp_time(new_stamped_id())
    after = time.time()
    assert stamped is not None
    assert before - 1e-6 <= stamped <= after + 1e-6


def test_unix_milliseconds_sit_in_the_first_48_bits() -> None:
    apns_id = new_stamped_id(1_700_000_000.123456)
    assert int(apns_id[:8] + apns_id[9:13], 16) == 1_700_000_000_123
    # rand_a: 0.456 ms × 4096 = 1867.8 → 1867 or 1868 depending on float rounding
    assert int(apns_id[15:18], 16) in (1867, 1868)


def test_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_stamped_id(1_700_000_000 + k / 1000) for k in range(2000)]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids  # v7 ids sort by their timestamp (RFC 9562 §5.7)
    same_instant = {new_stamped_id(1_700_000_000.0) for _ in range(5000)}
    assert len(same_instant) == 5000  # 62 random bits keep ids of one instant apart


def test_bytes_and_upper_case_are_read() -> None:
    apns_id = new_stamped_id(1_700_000_000.5)
    assert stamp_time(apns_id.encode()) == stamp_time(apns_id)
    assert stamp_time(apns_id.upper()) == stamp_time(apns_id)


@pytest.mark.parametrize("value", [
    "9f2fd935-a71e-4f46-bb12-9994089c9b2f",       # version 4: no stamp
    "559ef0ba-ed6b-11f1-8f6b-02fc00000001",       # version 1
    "",
    "not-a-uuid",
    "01a20042-00d6-7700-3f3b-6a38cefb1755",       # v7 digit, wrong variant
    "01a20042-00d6-7700-bf3b-6a38cefb175",        # too short
    "01a20042-00d6-7700-bf3b-6a38cefb1755\n",     # trailing newline
    "01a2004200d67700bf3b6a38cefb1755",           # no dashes
    "01a2004g-00d6-7700-bf3b-6a38cefb1755",       # not hex
    b"\xff" * 36,
])
def test_anything_else_is_unstamped(value: str | bytes) -> None:
    assert stamp_time(value) is None


def test_histogram_percentiles_within_one_percent() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(0, 1.5) for _ in range(20_000)]
    hist = LatencyHistogram()
    for ms in samples:
        hist.record(ms)
    samples.sort()
    for q in (50, 90, 99):
        exact = samples[int(len(samples) * q / 100) - 1]
        assert hist.percentile(q) == pytest.approx(exact, rel=0.01), q
    summary = hist.summary()
    assert summary["count"] == 20_000
    assert summary["max"] == round(samples[-1], 3)
    assert summary["mean"] == pytest.approx(sum(samples) / len(samples), abs=0.001)


def test_histogram_merge_and_json_round_trip() -> None:
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for k in range(1, 500):
        (a if k % 2 else b).record(k * 0.37)
        both.record(k * 0.37)
    merged = LatencyHistogram.from_dict(a.to_dict())
    merged.merge(LatencyHistogram.from_dict(b.to_dict()))
    assert merged.summary() == both.summary()
    assert merged.buckets == both.buckets


def test_histogram_edges() -> None:
    hist = LatencyHistogram()
    assert hist.summary() == {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0,
                              "mean": 0.0}
    hist.record(-0.2)  # clock step: counted, as zero
    hist.record(0.0)
    hist.record(0.0004)
    assert hist.negative == 1
    assert hist.count == 3
    assert hist.percentile(100) <= 0.0005
    hist.record(250_000.0)  # four minutes: still one bucket, no growth of the range
    assert hist.percentile(100) == pytest.approx(250_000.0, rel=0.005)
