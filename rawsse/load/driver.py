"""``rawsse push``: send pushes the way Fleet does (or broadcasts) and report what came back.

Theory of operation
-------------------
One process, one ``rawsse.server.loop.Loop``, ``--senders`` keep-alive HTTP/1.1 connections
(Fleet's push service runs 5 workers: fleetdm/fleet ``server/mdm/nanomdm/push/``), each with up to
``--pipeline`` requests in flight (the server answers pipelined requests in order, RFC 9112
§9.3.2). Push ``k`` has a *scheduled* time: ``start + k / rate`` when rate-paced, its actual send
time when not. The connections whose slots a loop turn's reads freed are refilled at the end of
that turn (``freed``: the pushes due, one ``send()`` each); ``pump()`` hands every push whose
time has come to senders with a free slot, at the start, on a timer at the next scheduled time,
and whenever a refill found nothing due. Answers are read by ``rawsse.load.h1answers`` (the
common one without httptools) and matched to requests in order.

Latency is measured from the scheduled time, so a server that stalls is charged for every push that
waited behind the stall, not only the one in flight (coordinated omission: the method of
giltene/wrk2, see its README, and of tsenart/vegeta). Each push's ``apns-id`` is a v7 UUID stamped
with the same scheduled time (``rawsse.load.stamp``), so devices measure end to end from the same
origin; ``--no-stamp`` sends no apns-id, i.e. exactly Fleet's request.

Rules
-----
- Bounded: ``--count`` pushes, or ``--duration`` seconds, and a hard ``--max-time``; a push still
  unanswered after ``--timeout`` ends its connection (counted as lost), and the sender reconnects.
- The bytes of a request (Fleet's, by default) are built in ``rawsse.load.pushrequest``.
- The command line (flags, checks, exit codes) is ``rawsse.load.push``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import ssl
import time
import urllib.parse
from typing import Any

import orjson

from rawsse.load import broadcasts, loadgen, progress
from rawsse.server.loop import Loop
from rawsse.load.h1sender import Sender
from rawsse.load.h2request import H2RequestEncoder
from rawsse.load.h2sender import H2Sender
from rawsse.load.loadgen import READY
from rawsse.load.pushrequest import RequestBuilder, parse_targets
from rawsse.load.stamp import LatencyHistogram

TICK_SECONDS = 0.25
# Without --duration and --rate, nothing else bounds a run of --count pushes.
UNPACED_MAX_TIME = 600.0


class Driver:
    """The schedule, the senders and the counters of one ``rawsse push`` run."""

    def __init__(self, args: argparse.Namespace, loop: Loop) -> None:
        host, port, base = loadgen.parse_url(args.url, https=args.http2)
        self.loop = loop
        self.address = (host, port)
        self.builder = RequestBuilder(args, loadgen.host_header(host, port), base)
        url = urllib.parse.urlsplit(args.url)
        self.server_name = url.hostname or host  # TLS: SNI and the name the certificate must hold
        self.http2 = args.http2
        self.streams_wanted = args.streams  # --http2: streams in flight per connection, at most
        self.h2_encoder = H2RequestEncoder(args, url.netloc, base, url.scheme)
        self.h2_batches = self.h2_goaways = 0
        self.server_streams: int | None = None  # the lowest MAX_CONCURRENT_STREAMS announced
        self.resent: dict[str, int] = {}  # pushes sent again, by why (goaway, refused)
        self.retry: collections.deque[tuple[int, float]] = collections.deque()  # (k, scheduled)
        self.targets = None if args.broadcast else parse_targets(args.tokens, args.token_seed)
        if self.targets is not None:
            self.builder.bind(self.targets)
        self.pipeline = args.pipeline
        self.rate = args.rate
        self.timeout = args.timeout
        self.give_up_after: float = args.give_up_after
        if args.count is not None:
            self.total: float = args.count
        elif args.duration is not None:
            self.total = math.inf
        else:
            self.total = 1 if self.targets is None else len(self.targets)
        self.send_until = math.inf if args.duration is None else args.duration
        self.max_time = args.max_time or default_max_time(args, self.total)
        tls = tls_context(args.cacert) if url.scheme == "https" else None
        # --verify: the apns-id of every 200, asked about after the run (verify.py)
        self.verify_ids: list[bytes] | None = [] if args.verify else None
        self.verification: dict[str, Any] | None = None
        self.senders: list[Sender] = [H2Sender(self, tls) if args.http2 else Sender(self)
                                      for _ in range(args.senders)]
        self.progress_line = loadgen.ProgressLine(args.quiet)
        # state
        self.start = self.wall_start = 0.0
        self.next_index = 0
        self.rr = 0
        self.pump_queued = False
        self.freed_senders: list[Sender] = []  # HTTP/1.1 senders to refill at the turn's end
        self.wake_timer: list | None = None
        self.finished = False
        self.ended = "done"  # or max_time, gave_up, SIGINT, SIGTERM: why the run ended
        self.ever_up = False
        self.last_up = 0.0  # the last time a sender was connected
        self.last_answer = self.next_progress = 0.0
        # counters
        self.sent = self.accepted = 0
        self.broadcasts = broadcasts.BroadcastTally() if self.targets is None else None
        self.statuses: dict[str, int] = {}  # answers other than 200 ("accepted"), by key
        self.errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        # once a second: the rate pushes are done at (for the ETA) and the report's series
        self.pace = progress.RateMeter()
        self.series = progress.Series(("accepted", "rejected", "errors"))

    # schedule -------------------------------------------------------------------------------------

    def begin(self) -> None:
        # What exists now (the targets, the modules) lives as long as the run: out of the
        # collector's way, so a full collection never scans it again (collections took 4.5k of a
        # keep-alive push's instructions in bench/sender_probe.py under callgrind; this saves
        # 1.2k of them).
        gc.collect()
        gc.freeze()
        self.start = self.last_answer = self.last_up = self.loop.now
        self.next_progress = self.start + 1.0
        self.wall_start = time.time() - (time.monotonic() - self.start)
        if self.rate > 0:
            self.builder.pace(self.wall_start, self.rate)
        for sender in self.senders:
            sender.connect()
        self.loop.call_later(self.max_time, self.abort)
        self.loop.call_later(TICK_SECONDS, self.tick)

    def due(self, now: float) -> float:
        """How many pushes may have been handed out by ``now``."""
        if now - self.start >= self.send_until:
            return self.next_index
        if self.rate <= 0:
            return self.total
        return min(self.total, math.floor((now - self.start) * self.rate) + 1)

    def request_pump(self) -> None:
        if not self.pump_queued:
            self.pump_queued = True
            self.loop.call_soon(self.pump)

    def pump(self) -> None:
        self.pump_queued = False
        if self.finished:
            return
        now = self.loop.now
        limit = self.due(now)
        senders = self.senders
        for i in range(len(senders)):
            if self.next_index >= limit and not self.retry:
                break
            sender = senders[(self.rr + i) % len(senders)]
            take = int(min(sender.free_slots, limit - self.next_index + len(self.retry)))
            if take <= 0:
                continue
            if isinstance(sender, H2Sender):
                sender.write(b"".join([self._request(sender, now) for _ in range(take)]))
            else:
                self._send_h1(sender, take, now)
        self.rr = (self.rr + 1) % len(senders)
        self._arm_wake(now)
        self.check_done()

    def freed(self, sender: Sender) -> None:
        """HTTP/1.1: a read freed ``sender``'s slots. Refilled at the end of the loop turn, with
        every other connection the turn's reads freed: the server then gets one burst of
        requests, handled in one of its wakeups, rather than a wakeup per request (on 2 cores,
        wakeups are most of a keep-alive push's CPU, on both sides)."""
        freed = self.freed_senders
        freed.append(sender)
        if len(freed) == 1:
            self.loop.call_soon(self._refill)

    def _refill(self) -> None:
        """What is due goes out on each freed connection, one send each; the rest (the end of
        the run, a rate-paced wait) is ``pump``'s."""
        freed, self.freed_senders = self.freed_senders, []
        if self.finished:
            return
        now = self.loop.now
        limit = self.due(now)
        pipeline = self.pipeline
        for sender in freed:
            if sender.state != READY or sender.out is not None:  # failed, or still writing
                continue
            take = int(min(pipeline - sender.in_flight, limit - self.next_index))
            if take > 0:
                self._send_h1(sender, take, now)
        if self.next_index >= limit:
            self.request_pump()

    def _send_h1(self, sender: Sender, take: int, now: float) -> None:
        """Pushes ``next_index`` … on ``sender``: one write, the requests made in one call."""
        k = self.next_index
        self.next_index = k + take
        self.sent += take
        stamp_at = self.wall_start + (now - self.start)  # unpaced: scheduled as they are sent
        if self.targets is not None:
            data = self.builder.batch(k, take, stamp_at)
        else:
            data = b"".join([self.builder.build(None, b"", self.wall_start + j / self.rate
                                                if self.rate > 0 else stamp_at)
                             for j in range(k, k + take)])
        sender.send_batch(data, k, take, now)

    def _request(self, sender: H2Sender, now: float) -> bytes:
        """HTTP/2: the frames of the next push (or one to send again) on ``sender``."""
        if self.retry:  # sent before, never processed (GOAWAY, REFUSED_STREAM): not counted again
            k, scheduled = self.retry.popleft()
        else:
            k = self.next_index
            self.next_index += 1
            self.sent += 1
            scheduled = self.start + k / self.rate if self.rate > 0 else now
        stamp_at = self.wall_start + (scheduled - self.start)
        if self.targets is None:
            return sender.request(k, None, b"", stamp_at, scheduled, now)
        i = k % len(self.targets)
        return sender.request(k, self.targets.paths[i], self.targets.serial(i), stamp_at,
                              scheduled, now)

    def resend(self, k: int, scheduled: float, why: str) -> None:
        """Push ``k`` was not processed by the server (RFC 9113 §8.7): send it again."""
        self.retry.append((k, scheduled))
        self.resent[why] = self.resent.get(why, 0) + 1
        self.request_pump()

    def note_server_streams(self, value: int) -> None:
        if self.server_streams is None or value < self.server_streams:
            self.server_streams = value

    def _arm_wake(self, now: float) -> None:
        """A timer at the next push's scheduled time (rate-paced runs only)."""
        if self.rate <= 0 or self.next_index >= self.total or self.wake_timer is not None:
            return
        when = self.start + self.next_index / self.rate
        if when - self.start < self.send_until:
            self.wake_timer = self.loop.call_later(max(0.0, when - now), self._wake)

    def _wake(self) -> None:
        self.wake_timer = None
        self.pump()

    # results --------------------------------------------------------------------------------------

    def record(self, status: int, body: bytes, scheduled: float) -> None:
        """HTTP/2: one answer and its latency (HTTP/1.1 senders count latencies per batch)."""
        now = time.monotonic()
        self.last_answer = now
        self.latency.record((now - scheduled) * 1000.0)
        self.answer(status, body, b"")

    def answer(self, status: int, body: bytes, apns_id: bytes) -> None:
        """One answer's status (a plain 200 is counted in ``accepted`` by the HTTP/1.1 reader
        alone); ``apns_id`` of a 200 is noted for --verify."""
        if status == 200:
            self.accepted += 1
            if self.broadcasts is not None:
                self.broadcasts.add(body)
            if apns_id and self.verify_ids is not None:
                self.verify_ids.append(apns_id)
            return
        reason = _json_field(body, "reason", str)
        key = f"{status} {reason}" if reason else str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def count_error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n

    def check_done(self) -> None:
        if self.finished or self.retry or any(s.pushes_in_flight() for s in self.senders):
            return
        if self.next_index >= self.total or self.loop.now - self.start >= self.send_until:
            self.finish()

    def tick(self) -> None:
        if self.finished:
            return
        now = time.monotonic()
        for sender in self.senders:
            sender.check_timeout(now, self.timeout)
        if self._gave_up(now):
            return
        self.request_pump()
        if now >= self.next_progress:
            self.next_progress += 1.0
            self.sample_second()
            self.show_progress()
        self.loop.call_later(TICK_SECONDS, self.tick)

    def _gave_up(self, now: float) -> bool:
        """No sender connected for ``--give-up-after`` seconds: the server is not there."""
        if any(sender.state == READY for sender in self.senders):
            self.last_up = now
            self.ever_up = True
            return False
        if not self.give_up_after or now - self.last_up < self.give_up_after:
            return False
        self.ended = "gave_up"
        self.finish()
        return True

    def abort(self) -> None:
        """``--max-time`` passed: what is still in flight is lost, what is unsent stays unsent."""
        self.stop_early("max_time")

    def stop_early(self, why: str) -> None:
        """End now (``--max-time``, SIGINT, SIGTERM): pushes in flight are counted as lost."""
        if self.finished:
            return
        for sender in self.senders:
            lost = sender.pushes_in_flight()
            if lost:
                self.count_error(f"lost_{why.lower()}", lost)
                sender.forget_in_flight()
        self.ended = why
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.retry:  # to be sent again when the run ended: never answered
            self.count_error(f"lost_{self.ended.lower()}", len(self.retry))
            self.retry.clear()
        for sender in self.senders:
            sender.shutdown()
        self.series.close(self.loop.now - self.start, self.series_totals())
        self.loop.stop()

    def sample_second(self) -> None:
        elapsed = self.loop.now - self.start
        self.pace.sample(elapsed, self.done())
        self.series.sample(elapsed, self.series_totals())

    def done(self) -> int:
        """Pushes handed out that are no longer in flight nor waiting to be sent again."""
        return (self.next_index - sum(s.pushes_in_flight() for s in self.senders)
                - len(self.retry))

    def series_totals(self) -> tuple[int, int, int]:
        return (self.accepted, sum(self.statuses.values()), sum(self.errors.values()))

    def show_progress(self) -> None:
        elapsed = max(1e-6, self.loop.now - self.start)
        self.progress_line.show(
            f"push t={elapsed:5.1f}s sent {self.sent} accepted {self.accepted} "
            f"({self.accepted / elapsed:.0f}/s) rejected {loadgen.count_summary(self.rejected())} "
            f"in-flight {sum(s.pushes_in_flight() for s in self.senders)}{self._streams_shown()} "
            f"errors {loadgen.count_summary(self.errors)} "
            f"p99 {self.latency.percentile(99):.2f} ms"
            f"{self.broadcasts.progress_text() if self.broadcasts else ''} {self.eta()}")

    def eta(self) -> str:
        """From what bounds the run: ``--duration`` (exact), ``--count`` (or one push per
        target) at the rate pushes were done over the last seconds."""
        if self.finished:
            return progress.eta_text(0.0)
        elapsed = self.loop.now - self.start
        time_left = None if math.isinf(self.send_until) else max(0.0, self.send_until - elapsed)
        work_left = None if math.isinf(self.total) else self.total - self.done()
        return progress.eta_text(time_left, work_left, self.pace.rate)

    def _streams_shown(self) -> str:
        """--http2: the streams the connections up may have in flight, e.g. ``/500 streams``."""
        if not self.http2:
            return ""
        up = [s for s in self.senders if s.state == READY or self.finished]
        return f"/{sum(getattr(s, 'streams_limit', 0) for s in up)} streams"

    def rejected(self) -> dict[str, int]:
        return dict(self.statuses)

    def report(self) -> dict[str, Any]:
        duration = max(1e-6, self.last_answer - self.start)
        planned = self.total
        if self.rate > 0 and not math.isinf(self.send_until):  # push k is due at k / rate
            planned = min(planned, math.ceil(self.send_until * self.rate))
        unsent = 0 if math.isinf(planned) else max(0, int(planned) - self.next_index)
        report: dict[str, Any] = {
            "sent": self.sent, "accepted": self.accepted,
            "per_second": round(self.accepted / duration, 1),
            "statuses": dict(sorted({**({"200": self.accepted} if self.accepted else {}),
                                     **self.statuses}.items())),
            "latency_ms": self.latency.summary(),
            "duration_s": round(duration, 3),
            "errors": dict(sorted(self.errors.items())), "unsent": unsent,
            "mode": "broadcast" if self.targets is None else "targeted",
            "senders": len(self.senders), "pipeline": self.pipeline, "rate": self.rate,
            "ended": self.ended,
            "series": self.series.to_dict(),
            "latency_histogram": self.latency.to_dict(),
        }
        if self.broadcasts is not None:
            report.update(self.broadcasts.report())
        if self.http2:
            report["http2"] = self.http2_report()
        if self.verification is not None:
            report["verify"] = self.verification
        return report

    def http2_report(self) -> dict[str, Any]:
        """The streams figures: asked, allowed by the server, and how demand was refilled."""
        requests = self.sent + sum(self.resent.values())
        wanted = self.streams_wanted
        return {"streams": wanted, "server_max_streams": self.server_streams,
                "streams_in_flight": min(wanted, self.server_streams or wanted),
                "batches": self.h2_batches,
                "mean_batch": round(requests / self.h2_batches, 1) if self.h2_batches else 0,
                "goaways": self.h2_goaways, "resent": dict(sorted(self.resent.items()))}


def _json_field(body: bytes, name: str, kind: type) -> Any:
    try:
        value = orjson.loads(body).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, kind) else None


def tls_context(cacert: str | None) -> ssl.SSLContext:
    """TLS 1.2+ with ALPN h2, verifying the server against ``--cacert`` (else the system CAs)."""
    context = ssl.create_default_context(cafile=cacert)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def default_max_time(args: argparse.Namespace, total: float) -> float:
    grace = max(10.0, 2 * args.timeout)
    if args.duration is not None:
        return args.duration + grace
    if args.rate > 0:
        return total / args.rate + grace
    return UNPACED_MAX_TIME
