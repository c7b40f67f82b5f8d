"""Operations artefacts: the systemd units, the sysctl drop-ins, ``rawsse tune`` on this machine's
real values, and the runbook's commands against the CLI that really exists.

Everything runs the real tools: ``systemd-analyze`` on the unit files, ``python -m rawsse`` as a
subprocess. The only stand-in is a temporary ``/proc/sys``-shaped directory for ``--apply``,
because writing the shared machine's kernel settings from a test is not acceptable.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rawsse.ops import tune

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "systemd" / "rawsse.service"
DEVICES_TEMPLATE = ROOT / "systemd" / "rawsse-devices@.service"
SERVER_ENV = ROOT / "systemd" / "rawsse.env"
DEVICES_ENV = ROOT / "systemd" / "rawsse-devices.env"
SERVER_SYSCTL = ROOT / "tune" / "99-rawsse-server.conf"
DEVICES_SYSCTL = ROOT / "tune" / "99-rawsse-devices.conf"
RUNBOOK = ROOT / "docs" / "runbook.md"
INSTALLED_BINARY = "/opt/rawsse/bin/rawsse"   # what the units' ExecStart names


def run_rawsse(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rawsse", *args], capture_output=True,
                          text=True, env=env, timeout=60, **kwargs)


# --- systemd units ------------------------------------------------------------------------------

def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd"
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def local_copy(unit: Path, directory: Path) -> Path:
    """The unit with its ExecStart binary pointed at this machine's rawsse (verify insists the
    binary exists); nothing else is changed."""
    text = unit.read_text()
    assert INSTALLED_BINARY in text, f"{unit.name} no longer runs {INSTALLED_BINARY}"
    script = Path(sys.executable).with_name("rawsse")
    binary = script if script.exists() else Path(sys.executable)
    copy = directory / unit.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return copy


def verify_problems(unit_path: Path) -> list[str]:
    """``systemd-analyze verify``: exit status and every message about our unit files (unknown
    keys and unparsable values are only warnings with exit 0, so read the messages too)."""
    result = systemd_analyze("verify", str(unit_path))
    messages = (result.stdout + result.stderr).splitlines()
    problems = [m for m in messages if str(unit_path.parent) in m or "rawsse" in m]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}")
    return problems


def instance_of(template: Path, directory: Path) -> Path:
    """``rawsse-devices@test.service``: verify loads the template from the same directory."""
    local_copy(template, directory)
    return directory / template.name.replace("@.", "@test.")


def test_server_unit_verifies(tmp_path: Path) -> None:
    assert verify_problems(local_copy(SERVICE, tmp_path)) == []


def test_devices_template_verifies(tmp_path: Path) -> None:
    assert verify_problems(instance_of(DEVICES_TEMPLATE, tmp_path)) == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported, although verify exits 0."""
    copy = local_copy(SERVICE, tmp_path)
    copy.write_text(copy.read_text().replace("KillMode=mixed", "KillMod=mixed"))
    assert any("KillMod" in problem for problem in verify_problems(copy))


@pytest.mark.parametrize("unit", [SERVICE, DEVICES_TEMPLATE], ids=lambda p: p.name)
def test_units_stay_hardened(unit: Path, tmp_path: Path) -> None:
    """Overall exposure 1.5-1.6 today ("OK"); fail if a change pushes it past 2.5."""
    path = local_copy(unit, tmp_path)
    if "@." in unit.name:
        path = instance_of(unit, tmp_path)
    result = systemd_analyze("security", "--offline=true", "--threshold=25", str(path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def unit_settings(unit: Path) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def test_server_unit_timeouts_cover_the_drain() -> None:
    """systemd must not SIGKILL a drain: TimeoutStopSec above the configured --drain-seconds
    (the master also sends EXTEND_TIMEOUT_USEC), and a watchdog generous enough (30-60 s) that a
    busy moment does not drop every stream."""
    settings = unit_settings(SERVICE)
    drain = re.search(r"--drain-seconds\s+(\d+)", env_values(SERVER_ENV)["RAWSSE_ARGS"])
    assert drain, "the example env file should state --drain-seconds"
    assert int(settings["TimeoutStopSec"]) >= int(drain.group(1)) + 10
    assert 30 <= int(settings["WatchdogSec"]) <= 60
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed"
    assert int(settings["LimitNOFILE"]) == tune.UNIT_LIMIT_NOFILE


# --- sysctl drop-ins ----------------------------------------------------------------------------

def sysctl_file(path: Path) -> dict[str, str]:
    """name -> value; a leading "-" (ignore if absent) is dropped from the name."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            name, _, value = line.partition("=")
            values[name.strip().lstrip("-")] = " ".join(value.split())
    return values


@pytest.mark.parametrize("path", [SERVER_SYSCTL, DEVICES_SYSCTL], ids=lambda p: p.name)
def test_sysctl_keys_exist(path: Path) -> None:
    """A misspelt key is silently useless; every key not marked optional exists here."""
    for line in path.read_text().splitlines():
        name = line.partition("=")[0].strip()
        if name and not name.startswith(("#", ";", "-")):
            assert os.path.exists(tune.sysctl_path(name)), f"{path.name}: no such sysctl {name}"


def test_sysctl_files_agree_where_they_overlap() -> None:
    """Both files load on a single-VM test; the later one must not silently win."""
    server, devices = sysctl_file(SERVER_SYSCTL), sysctl_file(DEVICES_SYSCTL)
    for name in server.keys() & devices.keys():
        assert server[name] == devices[name], name


@pytest.mark.parametrize("path, role", [(SERVER_SYSCTL, tune.SERVER),
                                        (DEVICES_SYSCTL, tune.DEVICES)], ids=["server", "devices"])
def test_sysctl_file_satisfies_tune_for_300k(path: Path, role: str) -> None:
    """The shipped values pass `rawsse tune --check --connections 300000` (sysctl rows; memory
    and the fd limit depend on the VM)."""
    live = tune.read_host()
    host = tune.Host(sysctls={**live.sysctls, **sysctl_file(path)}, nofile=live.nofile,
                     mem_total=live.mem_total, mem_available=live.mem_available)
    low = [row.setting for row in tune.evaluate(host, 300_000, role)
           if row.status == tune.LOW and row.write is not None]
    assert low == []


# --- rawsse tune on this machine ----------------------------------------------------------------

def status_rows(stdout: str) -> dict[str, str]:
    """setting -> status from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] in (tune.OK, tune.LOW, tune.INFO):
            rows[parts[0]] = parts[-1]
    return rows


def test_tune_check_low_for_an_impossible_target() -> None:
    """50M connections exceed this machine's memory and fs.file-max whatever the tuning."""
    result = run_rawsse("tune", "--check", "--connections", "50000000")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = status_rows(result.stdout)
    assert rows.get("memory") == tune.LOW and rows.get("fs.file-max") == tune.LOW, result.stdout


@pytest.mark.parametrize("role", [tune.SERVER, tune.DEVICES])
def test_tune_check_ok_for_a_small_fleet(role: str) -> None:
    result = run_rawsse("tune", "--check", "--connections", "100", "--role", role)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = status_rows(result.stdout)
    assert rows and tune.LOW not in rows.values(), result.stdout
    assert "RLIMIT_NOFILE" in rows and "memory" in rows


def test_tune_reports_workers_needed_at_the_fd_limit() -> None:
    soft = tune.read_nofile()[0]
    n = 3 * (soft - tune.FDS_RESERVED_PER_PROCESS) + 1
    result = run_rawsse("tune", "--check", "--connections", str(n))
    assert re.search(r"^workers needed\s.*\s4 at soft limit", result.stdout, re.M), result.stdout


@pytest.mark.parametrize("value", ["-5", "abc", "0"])
def test_tune_bad_connections_is_one_readable_line(value: str) -> None:
    result = run_rawsse("tune", "--check", "--connections", value)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--connections" in lines[0], result.stderr


# Parse as root, then become nobody and run: the interpreter may live under a root-only home,
# where nobody could not even start it or import the rest of the standard library.
_AS_NOBODY = ("import os, sys; from rawsse import cli; "
              "args = cli.build_parser('tune').parse_args(sys.argv[1:]); "
              "os.setgid(65534); os.setuid(65534); sys.exit(args.run(args))")


def test_tune_apply_refuses_without_root() -> None:
    args = ["tune", "--apply", "--connections", "300000"]
    if os.geteuid() == 0:
        result = subprocess.run([sys.executable, "-c", _AS_NOBODY, *args], capture_output=True,
                                text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    else:
        result = run_rawsse(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs root" in result.stderr
    assert "Traceback" not in result.stderr


def fake_proc_sys(root: Path, values: dict[str, str]) -> None:
    for name, value in values.items():
        path = root.joinpath(*name.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")


def test_apply_raises_low_values_and_never_lowers(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--apply``'s writer against a /proc/sys-shaped directory (the real one is shared)."""
    fake_proc_sys(tmp_path, {
        "net.core.somaxconn": "4096",
        "net.ipv4.tcp_mem": "287898 5000000 575796",     # middle value already above the need
        "net.ipv4.tcp_migrate_req": "0",
        "net.core.netdev_max_backlog": "100000",          # above the need: must stay
        "fs.file-max": "100",
    })
    monkeypatch.setattr(tune, "PROC_SYS", str(tmp_path))
    live = tune.read_host()
    host = tune.Host(live.sysctls, (20_000, 20_000), 1 << 40, 1 << 40)
    assert tune.apply_rows(tune.evaluate(host, 300_000, tune.SERVER))
    assert tune.read_sysctl("net.core.somaxconn") == "65535"
    assert tune.read_sysctl("net.ipv4.tcp_mem") == "300000 5000000 600000"
    assert tune.read_sysctl("net.ipv4.tcp_migrate_req") == "1"
    assert tune.read_sysctl("net.core.netdev_max_backlog") == "100000"
    assert tune.read_sysctl("fs.file-max") == "340000"
    assert "net.core.somaxconn: 4096 -> 65535" in capsys.readouterr().out


# --- the runbook's commands exist -------------------------------------------------------------

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# An inline `rawsse ...` span is a command, unless it quotes what rawsse prints ("rawsse serve:
# --state-file: cannot write ...": the subcommand followed by a colon).
_INLINE = re.compile(r"`((?:sudo )?rawsse (?![a-z]+:)[^`]+)`")
_COMMAND = re.compile(r"^(?:sudo\s+)?(?:\S*/)?rawsse(?:\s|$)")


def runbook_commands() -> list[str]:
    """Every `rawsse ...` command line in the runbook: code blocks (with backslash continuations
    joined and trailing comments dropped) and inline code spans."""
    text = RUNBOOK.read_text()
    commands = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if _COMMAND.match(line):
                commands.append(line)
    commands += [span for span in _INLINE.findall(text)]
    return commands


def env_commands() -> list[str]:
    """The flags the units and example env files pass, as commands to check the same way."""
    server, devices = env_values(SERVER_ENV), env_values(DEVICES_ENV)
    exec_lines = [line.split("=", 1)[1] for unit in (SERVICE, DEVICES_TEMPLATE)
                  for line in unit.read_text().splitlines()
                  if line.startswith(("ExecStart=", "ExecStartPre="))]
    return [f"rawsse serve {server['RAWSSE_ARGS']}",
            f"rawsse devices {devices['RAWSSE_DEVICES_ARGS']}"] + exec_lines


def env_values(path: Path) -> dict[str, str]:
    """Uncommented KEY=VALUE lines (commented alternatives may name flags that land later)."""
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


@functools.lru_cache(maxsize=None)
def help_text(subcommand: str | None) -> str:
    args = [subcommand, "--help"] if subcommand else ["--help"]
    result = run_rawsse(*args)
    assert result.returncode == 0, f"rawsse {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def check_command(command: str) -> None:
    words = shlex.split(command.replace("${", "{").replace("$", ""))
    words = words[words.index(next(w for w in words if w.endswith("rawsse"))) + 1:]
    subcommand = words[0] if words and not words[0].startswith("-") else None
    usage = help_text(subcommand)
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage), \
            f"{command!r}: rawsse {subcommand or ''} has no {flag}"


def test_runbook_names_every_subcommand() -> None:
    """The extraction finds the commands (an empty list would make the next test vacuous)."""
    used = {shlex.split(c.replace("$", ""))[1 + c.startswith("sudo ")] for c in runbook_commands()
            if not c.startswith("/")}
    assert {"serve", "devices", "push", "tune"} <= used


@pytest.mark.parametrize("command", runbook_commands())
def test_runbook_command_exists(command: str) -> None:
    check_command(command)


@pytest.mark.parametrize("command", env_commands())
def test_unit_and_env_flags_exist(command: str) -> None:
    check_command(command)


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_runbook_links_resolve() -> None:
    """In-page links, alert runbook_urls and `rawsse tune`'s pointer all name real sections."""
    text = RUNBOOK.read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    referenced = set(re.findall(r"\(#([\w-]+)\)", text))
    referenced |= set(re.findall(r"RUNBOOK#([\w-]+)", text))
    referenced |= set(re.findall(r"runbook\.md#([\w-]+)", Path(tune.__file__).read_text()))
    assert referenced and referenced <= anchors, sorted(referenced - anchors)
