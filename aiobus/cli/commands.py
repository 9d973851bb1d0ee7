"""The message commands: ``send``, ``publish``, ``listen``, ``consume``, ``request``.

Each prints a message and flushes stdout *before* acknowledging it (``consume``), so a
message whose line never got out (full disk, closed pipe) is not acked and comes back:
queues stay at-least-once through the command line too. The other way round, a message
printed whose ack finds the lease gone (the broker restarted meanwhile) is reported on
stderr and printed again when it comes back.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from ..client.bus import Bus
from ..client.message import Message
from ..errors import LeaseError
from .bodies import (
    CliError,
    argument_bytes,
    body_from_bytes,
    body_of,
    message_json,
    render,
    stdin_bodies,
    to_jsonable,
)
from .options import (
    add_command,
    header,
    pattern,
    positive_float,
    positive_int,
    queue_name,
    topic_name,
)

__all__ = ["next_message", "register"]

T = TypeVar("T")


async def _sending(call: Awaitable[T]) -> T:
    try:
        return await call
    except TypeError as exc:  # a JSON value msgpack cannot carry, e.g. an int over 64 bits
        raise CliError(str(exc)) from None


async def _bodies(args: argparse.Namespace) -> AsyncIterator[Any]:
    if args.body is not None:
        yield body_from_bytes(argument_bytes(args.body), as_json=args.json, where="BODY")
    else:
        async for body in stdin_bodies(lines=getattr(args, "lines", False),
                                       as_json=args.json):
            yield body


SEND_WINDOW = 1024  # confirmed sends in flight: one round trip per send made --lines slow
PROGRESS_EVERY = 0.5  # seconds between progress lines on a terminal


async def _send(bus: Bus, args: argparse.Namespace) -> int:
    """Send each body, confirmed, keeping up to SEND_WINDOW in flight (``--lines`` of a
    large file ran at one round trip per line); on a terminal, stderr shows the count."""
    headers = dict(args.header)
    in_flight: collections.deque[asyncio.Future[None]] = collections.deque()
    progress = Progress("sent") if sys.stderr.isatty() else None
    sent = 0
    try:
        async for body in _bodies(args):
            try:
                in_flight.append(bus.send_nowait(args.queue, body, headers, args.ttl,
                                                 delay=args.delay))
            except TypeError as exc:  # a JSON value msgpack cannot carry
                raise CliError(str(exc)) from None
            if len(in_flight) >= SEND_WINDOW:
                await in_flight.popleft()
                sent += 1
                if progress is not None:
                    progress.show(sent)
        while in_flight:
            await in_flight.popleft()
            sent += 1
    finally:
        for fut in in_flight:  # failed or interrupted: nobody awaits the rest
            fut.cancel()
        if progress is not None:
            progress.done(sent)
    return 0


class Progress:
    """``aiobus: sent 12,345`` on a terminal's stderr, rewritten in place."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.last = 0.0
        self.shown = False

    def show(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.shown = True
            print(f"\raiobus: {self.verb} {count:,}", end="", file=sys.stderr, flush=True)

    def done(self, count: int) -> None:
        if self.shown:
            print(f"\raiobus: {self.verb} {count:,}", file=sys.stderr, flush=True)


async def _publish(bus: Bus, args: argparse.Namespace) -> int:
    headers = dict(args.header)
    async for body in _bodies(args):
        await _sending(bus.publish(args.topic, body, headers))
    await bus.ping()  # publish only buffers: make sure the broker has seen everything
    return 0


async def next_message(stream: AsyncIterator[Message], timeout: float | None) -> Message | None:
    """The next message, or None after ``timeout`` seconds without one."""
    try:
        async with asyncio.timeout(timeout):
            return await anext(stream)
    except TimeoutError:
        return None


def _emit(line: str) -> None:
    print(line, flush=True)


async def _listen(bus: Bus, args: argparse.Namespace) -> int:
    received = 0
    async with bus.subscribe(args.pattern) as subscription:
        while args.count is None or received < args.count:
            msg = await next_message(subscription, args.timeout)
            if msg is None:
                break
            if args.json:
                _emit(message_json(msg))
            else:
                if msg.dropped:
                    print(f"aiobus: {msg.dropped} messages dropped before this one"
                          " (this listener fell behind)", file=sys.stderr)
                _emit(f"{msg.topic} {render(body_of(msg))}")
            received += 1
    return 0


async def _consume(bus: Bus, args: argparse.Namespace) -> int:
    handled = 0
    prefetch = min(args.count or args.prefetch, args.prefetch)
    async with bus.consume(args.queue, prefetch=prefetch, create=args.create) as consumer:
        while args.count is None or handled < args.count:
            msg = await next_message(consumer, args.timeout)
            if msg is None:
                break
            _emit(message_json(msg) if args.json else render(body_of(msg)))
            try:
                if args.reject:
                    await msg.reject(args.reason)
                else:
                    await msg.ack()
            except LeaseError as exc:
                # Printed, but the lease is gone (it expired, or the connection dropped
                # and the broker gave the message out again): it will come again.
                print(f"aiobus: message {msg.id} was printed but not"
                      f" {'rejected' if args.reject else 'acknowledged'} ({exc});"
                      " it will be delivered again", file=sys.stderr, flush=True)
            handled += 1
    return 0


def _write_reply(body: Any, as_json: bool) -> None:
    if as_json:
        _emit(json.dumps(to_jsonable(body), ensure_ascii=False))
    elif isinstance(body, bytes):
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
    elif isinstance(body, str):
        _emit(body)
    else:
        _emit(json.dumps(to_jsonable(body), ensure_ascii=False))


async def _request(bus: Bus, args: argparse.Namespace) -> int:
    async for body in _bodies(args):
        reply = await _sending(bus.request(args.queue, body, timeout=args.timeout,
                                           headers=dict(args.header)))
        _write_reply(reply, args.json)
    return 0


def _check_body(args: argparse.Namespace) -> None:
    """Usage errors in the body, found before connecting."""
    if getattr(args, "lines", False) and args.body is not None:
        raise CliError("--lines reads stdin; give no BODY with it", status=2)
    if args.body is not None:
        body_from_bytes(argument_bytes(args.body), as_json=args.json, where="BODY")


def _add_body_options(parser: argparse.ArgumentParser, lines: bool = True) -> None:
    parser.add_argument("body", metavar="BODY", nargs="?",
                        help="the message body (default: read stdin; UTF-8 is sent as a"
                             " string, anything else as bytes)")
    parser.add_argument("--json", action="store_true",
                        help="parse the body as JSON and send the value")
    parser.add_argument("--header", "-H", type=header, action="append", default=[],
                        metavar="KEY=VALUE", help="a message header (repeatable)")
    if lines:
        parser.add_argument("--lines", action="store_true",
                            help="send each line of stdin as its own message")
    parser.set_defaults(check=_check_body)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "send", run=_send,
                    help="put a message on a queue",
                    description="Put a message on a queue; returns once the broker has"
                                " accepted it. Without BODY, all of stdin is one message"
                                " (byte for byte), or each line one with --lines.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    _add_body_options(p)
    p.add_argument("--ttl", type=positive_float, metavar="SECONDS",
                   help="dead-letter the message (reason 'expired') if it waits longer"
                        " (with --delay: longer once it is due)")
    p.add_argument("--delay", type=positive_float, metavar="SECONDS",
                   help="deliver it no sooner than SECONDS from now (it waits in the"
                        " queue as delayed)")

    p = add_command(subparsers, common, "publish", run=_publish,
                    help="publish a message on a topic",
                    description="Publish a message on a topic, to the subscribers"
                                " present at that moment (none: it is dropped). Without"
                                " BODY, all of stdin is one message, or each line one"
                                " with --lines.")
    p.add_argument("topic", metavar="TOPIC", type=topic_name)
    _add_body_options(p)

    p = add_command(subparsers, common, "listen", run=_listen, long_running=True,
                    help="print messages published on matching topics",
                    description="Subscribe to PATTERN ('*' one token, '>' the rest) and"
                                " print each message as 'TOPIC BODY' on one line (control"
                                " characters escaped), or as a JSON object with --json.")
    p.add_argument("pattern", metavar="PATTERN", type=pattern)
    p.add_argument("--count", "-n", type=positive_int, metavar="N",
                   help="exit after N messages")
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                   help="exit (status 0) when no message arrives for this long")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: topic, body, base64 (true when body"
                        " is base64 of a bytes body), headers, id, timestamp, dropped")

    p = add_command(subparsers, common, "consume", run=_consume, long_running=True,
                    help="print and acknowledge messages from a queue",
                    description="Take messages from QUEUE, print each body on one line"
                                " (control characters escaped), or as a JSON object with"
                                " --json, then acknowledge it (or reject it to the"
                                " dead-letter queue with --reject). A message is printed"
                                " before it is acknowledged, never after. A QUEUE that"
                                " does not exist is an error (status 1), not created,"
                                " unless --create is given.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    p.add_argument("--create", action="store_true",
                   help="create QUEUE if it does not exist yet (with the broker's defaults)"
                        " and wait for messages, as a worker started before its producers")
    p.add_argument("--count", "-n", type=positive_int, metavar="N",
                   help="exit after N messages")
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                   help="exit (status 0) when no message arrives for this long")
    p.add_argument("--reject", action="store_true",
                   help="reject each message to the dead-letter queue instead of acking")
    p.add_argument("--reason", metavar="TEXT",
                   help="with --reject: the x-reason-text of the dead letters")
    p.add_argument("--prefetch", type=positive_int, default=16, metavar="N",
                   help="messages leased ahead (default 16, at most --count)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: queue, body, base64 (true when body"
                        " is base64 of a bytes body), headers, id, timestamp, attempt")

    p = add_command(subparsers, common, "request", run=_request,
                    help="send a request to a queue and print the reply",
                    description="Send BODY (default: stdin) to QUEUE as a request and"
                                " print the reply: a string as it is, bytes raw, other"
                                " values as JSON.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    _add_body_options(p, lines=False)
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="give up (status 1) after this long without a reply (default 5)")
    p.epilog = ("--json also prints the reply as JSON (bytes as base64)\n"
                + (p.epilog or ""))
