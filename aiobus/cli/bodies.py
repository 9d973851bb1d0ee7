"""Message bodies on the command line: arguments and stdin in, text and JSON lines out.

Input. A body is bytes from an argument or from stdin. With ``--json`` it is parsed and
the value is sent; otherwise it is sent as ``str`` when it is valid UTF-8 and as ``bytes``
when it is not (so a binary file survives the trip unchanged). Arguments come from the
OS as bytes too: Python decodes them with ``surrogateescape``, and ``os.fsencode`` gives
the original bytes back.

Stdin is read without blocking the loop when it is a pipe, socket or terminal, so SIGINT
and SIGTERM still end a ``send --lines`` fed by ``tail -f``. What the selector refuses
(regular files, /dev/null) never blocks, so it is read directly.

Output. Text output is for people: one message per line, so a body's control characters
(newlines included) are escaped and the line stays one line. JSON lines are for scripts:
every field, with a bytes body as base64 and ``"base64": true``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import selectors
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from ..client.browse import PeekedMessage
from ..client.message import Message
from ..errors import BodyDecodeError

__all__ = [
    "CliError",
    "argument_bytes",
    "body_from_bytes",
    "body_of",
    "message_json",
    "preview",
    "render",
    "stdin_bodies",
    "table",
    "to_jsonable",
]

_CHUNK = 64 * 1024


class CliError(Exception):
    """An expected failure, reported as one line on stderr; ``status`` is the exit code
    (1 operational, 2 usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def body_from_bytes(raw: bytes, *, as_json: bool, where: str = "body") -> Any:
    """The value to send for ``raw``: parsed JSON, else str if UTF-8, else bytes.

    Raises:
        CliError: ``as_json`` and ``raw`` is not JSON (status 2: the input is wrong).
    """
    if as_json:
        try:
            return json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise CliError(f"{where} is not valid JSON: {exc}", status=2) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def argument_bytes(text: str) -> bytes:
    """The bytes the OS passed for an argument (undoing ``surrogateescape``)."""
    return os.fsencode(text)


def _pollable(fd: int) -> bool:
    """Whether the loop's selector can watch ``fd`` (epoll refuses regular files and
    /dev/null, which never block anyway)."""
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


async def _stdin_chunks() -> AsyncIterator[bytes]:
    fd = sys.stdin.fileno()
    if not _pollable(fd):
        while chunk := os.read(fd, _CHUNK):  # a file: reads never block
            yield chunk
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_CHUNK)
    was_blocking = os.get_blocking(fd)
    # The transport owns (and closes) its file object, so give it a duplicate of fd 0.
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    try:
        while chunk := await reader.read(_CHUNK):
            yield chunk
    finally:
        transport.close()
        # O_NONBLOCK belongs to the open file, shared with the shell: put it back.
        with contextlib.suppress(OSError):
            os.set_blocking(fd, was_blocking)


async def stdin_bodies(*, lines: bool, as_json: bool) -> AsyncIterator[Any]:
    """Bodies from stdin: all of it as one, or one per line (``\\n`` or ``\\r\\n``).

    Raises:
        CliError: a body is not JSON with ``as_json``.
    """
    if not lines:
        data = bytearray()
        async for chunk in _stdin_chunks():
            data += chunk
        yield body_from_bytes(bytes(data), as_json=as_json, where="stdin")
        return
    pending = b""
    number = 0
    async for chunk in _stdin_chunks():
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            number += 1
            yield body_from_bytes(line.removesuffix(b"\r"), as_json=as_json,
                                  where=f"stdin line {number}")
    if pending:  # a last line without a newline is still a line
        yield body_from_bytes(pending.removesuffix(b"\r"), as_json=as_json,
                              where=f"stdin line {number + 1}")


# -- output ---------------------------------------------------------------------------


_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(text: str) -> str:
    """Control characters as escapes, so one message stays on one line."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else _ESCAPES.get(ch) or (
            f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )


def render(body: Any) -> str:
    """A body as one line of text: strings as they are (control characters escaped),
    bytes decoded as UTF-8 where possible (``\\xNN`` where not), other values as JSON."""
    if isinstance(body, str):
        return _escape(body)
    if isinstance(body, bytes):
        return _escape(body.decode("utf-8", errors="backslashreplace"))
    return json.dumps(to_jsonable(body), ensure_ascii=False, separators=(",", ":"))


def preview(body: Any, width: int = 40) -> str:
    """:func:`render`, cut to ``width`` characters."""
    text = render(body)
    return text if len(text) <= width else text[: width - 1] + "…"


def table(columns: list[str], rows: list[list[str]],
          right: Iterable[int] = ()) -> list[str]:
    """Lines of a text table, each column as wide as its widest cell; the columns whose
    index is in ``right`` (numbers) right-aligned."""
    numeric = set(right)
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if i in numeric else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
                         ).rstrip()

    return [line(columns), *(line(row) for row in rows)]


def to_jsonable(value: Any) -> Any:
    """A msgpack value as JSON can hold it: nested bytes become base64 strings, map keys
    strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {_json_key(key): to_jsonable(item) for key, item in value.items()}
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", errors="backslashreplace")
    return json.dumps(to_jsonable(key))


def body_of(msg: Message | PeekedMessage) -> Any:
    """``msg.body``, or its raw bytes (with a line on stderr) when its producer sent bytes
    that do not decode as the kind it claimed: showing them beats stopping on them."""
    try:
        return msg.body
    except BodyDecodeError:
        print(f"aiobus: message {msg.id}: the body does not decode as its producer claimed;"
              " showing its raw bytes", file=sys.stderr)
        return msg.raw_body


def message_json(msg: Message) -> str:
    """One JSON line for a received message.

    Topic messages: ``topic``, ``body``, ``base64``, ``headers``, ``id``, ``timestamp``,
    ``dropped``; queue messages: ``queue`` and ``attempt`` instead of ``topic`` and
    ``dropped``. ``base64`` is true when ``body`` is a bytes body in base64.
    """
    body = body_of(msg)
    is_bytes = isinstance(body, bytes)
    fields: dict[str, Any] = {}
    if msg.topic is not None:
        fields["topic"] = msg.topic
    else:
        fields["queue"] = msg.queue
    fields["body"] = to_jsonable(body)
    fields["base64"] = is_bytes
    fields["headers"] = msg.headers
    fields["id"] = msg.id
    fields["timestamp"] = msg.timestamp
    if msg.topic is not None:
        fields["dropped"] = msg.dropped
    else:
        fields["attempt"] = msg.attempt
    return json.dumps(fields, ensure_ascii=False)
