"""Command line: ``rawsse serve | devices | push | report | tune | certs``. Parses flags into config; no logic.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them together and turns every flag error, argparse's or a ``ConfigError``,
into one line naming the flag (argparse would print the whole usage first, and the top-level
usage for a flag the subcommand does not know).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Any, NoReturn

from rawsse import __version__
from rawsse.config import ConfigError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("rawsse.node.serve", "run the push simulator (APNs push API + SSE device streams)"),
    "devices": ("rawsse.load.devices", "hold N simulated device streams and report what they receive"),
    "push": ("rawsse.load.push", "send pushes like Fleet does (or broadcasts) and report statuses"),
    "report": ("rawsse.load.report", "draw push and devices reports and bench results as PNGs "
                                     "(latency CDF, pushes/s, devices connected)"),
    "tune": ("rawsse.ops.tune", "check (or apply) the kernel and limit settings N connections need"),
    "certs": ("rawsse.ops.certs", "write a throwaway CA, server and client certificates and a .p8 "
                                  "key for --tls-listen"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line (subparsers inherit the class): ``rawsse serve:
    argument --keepalive: expected one argument (rawsse serve --help)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A value such as "-1s" or "-5ms" is a negative duration, not an unknown option: argparse
        # only takes plain numbers ("-1") as values, and would say "expected one argument".
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} ({self.prog} --help)\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` subcommand's module is imported (fast start, and one
    command's imports never break another)."""
    parser = OneLineParser(
        prog="rawsse",
        description="APNs-compatible push simulator: senders POST to /3/device/<token> as to "
                    "api.push.apple.com; simulated devices receive each push on an SSE stream.",
    )
    parser.add_argument("--version", action="version", version=f"rawsse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name) if name == selected else None
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=getattr(module, "EPILOG", None))
        if module is not None:
            module.add_arguments(command)
            command.set_defaults(run=module.run, command_parser=command)
    return parser


def _selected_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_selected_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused by the subcommand's parser, whose flags they were meant for
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"rawsse {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
