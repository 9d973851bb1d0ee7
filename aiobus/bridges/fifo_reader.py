"""Reading a named pipe (FIFO) on asyncio without blocking the loop: :class:`FifoReader`.

Theory of operation
-------------------
Reading. A FIFO's reader sees end-of-file whenever its last writer closes, and an fd at EOF
stays "readable" forever, so a reader watched with ``loop.add_reader`` would spin.
:class:`FifoReader` therefore opens the FIFO twice: ``O_RDONLY | O_NONBLOCK`` to read, and
``O_WRONLY | O_NONBLOCK`` as a dummy writer that never writes. With a writer always
present the read side never sees EOF: an empty pipe reads as ``EAGAIN`` and the reader
waits in ``add_reader``. Writers come and go (each ``echo job >> fifo`` opens, writes,
closes) and their bytes join one stream, so the decoder keeps a partial record across
writers. POSIX makes a write of at most ``PIPE_BUF`` (4096) bytes atomic; concurrent
writers of larger records can interleave and should not share a FIFO.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.lowlevel

from .fifo_common import (
    FifoBusyError,
    FifoClosedError,
    FifoError,
    _close_waiter,
    _open_fifo,
    _wake,
    ensure_fifo,
)
from .framing import DEFAULT_MAX_RECORD, Codec, Decoded, Framing, FramingError, make_codec

__all__ = ["FifoReader"]

_READ_SIZE: Final = 64 * 1024  # one pipe buffer (Linux default) per read


class FifoReader:
    """Records from a FIFO, across any number of writers that come and go.

    Opening cannot block (non-blocking opens), so :meth:`open` is a plain method; entering
    the reader as an async context manager opens it and exiting closes it. Iteration ends
    when the reader is closed.

    Args:
        path: the FIFO; created with ``mode`` if missing.
        framing: a framing name (see :data:`~aiobus.bridges.framing.FRAMINGS`) or a codec.
        max_record: largest record when ``framing`` is a name (default 1 MiB).
        mode: permission bits for a FIFO this reader creates.
        allow_foreign: use an existing FIFO whatever its owner and mode (see
            :func:`ensure_fifo`).

    Raises:
        ValueError: unknown framing name.

    Example:
        >>> async with FifoReader("/run/user/1000/jobs") as reader:  # doctest: +SKIP
        ...     async for record in reader:
        ...         if isinstance(record, Oversize):
        ...             print("skipped", record.length, "bytes")
        ...         else:
        ...             print(record)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        framing: Framing | Codec = "lines",
        max_record: int = DEFAULT_MAX_RECORD,
        mode: int = 0o600,
        allow_foreign: bool = False,
    ) -> None:
        self.path = Path(path)
        self.codec = (
            framing if isinstance(framing, Codec) else make_codec(framing, max_record=max_record)
        )
        self._mode = mode
        self._allow_foreign = allow_foreign
        self._fd = -1
        self._dummy = -1  # our own write end: keeps the read end from ever seeing EOF
        self._closed = False
        self._busy = False
        self._items: deque[Decoded] = deque()
        self._error: FramingError | None = None  # raised once the records before it are out
        self._waiter: asyncio.Future[None] | None = None

    def open(self) -> None:
        """Create the FIFO if needed and open it; a no-op when already open.

        Raises:
            FifoClosedError: the reader was closed.
            NotAFifoError: the path is not a FIFO.
            OSError: the FIFO cannot be created or opened.
        """
        if self._closed:
            raise FifoClosedError(f"FIFO reader for {self.path} is closed")
        if self._fd >= 0:
            return
        ensure_fifo(self.path, self._mode, allow_foreign=self._allow_foreign)
        fd = _open_fifo(self.path, os.O_RDONLY)
        try:
            self._dummy = _open_fifo(self.path, os.O_WRONLY)  # cannot ENXIO: we are a reader
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        """Close the FIFO; a waiting :meth:`receive` raises :class:`FifoClosedError`."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, -1
        if self._waiter is not None:
            self._waiter.get_loop().remove_reader(fd)
            _close_waiter(self._waiter, "FIFO reader")
        for each in (fd, self._dummy):
            if each >= 0:
                os.close(each)
        self._dummy = -1

    async def aclose(self) -> None:
        """Close the FIFO (see :meth:`close`)."""
        self.close()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Decoded:
        try:
            return await self.receive()
        except FifoClosedError:
            raise StopAsyncIteration from None

    async def receive(self) -> Decoded:
        """Wait for the next record (or :class:`Oversize` report) from any writer.

        Returns:
            The record's bytes, or an :class:`Oversize` standing in for a record over
            ``max_record``.

        Raises:
            FifoClosedError: the reader is (or got) closed.
            FifoBusyError: another task is already receiving.
            FramingError: the stream broke the framing; raised again on every later call.
            OSError: reading failed.
        """
        if self._busy:
            raise FifoBusyError(f"another task is already receiving from {self.path}")
        self._busy = True
        try:
            if self._items:
                await anyio.lowlevel.checkpoint()  # a busy FIFO must not starve other tasks
            while not self._items:
                if self._error is not None:
                    raise self._error
                self.open()
                try:
                    data = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    await self._wait_readable()
                    continue
                if not data:  # cannot happen while our dummy writer is open
                    raise FifoError(f"unexpected end of file on {self.path}")
                try:
                    self._items.extend(self.codec.feed(data))
                except FramingError as exc:
                    self._items.extend(exc.records)
                    self._error = exc
            return self._items.popleft()
        finally:
            self._busy = False

    async def _wait_readable(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self._fd
        self._waiter = waiter = loop.create_future()
        loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._fd == fd:  # else close() has unregistered it already
                loop.remove_reader(fd)
