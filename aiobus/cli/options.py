"""Shared option handling for the ``aiobus`` subcommands.

Names are checked while parsing, with the library's own checks, so a bad queue name or
pattern is a usage error (exit 2) before anything connects to the broker.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from .._paths import default_socket_path
from ..errors import BusError
from ..names import check_name, check_pattern, is_reserved

__all__ = [
    "EXIT_CODES",
    "HelpFormatter",
    "add_command",
    "add_socket_option",
    "header",
    "non_negative_float",
    "pattern",
    "positive_float",
    "positive_int",
    "queue_name",
    "topic_name",
]

EXIT_CODES = (
    "exit status: 0 success (and for a long-running command, ended by SIGINT or SIGTERM);"
    " 1 operational error (no broker, timeout, lost connection), reported in one line on"
    " stderr; 2 usage error; 128+N another command interrupted by signal N"
)

Runner = Callable[[Any, argparse.Namespace], Awaitable[int]]


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping, but keeping the line breaks of descriptions and epilogs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(super(HelpFormatter, self)._fill_text(line, width, indent)
                         if line.strip() else "" for line in text.splitlines())


def add_socket_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", default=default,
        help="the broker's socket, or a nats://host:port URL (docs/nats.md) (default:"
             " $AIOBUS_SOCKET, else"
             " $XDG_RUNTIME_DIR/aiobus.sock, else /tmp/aiobus-<uid>/aiobus.sock;"
             f" here: {default_socket_path()})",
    )


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    *,
    help: str,
    description: str,
    run: Runner | None = None,
    long_running: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand parser with ``--socket`` and the exit codes in its help."""
    epilog = EXIT_CODES
    if long_running:
        epilog = "runs until interrupted: SIGINT (Ctrl-C) or SIGTERM end it with status 0\n"
        epilog += EXIT_CODES
    parser = subparsers.add_parser(
        name, parents=[common], help=help, description=description, epilog=epilog,
        formatter_class=HelpFormatter,
    )
    if run is not None:
        parser.set_defaults(run=run, long_running=long_running)
    return parser


def _checked(check: Callable[[str], object], text: str) -> str:
    try:
        check(text)
    except BusError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _not_reserved(name: str, what: str) -> None:
    check_name(name, what)
    if is_reserved(name):
        raise BusError(f"{what} {name!r}: names starting with '$' are reserved")


def queue_name(text: str) -> str:
    return _checked(lambda name: _not_reserved(name, "queue name"), text)


def topic_name(text: str) -> str:
    return _checked(lambda name: _not_reserved(name, "topic"), text)


def pattern(text: str) -> str:
    return _checked(check_pattern, text)


def header(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` for ``--header``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _number(text: str, kind: Callable[[str], Any], what: str, minimum: float,
            strict: bool) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < minimum or (strict and value == minimum) or value != value:  # NaN
        raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
    return value


def positive_float(text: str) -> float:
    return float(_number(text, float, "greater than 0", 0, strict=True))


def non_negative_float(text: str) -> float:
    return float(_number(text, float, "0 or more", 0, strict=False))


def positive_int(text: str) -> int:
    return int(_number(text, int, "a positive integer", 1, strict=False))
