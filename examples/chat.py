"""A chat room: each line you type goes to everyone else in the room.

    .venv/bin/python examples/chat.py --nick alice      # in one terminal
    .venv/bin/python examples/chat.py --nick bob        # in another; type, and end with Ctrl-D

Lines are published on the topic ``chat.room.<room>``, and each client subscribes to it.
Joins and leaves come from the broker's presence events: it publishes on
``$sys.client.connected`` and ``$sys.client.disconnected`` whenever a client connects or
goes away, with the name the client gave ``aiobus.connect(name=...)`` and the pid and uid
the kernel reported for its socket. So a client killed with ``kill -9``, which never gets
to say goodbye, is still seen leaving, and the others carry on.

stdin must be a terminal or a pipe (asyncio cannot watch a regular file for input).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
from _common import report_connection

import aiobus


def client_name(room: str, nick: str) -> str:
    return f"chat:{room}:{nick}"  # how other chat clients recognise us in presence events


def nick_of(presence: Any, room: str) -> str | None:
    """The nick in a presence event, if it is a chat client in ``room``."""
    prefix = client_name(room, "")
    name = presence.get("name") if isinstance(presence, dict) else None
    return name[len(prefix):] if isinstance(name, str) and name.startswith(prefix) else None


async def stdin_lines() -> AsyncIterator[str]:
    """Lines from stdin, read without blocking the event loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            yield line.decode(errors="replace").rstrip("\r\n")
    finally:
        transport.close()


async def show_lines(lines: AsyncIterator[aiobus.Message], me: dict[str, Any]) -> None:
    async for msg in lines:
        body = msg.body
        if not isinstance(body, dict):  # e.g. from `aiobus publish chat.room.lobby hi`
            print(f"<?> {body!r}")
        elif body.get("pid") != me["pid"] or body.get("nick") != me["nick"]:
            print(f"<{body.get('nick')}> {body.get('text')}")
        # else: our own line, which the broker sends us too


async def show_presence(events: AsyncIterator[aiobus.Message], room: str) -> None:
    async for msg in events:
        nick = nick_of(msg.body, room)
        if nick is not None:
            verb = "joined" if msg.topic == "$sys.client.connected" else "left"
            print(f"* {nick} {verb} (pid {msg.body['pid']})")


async def chat(bus: aiobus.Bus, room: str, nick: str) -> None:
    topic = f"chat.room.{room}"
    me = {"nick": nick, "pid": os.getpid()}
    async with (
        bus.subscribe(topic) as lines,
        bus.subscribe("$sys.client.*") as events,
        anyio.create_task_group() as tg,
    ):
        stats = await bus.stats()
        here = sorted(
            other for conn in stats["connections"]
            if (other := nick_of(conn, room)) is not None and conn["pid"] != me["pid"]
        )
        print(f"joined #{room} as {nick}; here: {', '.join(here) or 'nobody yet'}")
        tg.start_soon(show_lines, lines, me)
        tg.start_soon(report_connection, bus)
        tg.start_soon(show_presence, events, room)
        async for text in stdin_lines():
            if text:
                await bus.publish(topic, {**me, "text": text})
        tg.cancel_scope.cancel()  # stdin closed: leave the room
    print(f"left #{room}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="broker socket (default: the library's default)")
    parser.add_argument("--nick", default=os.environ.get("USER", "anon"))
    parser.add_argument("--room", default="lobby")
    args = parser.parse_args()
    async with aiobus.connect(args.socket, name=client_name(args.room, args.nick)) as bus:
        await chat(bus, args.room, args.nick)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
