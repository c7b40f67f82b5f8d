"""``rawsse push``'s command line: its flags and their checks (``add_arguments``, ``validate``),
the run (``run``: ``rawsse.load.driver``'s loop, then ``--verify``, the report and the summary
table) and its exit code (``verdict``).
"""

from __future__ import annotations

import argparse
import re
import signal
import ssl

from rawsse.config import ConfigError
from rawsse.load import loadgen, summary, verify
from rawsse.load.driver import Driver
from rawsse.load.pushrequest import DEFAULT_PAYLOAD
from rawsse.server.loop import Loop

EPILOG = """\
targets (--tokens):
  fleet:A-B          Fleet mdmtest tokens of serials A..B (inclusive), as `rawsse devices` makes
  random:N           N 32-byte tokens, the same as `rawsse devices --token-scheme random`
  file:PATH[:A-B]    hex tokens, one a line (lines A..B)
examples:
  rawsse push --url http://127.0.0.1:8378 --tokens fleet:0-999 --rate 500 --duration 10
  rawsse push --url http://127.0.0.1:8378 --tokens fleet:0-999 --senders 5 --pipeline 16 --count 100000
  rawsse push --url http://127.0.0.1:8378 --broadcast --count 3 --rate 1
  rawsse push --url http://127.0.0.1:8378 --tokens fleet:0-999 --http2 --streams 100 --count 100000
  rawsse push --url https://localhost:8443 --cacert ca.pem --http2 --tokens fleet:0-999
report (JSON): sent, accepted, per_second (accepted/s), statuses {"200": n, "400 BadDeviceToken": n},
  latency_ms {count,p50,p90,p99,max,mean} (response, from the scheduled send time), duration_s;
  also errors (connect failures; pushes lost in flight), unsent, ended (done, max_time, gave_up,
  SIGINT or SIGTERM). --broadcast adds streams, refused (summed over the 200s), missing {node:
  broadcasts naming it}, missing_reasons, missing_workers {worker, Redis mode node/worker:
  broadcasts naming it}. --http2 adds http2 {streams, server_max_streams,
  streams_in_flight, batches, mean_batch, goaways, resent {goaway, refused}}: a stream the server
  refused or left above a GOAWAY's last-stream-id is sent again on a new connection, counted once;
  connect errors add tls, tls_verify, no_h2 (the server did not choose ALPN h2). series {t_s,
  accepted, rejected, errors}: counts per second-long interval ending t_s s after the start (past
  86,400 samples neighbours merge in pairs); latency_histogram (mergeable): `rawsse report`'s.
progress line (stderr, each second): sent, accepted (/s), rejected (non-200s by status and
  reason), in-flight (--http2: /streams the connections up allow), errors by kind
  (connect_refused, lost_timeout, ...), p99 (--broadcast: streams, refused, missing nodes and
  workers), ETA: the --duration left, or the --count left at the last 5 s's rate ("ETA ?"
  before anything is answered; "ETA ≤0:42" when only the --duration bound is known). At the
  end a summary table (not under --quiet): sent, 200s, each other status, errors by kind,
  pushes/s (--broadcast: streams, a row per missing node or worker, "worker nb/1 missing  3
  broadcasts"), latency p50/p90/p99/max.
exit codes:
  0         the run ended and enough pushes were answered 200 (see --fail-under)
  1         too few 200s: a share under --fail-under or, without it, not one 200; or
            (--verify) a push answered 200 was neither delivered nor pending
  2         a flag cannot be used (one line names it; --report is checked before the run)
  3         no connection to --url for --give-up-after seconds: gave up; or (--verify)
            --admin-url could not be reached
verify (--verify): after the run the apns-id of every 200 goes to the server's deliveries API
  (POST /admin/deliveries on --admin-url, 1,000 a request); the report gains verify {checked,
  delivered, pending, missing, fates, missing_ids, late_nodes}. Each server worker remembers its
  last --delivery-log outcomes (default 100,000): size it above the run's pushes per worker.
  130, 143  ended by SIGINT (Ctrl-C) / SIGTERM: the report and a summary line are still written
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8378", help="server base URL")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tokens", metavar="SCHEME",
                        help="fleet:A-B, random:N or file:PATH[:A-B] (see below)")
    target.add_argument("--broadcast", action="store_true",
                        help="POST /broadcast (every connected device) instead; sums streams "
                             "and refused, names nodes missing from the answers (Redis mode)")
    parser.add_argument("--prefix", metavar="HEX", help="broadcast only to tokens with this prefix")
    parser.add_argument("--token-seed", type=int, default=0, metavar="N",
                        help="seed of random:N tokens (default 0)")
    parser.add_argument("--senders", type=int, default=5, metavar="W",
                        help="keep-alive connections (default 5, Fleet's push workers)")
    parser.add_argument("--pipeline", type=int, default=1, metavar="D",
                        help="requests in flight per connection (default 1)")
    parser.add_argument("--http2", action="store_true",
                        help="send over HTTP/2 (h2c with prior knowledge for http://, TLS with "
                             "ALPN h2 for https://), --streams pushes in flight per connection")
    parser.add_argument("--streams", type=int, default=100, metavar="M",
                        help="--http2: streams in flight per connection, never above the "
                             "server's SETTINGS_MAX_CONCURRENT_STREAMS (default 100); refilled in "
                             "batches once min(50, M/2) are free")
    parser.add_argument("--cacert", metavar="FILE",
                        help="https:// only: PEM CA certificates to verify the server with "
                             "(default: the system's)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="pushes per second in all; 0 = as fast as answers come (default)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="pushes to send, cycling over the targets (default: one per target, "
                             "or one broadcast, unless --duration is given)")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="stop sending after this long")
    parser.add_argument("--max-time", type=float, default=0.0, metavar="SECONDS",
                        help="hard end of the run (default: the duration, or count/rate, plus "
                             "a grace; 600 s when unpaced)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="an answer, or a connect, later than this ends its connection "
                             "(default 10)")
    loadgen.add_exit_arguments(
        parser, share_of="the share of pushes sent that were answered 200",
        default_verdict="exit 1 only when not one push was answered 200 "
                        "(--fail-under 0: never)",
        give_up="end the run (exit 3) when no sender has been connected for this long")
    parser.add_argument("--payload", default=DEFAULT_PAYLOAD,
                        help="request body; <serial> is replaced by the target's serial "
                             f"(default {DEFAULT_PAYLOAD}, Fleet's PushMagic)")
    parser.add_argument("--expiration", type=float, metavar="SECONDS",
                        help="send apns-expiration = now + SECONDS (0: the literal 0, deliver "
                             "now or never); default none, like Fleet's legacy client")
    parser.add_argument("--headers", choices=("fleet", "none"), default="fleet",
                        help="fleet: Go net/http's headers with Content-Type: application/json; "
                             "none: Host and Content-Length only (default fleet)")
    parser.add_argument("--no-stamp", action="store_true",
                        help="send no apns-id (exactly Fleet's bytes; devices see no latency)")
    parser.add_argument("--report", metavar="PATH", help="write the JSON report here (default: "
                                                          "stdout)")
    parser.add_argument("--verify", action="store_true",
                        help="after the run, ask the server's deliveries API what became of each "
                             "push answered 200; exit 1 if any was neither delivered nor pending "
                             "(a push replaced by a newer one for its offline device is "
                             "discarded: newest wins) (see below)")
    parser.add_argument("--admin-url", metavar="URL",
                        help="--verify: the server's operator listener (default: the --url host, "
                             "port + 1, as rawsse serve's default --admin-listen; name it for a "
                             "--tls-listen --url)")
    parser.add_argument("--verify-wait", type=float, default=5.0, metavar="SECONDS",
                        help="--verify: keep asking about pushes whose fate is not known yet "
                             "(in flight between nodes) this long (default 5)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def validate(args: argparse.Namespace) -> None:
    if args.senders < 1 or args.pipeline < 1:
        raise ConfigError("--senders", "--senders and --pipeline must be at least 1")
    if args.streams < 1:
        raise ConfigError("--streams", "must be at least 1")
    if args.url.startswith("https:") and not args.http2:
        raise ConfigError("--url", "https:// needs --http2 (over HTTP/1.1, rawsse push speaks "
                                   "plain http:// only)")
    if args.cacert is not None:
        if not args.url.startswith("https:"):
            raise ConfigError("--cacert", "only for an https:// --url")
        try:
            ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("--cacert", f"{args.cacert}: {exc}") from None
    if args.count is not None and args.count < 1:
        raise ConfigError("--count", "must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration", "must be positive")
    if args.rate < 0 or args.timeout <= 0:
        raise ConfigError("--rate", "--rate must be ≥ 0 and --timeout positive")
    if args.prefix is not None and not re.fullmatch(r"[0-9a-fA-F]*", args.prefix):
        raise ConfigError("--prefix", f"{args.prefix!r} is not hex")
    _validate_verify(args)
    loadgen.check_exit_arguments(args)


def _validate_verify(args: argparse.Namespace) -> None:
    if not args.verify:
        if args.admin_url is not None:
            raise ConfigError("--admin-url", "only with --verify")
        return
    if args.broadcast:
        raise ConfigError("--verify", "checks pushes to tokens: not with --broadcast")
    if args.verify_wait < 0:
        raise ConfigError("--verify-wait", "must be ≥ 0")
    args.admin_url = verify.check_admin_url(args.admin_url or verify.default_admin_url(args.url))


def run_verification(driver: Driver, args: argparse.Namespace) -> int:
    """--verify (``verify.py``): EXIT_OK, or the exit code when the API could not answer."""
    if driver.verify_ids is None or driver.ended in ("SIGINT", "SIGTERM", "gave_up"):
        return loadgen.EXIT_OK
    try:
        driver.verification = verify.verify(args.admin_url, driver.verify_ids, args.verify_wait)
    except verify.VerifyError as exc:
        driver.verification = {"admin_url": args.admin_url, "error": str(exc)}
        loadgen.closing_line("push", f"--verify: {exc}")
        return loadgen.EXIT_UNREACHABLE if exc.unreachable else loadgen.EXIT_FAILED
    return loadgen.EXIT_OK


def run(args: argparse.Namespace) -> int:
    validate(args)
    stops = loadgen.StopSignals().install()
    loop = Loop()
    try:
        driver = Driver(args, loop)

        def on_stop_signal() -> None:  # from the loop, never inside the signal handler
            if stops.name is not None:
                driver.stop_early(stops.name)

        loop.on_wakeup = on_stop_signal
        signal.set_wakeup_fd(loop.wakeup_fd())
        loop.call_soon(driver.begin)
        loop.call_soon(on_stop_signal)  # a signal that came before the loop could hear it
        try:
            loop.run()
        finally:
            signal.set_wakeup_fd(-1)
            driver.finish()
    finally:
        loop.close()
        stops.restore()
    driver.show_progress()
    driver.progress_line.done()
    not_verified = run_verification(driver, args)
    report = driver.report()
    loadgen.write_report(report, args.report)
    summary.show(summary.title("push", report), summary.push_rows(report), args.quiet)
    return verdict(driver, args) or not_verified


def verdict(driver: Driver, args: argparse.Namespace) -> int:
    """The exit code (see EPILOG), with one closing line whenever it is not 0."""
    where = f"report in {args.report}" if args.report else "report on stdout"
    tally = (f"sent {driver.sent}, accepted {driver.accepted}, rejected "
             f"{loadgen.count_summary(driver.rejected())}, errors "
             f"{loadgen.count_summary(driver.errors)}")
    if driver.ended in ("SIGINT", "SIGTERM"):
        elapsed = driver.loop.now - driver.start
        loadgen.closing_line("push", f"stopped by {driver.ended} after {elapsed:.1f} s: {tally}; "
                                     f"{where}")
        return 128 + signal.Signals[driver.ended].value
    if driver.ended == "gave_up":
        what = ("lost the connection to" if driver.ever_up else "could not connect to")
        loadgen.closing_line("push", f"{what} {args.url} for {driver.give_up_after:g} s "
                                     f"(--give-up-after), gave up: {tally}")
        return loadgen.EXIT_UNREACHABLE
    code = loadgen.share_verdict("push", driver.accepted, driver.sent, args.fail_under,
                                 "pushes answered 200", tally)
    checked = driver.verification
    if code == loadgen.EXIT_OK and checked is not None and checked.get("missing"):
        loadgen.closing_line("push", f"{verify.summary(checked)}; {where}")
        return loadgen.EXIT_FAILED
    return code
