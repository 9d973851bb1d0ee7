"""``aiobus fifo-in``, ``fifo-out``, ``signal-out``: the bridges of
:mod:`aiobus.bridges` as commands.

They parse options and call the library (``fifo_to_bus``, ``bus_to_fifo``,
``forward_signals``); all the behaviour (framing, oversize records, the window of
unconfirmed sends, consuming only while a reader is there, acking after the write, a
vanished target) is the library's and documented there. Each runs until SIGINT or
SIGTERM, which end it with status 0, and keeps running across a broker restart (see
:mod:`.main`); it exits 1 only if the client gives up reconnecting.
"""

from __future__ import annotations

import argparse
import signal

from ..bridges.fifo_bus import DEFAULT_DRAIN_TIMEOUT, DEFAULT_WINDOW, bus_to_fifo, fifo_to_bus
from ..bridges.framing import DEFAULT_MAX_RECORD, FRAMINGS
from ..bridges.signals import forward_signals
from ..client.bus import Bus
from .options import (
    add_command,
    non_negative_float,
    pattern,
    positive_int,
    queue_name,
    topic_name,
)

__all__ = ["register", "signal_number"]


def signal_number(text: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1``, ``usr1`` or ``10`` (argparse type)."""
    try:
        return signal.Signals(int(text))
    except ValueError:
        pass
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal name or number"
                                         " (e.g. USR1, HUP, 10)") from None


async def _fifo_in(bus: Bus, args: argparse.Namespace) -> int:
    await fifo_to_bus(bus, args.path, queue=args.queue, topic=args.topic,
                      framing=args.framing, max_record=args.max_record,
                      dead_letter=args.dead_letter, window=args.window,
                      drain_timeout=args.drain_timeout,
                      allow_foreign=args.allow_foreign_fifo)
    return 0


async def _fifo_out(bus: Bus, args: argparse.Namespace) -> int:
    await bus_to_fifo(bus, args.path, queue=args.queue, topic=args.topic,
                      framing=args.framing, prefetch=args.prefetch,
                      drain_timeout=args.drain_timeout,
                      allow_foreign=args.allow_foreign_fifo)
    return 0


async def _signal_out(bus: Bus, args: argparse.Namespace) -> int:
    await forward_signals(bus, args.topic, signal=args.signal, pid=args.pid,
                          pidfile=args.pidfile)
    return 0


def _framing_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framing", choices=sorted(FRAMINGS), default="lines",
                        help="how records are delimited in the FIFO (default: lines)")
    parser.add_argument("--allow-foreign-fifo", action="store_true",
                        help="use an existing FIFO even if another user owns it or other"
                             " users may read or write it (refused by default: they could"
                             " read or inject the messages)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    p = add_command(
        subparsers, common, "fifo-in", run=_fifo_in, long_running=True,
        help="send each record written to a FIFO to a queue or topic",
        description="Create the FIFO PATH if missing (mode 0600) and turn each record"
                    " written to it into a message, for as many writers as come and go:"
                    " `echo job >> PATH` works again and again. Records over --max-record"
                    " are reported and, for a queue, dead-lettered with reason too-large."
                    "\nEach record sent to a queue is confirmed by the broker, at most"
                    " --window at a time. While the broker is away (restarting) the FIFO"
                    " stays open but nothing is read from it: writers' records wait in the"
                    " pipe, and once it is full (64 KiB) writers block until the broker is"
                    " back; records read but not yet confirmed are sent again after the"
                    " reconnect. Nothing is lost unless this process itself dies.",
    )
    p.add_argument("path", metavar="PATH", help="the FIFO")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--queue", type=queue_name, metavar="QUEUE", help="send to QUEUE")
    target.add_argument("--topic", type=topic_name, metavar="TOPIC", help="publish on TOPIC")
    _framing_option(p)
    p.add_argument("--max-record", type=positive_int, default=DEFAULT_MAX_RECORD,
                   metavar="BYTES", help=f"largest record (default {DEFAULT_MAX_RECORD})")
    p.add_argument("--dead-letter", type=queue_name, metavar="QUEUE",
                   help="where records over --max-record go, with --queue (default"
                        " QUEUE.dlq, the queue's default dead-letter queue)")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, metavar="N",
                   help="with --queue: records sent but not yet confirmed by the broker"
                        f" (default {DEFAULT_WINDOW}); no more is read until one is")
    p.add_argument("--drain-timeout", type=non_negative_float, default=DEFAULT_DRAIN_TIMEOUT,
                   metavar="SECONDS",
                   help="when stopped, how long to wait for the broker to confirm the"
                        f" records sent (default {DEFAULT_DRAIN_TIMEOUT:g})")

    p = add_command(
        subparsers, common, "fifo-out", run=_fifo_out, long_running=True,
        help="write each message from a queue or topic to a FIFO",
        description="Create the FIFO PATH if missing (mode 0600) and write each message"
                    " to it as one record, waiting for a reader without losing anything:"
                    " a queue message is acked only once its record is in the pipe."
                    " A queue is consumed only while a reader has the FIFO open (`cat"
                    " PATH`), so no message waits for a reader while its lease runs out;"
                    " when the reader leaves, the unacked messages go back to the queue."
                    " An ack that comes too late (the reader stalled past the queue's"
                    " ack_timeout, or the broker restarted) is reported on stderr and the"
                    " message is delivered again: at least once."
                    " Stopped (SIGTERM, SIGINT) in the middle of a record, it first"
                    " finishes the record, for up to --drain-timeout seconds, and acks it;"
                    " if the reader does not take the rest in time, the message is not"
                    " acked (it goes back to the queue) and the reader is left holding a"
                    " partial record, which is reported on stderr.",
    )
    p.add_argument("path", metavar="PATH", help="the FIFO")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--queue", type=queue_name, metavar="QUEUE", help="consume QUEUE")
    source.add_argument("--topic", type=pattern, metavar="PATTERN",
                        help="subscribe to PATTERN")
    _framing_option(p)
    p.add_argument("--prefetch", type=positive_int, default=16, metavar="N",
                   help="queue messages leased ahead while a reader is there (default 16)")
    p.add_argument("--drain-timeout", type=non_negative_float, default=DEFAULT_DRAIN_TIMEOUT,
                   metavar="SECONDS",
                   help="when stopped mid-record, how long to wait for the reader to take"
                        f" the rest of it (default {DEFAULT_DRAIN_TIMEOUT:g})")

    p = add_command(
        subparsers, common, "signal-out", run=_signal_out, long_running=True,
        help="send a signal to a process for each message on a topic",
        description="Subscribe to TOPIC and send SIGNAL to a process for each message,"
                    " for programs that only understand signals. The pidfile is read"
                    " again for every message, so a restarted service is found; a target"
                    " that is gone is reported on stderr, not fatal.",
    )
    p.add_argument("--topic", type=pattern, metavar="TOPIC", required=True,
                   help="the topic (or pattern) to forward")
    process = p.add_mutually_exclusive_group(required=True)
    process.add_argument("--pid", type=positive_int, metavar="PID",
                         help="the process to signal")
    process.add_argument("--pidfile", metavar="FILE",
                         help="a file holding the pid of the process to signal")
    p.add_argument("--signal", type=signal_number, required=True, metavar="SIGNAL",
                   help="the signal to send: a name (USR1, SIGHUP) or a number")
