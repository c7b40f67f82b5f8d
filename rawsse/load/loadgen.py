"""What the two load tools share (``rawsse devices``, ``rawsse push``): token schemes, the target
URL, source addresses, the open-file limit, forked workers that report over pipes, and output.

Token schemes: ``fleet`` is Fleet mdmtest's ``hex("token" + serial)`` (fleetdm/fleet
``pkg/mdm/mdmtest/apple.go`` TokenUpdate). mdmtest draws a random 12-character serial from
``0-9A-Z`` (``RandSerialNumber``); rawsse uses the 12-digit decimal index, ``f"{i:012d}"``: the
same length and alphabet, so the same 34-hex-digit tokens, and reproducible, so ``rawsse push
--tokens fleet:A-B`` reaches the devices started with ``--token-start A``. The push payload is
``{"mdm":"pushmagic" + serial}``, mdmtest's PushMagic. ``random`` tokens are 32 bytes (Apple's
size) derived from (seed, index), so both tools derive the same ones without a file.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import math
import os
import select
import signal
import socket
import sys
import time
import traceback
import urllib.parse
from typing import Any, Callable, NoReturn

import orjson

from rawsse.config import ConfigError

FLEET_SERIAL_DIGITS = 12
# Share of the ephemeral range one source address may use. Past about half the range, Linux
# connect() searches for a free port at 100% system CPU (the bench stalled at 14.1k connections
# per source with a 28,232-port range; 0.45 held 70k at 4,000/s with no stall), so stay under it.
PORT_RANGE_SHARE = 0.45
MAX_PORTS_PER_SOURCE = 29_000  # 45% of the widest range tune/ sets (1024-65535)
REAP_GRACE = 5.0
# A server that is down stays down for a run: retrying longer only hides it (``--give-up-after``).
GIVE_UP_AFTER = 10.0

# Exit codes of both tools (``--help`` lists them; an interrupted push adds 128 + the signal).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# A push connection's life (rawsse.load.h1sender, h2sender): only READY ones count as up.
CONNECTING, READY, CLOSED = range(3)

# errno → the error kind both tools count.
ERRNO_KIND = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset", errno.EPIPE: "reset",
              errno.ETIMEDOUT: "timeout", errno.EADDRNOTAVAIL: "no_ports",
              errno.EADDRINUSE: "no_ports", errno.EMFILE: "emfile", errno.ENFILE: "enfile",
              errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable"}


def error_kind(err: int | None, default: str) -> str:
    if not err:
        return default
    return ERRNO_KIND.get(err) or errno.errorcode.get(err, default).lower()


# -- token schemes ------------------------------------------------------------------------------

def fleet_serial(index: int) -> str:
    return f"{index:0{FLEET_SERIAL_DIGITS}d}"


def fleet_token(index: int) -> str:
    """Fleet mdmtest's device token for serial ``fleet_serial(index)``: hex("token" + serial)."""
    return ("token" + fleet_serial(index)).encode().hex()


def random_token(index: int, seed: int = 0) -> str:
    """A 32-byte token that looks random but is reproducible from (seed, index)."""
    return hashlib.sha256(b"rawsse-token:%d:%d" % (seed, index)).hexdigest()


def read_token_file(path: str, flag: str) -> list[str]:
    """One hex token per line; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.strip().lower() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc}") from None
    return [line for line in lines if line and not line.startswith("#")]


def tokens_for(scheme: str, start: int, count: int, seed: int = 0,
               flag: str = "--token-scheme") -> list[str]:
    """``count`` tokens from index ``start`` of ``scheme`` (``fleet``, ``random``, ``file:PATH``)."""
    if start < 0 or count < 0:
        raise ConfigError(flag, "token indexes start at 0")
    if scheme == "fleet":
        return [fleet_token(i) for i in range(start, start + count)]
    if scheme == "random":
        return [random_token(i, seed) for i in range(start, start + count)]
    if scheme.startswith("file:"):
        tokens = read_token_file(scheme[5:], flag)
        if start + count > len(tokens):
            raise ConfigError(flag, f"{scheme[5:]} holds {len(tokens)} tokens; "
                                    f"{start + count} are needed")
        return tokens[start:start + count]
    raise ConfigError(flag, f"{scheme!r}: use fleet, random or file:PATH")


# -- addresses ----------------------------------------------------------------------------------

def parse_url(url: str, flag: str = "--url", https: bool = False) -> tuple[str, int, str]:
    """``http://host[:port][/base]`` (or ``https://`` when ``https``) → (IPv4 address, port,
    base path without trailing /)."""
    parts = urllib.parse.urlsplit(url)
    schemes = ("http", "https") if https else ("http",)
    if parts.scheme not in schemes or not parts.hostname:
        wanted = "an http:// or https://HOST:PORT URL" if https else "an http://HOST:PORT URL"
        raise ConfigError(flag, f"{url!r} is not {wanted}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = str(socket.getaddrinfo(parts.hostname, port, socket.AF_INET)[0][4][0])
    except (OSError, ValueError) as exc:
        raise ConfigError(flag, f"{url!r}: {exc}") from None
    return host, port, parts.path.rstrip("/")


def host_header(host: str, port: int) -> str:
    return host if port == 80 else f"{host}:{port}"


def ports_per_source() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # the kernel default
    return min(MAX_PORTS_PER_SOURCE, int((high - low + 1) * PORT_RANGE_SHARE))


def loopback_sources(n: int) -> list[str]:
    """``n`` loopback addresses from 127.0.0.2 up (all of 127/8 is local on Linux)."""
    first = int(ipaddress.IPv4Address("127.0.0.2"))
    return [str(ipaddress.IPv4Address(first + k)) for k in range(n)]


def parse_sources(spec: str, count: int, dest_host: str,
                  flag: str = "--source-addresses") -> list[str]:
    """``auto`` | ``none`` | N | ``A-B`` (IPv4 range) | ``a,b,c`` → source addresses ([] = any)."""
    spec = spec.strip()
    if spec == "none":
        return []
    if spec == "auto":
        needed = math.ceil(count / ports_per_source())
        if needed <= 1:
            return []
        if not dest_host.startswith("127."):
            raise ConfigError(flag, f"{count} connections to one address need {needed} source "
                                    f"addresses; name addresses this host owns")
        return loopback_sources(needed)
    if spec.isdigit():
        return loopback_sources(int(spec))
    try:
        if "-" in spec:
            low, high = (int(ipaddress.IPv4Address(p.strip())) for p in spec.split("-", 1))
            if high < low:
                raise ValueError("the range ends below its start")
            return [str(ipaddress.IPv4Address(a)) for a in range(low, high + 1)]
        return [str(ipaddress.IPv4Address(p.strip())) for p in spec.split(",")]
    except ValueError as exc:
        raise ConfigError(flag, f"{spec!r}: {exc} (auto, none, N, A-B or a,b,c)") from None


# -- forked workers reporting JSON lines over pipes ----------------------------------------------

def fork_workers(slices: list[tuple[int, int]],
                 work: Callable[[int, int, int], int]) -> dict[int, tuple[int, int]]:
    """Fork one child per ``(first, count)`` slice running ``work(first, count, write_fd)``;
    returns ``{read fd: (slice index, pid)}``. A child exits with ``work``'s return value, or 1
    after printing the traceback."""
    children: dict[int, tuple[int, int]] = {}
    for index, (first, count) in enumerate(slices):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            for fd in children:  # other children's pipes are not ours to hold open
                os.close(fd)
            _child_exit(work, first, count, write_fd)
        os.close(write_fd)
        children[read_fd] = (index, pid)
    return children


def _child_exit(work: Callable[[int, int, int], int], first: int, count: int,
                write_fd: int) -> NoReturn:
    code = 1
    try:
        code = work(first, count, write_fd)
    except BaseException:  # the parent counts the failure; the traceback goes to stderr
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def send_line(write_fd: int, message: dict[str, Any]) -> None:
    """One JSON line to the parent; blocking (the parent reads as they come)."""
    os.write(write_fd, orjson.dumps(message) + b"\n")


def collect_lines(children: dict[int, tuple[int, int]], on_line: Callable[[int, dict], None],
                  on_second: Callable[[], None], should_stop: Callable[[], bool],
                  deadline: float, stop_signals: StopSignals) -> int:
    """Read every child's JSON lines until all pipes close or ``deadline`` (monotonic) passes.

    A signal in ``stop_signals`` (SIGINT/SIGTERM to the parent), or ``should_stop()``, sends
    SIGTERM to the children once (each ends its run and writes its final line). Calls
    ``on_second`` about once a second. Returns how many children failed (non-zero exit, or ended
    by SIGKILL at the deadline).
    """
    poller = select.poll()
    buffers = {fd: b"" for fd in children}
    for fd in children:
        poller.register(fd, select.POLLIN)
    signalled = False
    next_second = time.monotonic() + 1.0
    while buffers and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                del buffers[fd]
                continue
            *lines, buffers[fd] = (buffers[fd] + chunk).split(b"\n")
            for line in lines:
                on_line(children[fd][0], orjson.loads(line))
        if not signalled and (stop_signals.received or should_stop()):
            signalled = True
            for _, pid in children.values():
                signal_child(pid, signal.SIGTERM)
        if time.monotonic() >= next_second:
            on_second()
            next_second += 1.0
    return reap(children)


def signal_child(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap(children: dict[int, tuple[int, int]]) -> int:
    """Wait for every child (one that closed its pipe exits within moments); one still running
    after ``REAP_GRACE`` seconds is ours to end, by PID. Returns how many failed."""
    failed = 0
    for fd, (_, pid) in children.items():
        os.close(fd)
        deadline = time.monotonic() + REAP_GRACE
        done, status = os.waitpid(pid, os.WNOHANG)
        while done == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
            done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            signal_child(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    return failed


# -- output -------------------------------------------------------------------------------------

class ProgressLine:
    """One status line on stderr: rewritten in place on a terminal, one line per call otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            print("\r\x1b[K" + text, end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def check_report_path(path: str | None, flag: str = "--report") -> None:
    """Fail at the start, not after an hour of load, when the report could not be written: open
    the file for appending (an existing one is left as it is) and remove it again if it was new."""
    if not path:
        return
    existed = os.path.lexists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(flag, f"cannot write {path}: {exc.strerror}") from None
    if not existed:
        os.unlink(path)


def write_report(report: dict[str, Any], path: str | None) -> None:
    """The JSON report to ``path``, or to stdout without one."""
    data = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    if path:
        with open(path, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def count_summary(counts: dict[str, int]) -> str:
    """``{"connect_refused": 20, "lost_timeout": 5}`` → ``"25 (connect_refused 20, lost_timeout
    5)"``, most frequent first: what went wrong, not only how often."""
    total = sum(counts.values())
    if not total:
        return "0"
    kinds = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{total} ({', '.join(f'{kind} {n}' for kind, n in kinds)})"


def below_share(good: int, total: int, fail_under: float | None) -> bool:
    """The ``--fail-under`` test of both tools: ``good / total`` under the share, or, without the
    flag, not one good outcome at all."""
    if fail_under is None:
        return good == 0
    return total == 0 or good / total < fail_under


def share_verdict(tool: str, good: int, total: int, fail_under: float | None, what: str,
                  tally: str) -> int:
    """EXIT_OK, or EXIT_FAILED with its closing line when ``good`` of ``total`` is too few."""
    if not below_share(good, total, fail_under):
        return EXIT_OK
    wanted = "at least one" if fail_under is None else f"--fail-under {fail_under:g}"
    closing_line(tool, f"{good} of {total} {what}, wanted {wanted}: {tally}")
    return EXIT_FAILED


def add_exit_arguments(parser: Any, share_of: str, default_verdict: str, give_up: str) -> None:
    """``--fail-under`` and ``--give-up-after``, worded for the tool."""
    parser.add_argument("--fail-under", type=float, metavar="SHARE",
                        help=f"exit 1 when {share_of} is below SHARE (0-1, e.g. 0.99); "
                             f"default: {default_verdict}")
    parser.add_argument("--give-up-after", type=float, default=GIVE_UP_AFTER, metavar="SECONDS",
                        help=f"{give_up}; 0 = keep trying (default {GIVE_UP_AFTER:g})")


def check_exit_arguments(args: Any) -> None:
    if args.fail_under is not None and not 0 <= args.fail_under <= 1:
        raise ConfigError("--fail-under", f"{args.fail_under:g} is not a share between 0 and 1")
    if args.give_up_after < 0:
        raise ConfigError("--give-up-after", "must be ≥ 0 (0 = keep trying)")
    check_report_path(args.report)


class StopSignals:
    """SIGINT and SIGTERM noted, not raised: a run told to stop ends its work, then still writes
    its report and its closing summary (a KeyboardInterrupt would unwind past both)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        self.previous = {sig: signal.signal(sig, self._note)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    @property
    def name(self) -> str | None:
        """The first signal received (``"SIGINT"``), or None."""
        return signal.Signals(self.received[0]).name if self.received else None


def closing_line(tool: str, text: str) -> None:
    """The one line a run ends with when it did not end as planned (always shown)."""
    print(f"rawsse {tool}: {text}", file=sys.stderr, flush=True)


def merge_counts(into: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n
    return into
