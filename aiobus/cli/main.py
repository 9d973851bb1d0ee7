"""``aiobus``: the client command line.

Theory of operation: every command is an ``async def run(bus, args) -> int`` registered
by its module (:mod:`.commands`, :mod:`.stat`, :mod:`.queues`, :mod:`.dlq`,
:mod:`.bridges`). ``main`` parses the options, then one ``asyncio.run`` connects to the
broker and runs the command inside a cancel scope. SIGINT and SIGTERM cancel that scope
only: the command unwinds (a consumer leaving its ``async for`` hands its unacked
messages back), and the connection is then closed normally, outside the scope, so the
broker hears a clean goodbye. A second signal gets the default action (as in most Unix
tools, Ctrl-C twice is a hard stop).

A long-running command (``listen``, ``consume``, ``stat --watch``, the bridges) connects
with ``reconnect=True``: across a broker restart it keeps running, its consumer or
subscription resumed by the client, and says so on stderr (``aiobus: connection to PATH
lost (...); reconnecting``, then ``aiobus: reconnected to PATH``) from a task beside the
command in one task group. It exits 1 only if the client gives up. Other commands connect
with ``reconnect=False``: a one-shot command fails (exit 1) rather than wait for a broker
that may never come back.

Exit codes follow Unix habits: 0 done; 1 an operational error (broker unavailable,
timeout, lost connection), one line ``aiobus: <message>`` on stderr; 2 a usage error
(argparse's). A long-running command (``listen``, ``consume``, ``stat --watch``, the
bridges) ended by SIGINT or SIGTERM exits 0: that is how it is meant to end. Any other
command interrupted by a signal exits 128 + the signal number, as a shell reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import assert_never

import anyio

from .. import ConnectionState, __version__
from ..client.bus import Bus, connect
from ..errors import BusError
from . import bridges, commands, completion, dlq, queues, stat
from .bodies import CliError
from .options import EXIT_CODES, HelpFormatter, add_socket_option
from .parsing import parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiobus",
        description="Talk to an aiobus broker: send and receive messages, watch its"
                    " statistics, manage queues and dead letters, bridge FIFOs and"
                    " signals.",
        epilog=EXIT_CODES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aiobus {__version__}")
    add_socket_option(parser, default=None)
    # Subcommands take --socket too; SUPPRESS keeps them from overwriting a --socket
    # given before the subcommand with their default.
    common = argparse.ArgumentParser(add_help=False)
    add_socket_option(common, default=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (commands, stat, queues, dlq, bridges):
        module.register(subparsers, common)
    completion.register(subparsers, _completed)
    return parser


def _completed() -> dict[str, argparse.ArgumentParser]:
    """The programs ``aiobus completion`` covers, by name."""
    from .broker import build_parser as broker_parser

    return {"aiobus": build_parser(), "aiobus-broker": broker_parser()}


async def _run(args: argparse.Namespace) -> int:
    """Connect, run the command, turn SIGINT/SIGTERM into a clean end."""
    loop = asyncio.get_running_loop()
    work = anyio.CancelScope()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        work.cancel()
        for signo in (signal.SIGINT, signal.SIGTERM):  # the next one gets the default
            loop.remove_signal_handler(signo)

    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, on_signal, signo)
    status = 0
    long_running = getattr(args, "long_running", False)
    try:
        async with connect(args.socket, name=f"aiobus {args.command}",
                           reconnect=long_running) as bus:
            with work:
                if long_running:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(report_connection, bus)
                        status = await args.run(bus, args)
                        tg.cancel_scope.cancel()
                else:
                    status = await args.run(bus, args)
    finally:
        for signo in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signo)
    if received:
        return 0 if long_running else 128 + received[0]
    return int(status)


async def report_connection(bus: Bus) -> None:
    """Tell stderr each time the connection drops and comes back, until the bus closes."""
    async for change in bus.state_changes():
        match change.state:
            case ConnectionState.DISCONNECTED:
                reason = " ".join(str(change.error).split()) if change.error else "closed"
                print(f"aiobus: connection to {bus.path} lost ({reason}); reconnecting",
                      file=sys.stderr, flush=True)
            case ConnectionState.RECONNECTED:
                print(f"aiobus: reconnected to {bus.path}", file=sys.stderr, flush=True)
            case ConnectionState.CLOSED:
                return
            case _:
                assert_never(change.state)


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups raised by task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    # The bridges report what they skip (a vanished signal target, an oversize record)
    # through logging: one line each on stderr.
    logging.basicConfig(level=logging.WARNING, format="aiobus: %(message)s")
    if hasattr(args, "offline"):  # needs no broker (completion)
        return int(args.offline(args))
    if hasattr(args, "check"):  # option checks argparse cannot express
        try:
            args.check(args)
        except CliError as exc:
            print(f"aiobus: {exc}", file=sys.stderr)
            return exc.status
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 130
    except BrokenPipeError:
        # The reader went away (`aiobus listen x | head -3`): not worth a message.
        # Point stdout at /dev/null so the interpreter's final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, CliError | BusError | OSError):
            message = " ".join(str(leaf).split())  # one line, whatever the error says
            print(f"aiobus: {message}", file=sys.stderr)
            return leaf.status if isinstance(leaf, CliError) else 1
        raise


if __name__ == "__main__":
    sys.exit(main())
