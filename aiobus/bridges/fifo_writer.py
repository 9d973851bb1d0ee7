"""Writing a named pipe (FIFO) on asyncio without blocking the loop: :class:`FifoWriter`.

Theory of operation
-------------------
Writing. Opening ``O_WRONLY | O_NONBLOCK`` fails with ``ENXIO`` while nobody has the FIFO
open for reading. A blocking open would block the loop's thread and Linux does not report
FIFO opens to ``poll``, so :class:`FifoWriter` retries with exponential backoff (10 ms up
to 250 ms). Writes are non-blocking; on ``EAGAIN`` the writer waits in ``add_writer``.
The last reader leaving *is* reported: the write end polls ``POLLERR`` (Linux
``pipe_poll``), which ``add_reader`` sees (a write end is never readable otherwise), so
:meth:`FifoWriter.wait_reader_gone` needs no write to notice it; ``bus_to_fifo`` uses it to
hold queue messages only while someone reads.

Record guarantee. :meth:`FifoWriter.write_record` returns once the whole record is in the
pipe; a pipe has no acknowledgements, so a record still in the pipe when its reader dies
is lost. If the reader goes away in the middle of a record (``EPIPE``), that reader never
saw the record's last byte, so never decoded it: the writer closes its fd (freeing the
pipe and the partial record, unless another process holds the FIFO open), waits for a
new reader and writes the whole record again. A record is thus never seen twice. A reader
that opens before the writer has noticed ``EPIPE`` would see the stale partial record;
Linux reports ``EPIPE`` on the writer's next write, which is normally immediate.

Stopping mid-record. Once a frame's first byte is in the pipe the reader holds part of a
record, and only the rest of that frame completes it: anything else written next (a new
writer's first record included) would join the partial one into a record nobody sent.
So a :meth:`FifoWriter.write_record` cancelled mid-record keeps the rest of its frame
(:attr:`FifoWriter.unfinished` bytes); :meth:`FifoWriter.finish_record` writes it, as the
next ``write_record`` does first. A frame of which nothing was written yet is simply
dropped. Closing with a frame unfinished leaves the partial record in the pipe for good;
the writer logs an error with the number of bytes missing. ``bus_to_fifo`` finishes the
record before it stops, within a timeout, and acks only a finished record.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.lowlevel

from .fifo_common import (
    FifoBusyError,
    FifoClosedError,
    _close_waiter,
    _open_fifo,
    _wake,
    ensure_fifo,
)
from .framing import DEFAULT_MAX_RECORD, Codec, Framing, make_codec

__all__ = ["FifoWriter", "FifoWriterStatistics"]

# The name this module's records had before the FIFO code was split (fifo.py), which
# log configurations may name.
logger = logging.getLogger("aiobus.bridges.fifo")

_POLL_FIRST: Final = 0.01
_POLL_MAX: Final = 0.25  # a new reader waits at most this long for a waiting writer


def _reader_left(fd: int) -> bool:
    """Whether the FIFO write end ``fd`` has lost its last reader (``POLLERR``)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


@dataclass(slots=True)
class FifoWriterStatistics:
    """Counters of a :class:`FifoWriter`."""

    records_written: int = 0
    bytes_written: int = 0
    broken_pipes: int = 0  # readers gone mid-record: the record is rewritten whole (or dropped
    # by finish_record, whose caller must send it again)
    connected: bool = False  # whether the FIFO is open (a reader was there at the last write)


class FifoWriter:
    """Writes whole records to a FIFO, waiting for a reader without blocking the loop.

    One :meth:`write_record` runs at a time (concurrent calls queue on a lock), so records
    never interleave. A :meth:`write_record` cancelled mid-record leaves the rest of its
    frame (:attr:`unfinished`) to :meth:`finish_record`, or to be written first by the next
    call, keeping the stream well framed; closing the writer instead leaves the reader
    holding a partial record (logged as an error).

    Args:
        path: the FIFO; created with ``mode`` if missing.
        framing: a framing name (see :data:`~aiobus.bridges.framing.FRAMINGS`) or a codec.
        max_record: largest record when ``framing`` is a name (default 1 MiB).
        mode: permission bits for a FIFO this writer creates.
        allow_foreign: use an existing FIFO whatever its owner and mode (see
            :func:`ensure_fifo`).

    Raises:
        ValueError: unknown framing name.

    Example:
        >>> async with FifoWriter("/run/user/1000/out") as writer:  # doctest: +SKIP
        ...     await writer.write_record(b"job 42")
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
        self._closed = False
        self._lock = asyncio.Lock()
        # The rest of a frame begun (first byte in the pipe) but not finished: its write was
        # cancelled. Empty when no record is torn.
        self._unfinished = memoryview(b"")
        self._waiter: asyncio.Future[None] | None = None
        # wait_reader_gone's future; its add_reader is on _fd, so every close of _fd goes
        # through _close_fd, which unregisters it first (a closed fd number is soon reused).
        self._gone_waiter: asyncio.Future[None] | None = None
        self._stats = FifoWriterStatistics()

    def statistics(self) -> FifoWriterStatistics:
        """Return a snapshot of this writer's counters."""
        return replace(self._stats, connected=self._fd >= 0)

    @property
    def unfinished(self) -> int:
        """Bytes left of a record whose write was cancelled mid-record; 0 when none is.

        While this is not 0 the reader holds part of a record: :meth:`finish_record`
        completes it.
        """
        return len(self._unfinished)

    def close(self) -> None:
        """Close the FIFO; a waiting call raises :class:`FifoClosedError`."""
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None:
            if self._fd >= 0:
                self._waiter.get_loop().remove_writer(self._fd)
            _close_waiter(self._waiter, "FIFO writer")
        _close_waiter(self._gone_waiter, "FIFO writer")
        self._close_fd()
        if self._unfinished:
            logger.error(
                "FIFO writer for %s closed with %d bytes of a record unwritten: its reader holds"
                " a partial record, and the next record written to the FIFO will follow it",
                self.path, len(self._unfinished),
            )  # fmt: skip

    async def aclose(self) -> None:
        """Close the FIFO (see :meth:`close`)."""
        self.close()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        if self._closed:
            raise FifoClosedError(f"FIFO writer for {self.path} is closed")
        ensure_fifo(self.path, self._mode, allow_foreign=self._allow_foreign)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def wait_reader(self) -> None:
        """Wait until a reader has the FIFO open and open it for writing.

        Returns at once while the writer is connected to a reader. Polls with backoff (10
        ms doubling to 250 ms): a FIFO gives no notice when a reader arrives.

        Raises:
            FifoClosedError: the writer is (or got) closed.
            NotAFifoError: the path is not a FIFO.
            OSError: opening failed for another reason than "no reader" (``ENXIO``).
        """
        if self._fd >= 0 and not self._lock.locked() and _reader_left(self._fd):
            self._close_fd()  # connected to a reader that has gone, and no write noticed
        await self._connect()

    async def _connect(self) -> None:
        delay = _POLL_FIRST
        while self._fd < 0:
            if self._closed:
                raise FifoClosedError(f"FIFO writer for {self.path} is closed")
            try:
                self._fd = _open_fifo(self.path, os.O_WRONLY)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                await self._sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
            else:
                logger.debug("FIFO %s has a reader", self.path)

    async def wait_reader_gone(self) -> None:
        """Wait until the reader the writer is connected to has closed the FIFO.

        Returns at once when not connected. Afterwards the writer is not connected (its fd
        is closed, freeing the pipe), so the next :meth:`wait_reader` or
        :meth:`write_record` waits for a new reader. It writes nothing: the pipe reports
        its last reader leaving (``POLLERR``) to a waiting ``add_reader``. One task may
        wait at a time. A :meth:`write_record` that is waiting for pipe space when the
        reader leaves notices too (``EPIPE``) and waits for the next reader.

        Raises:
            FifoClosedError: the writer is (or got) closed.
            FifoBusyError: another task is already waiting here.

        Example:
            >>> await writer.wait_reader()  # doctest: +SKIP
            >>> await writer.wait_reader_gone()
        """
        if self._closed:
            raise FifoClosedError(f"FIFO writer for {self.path} is closed")
        if self._gone_waiter is not None:
            raise FifoBusyError(f"another task is already waiting for {self.path}'s reader")
        fd = self._fd
        if fd < 0:
            await anyio.lowlevel.checkpoint()
            return
        loop = asyncio.get_running_loop()
        self._gone_waiter = waiter = loop.create_future()
        loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            if self._gone_waiter is waiter:  # else _close_fd has unregistered it already
                self._gone_waiter = None
                loop.remove_reader(fd)
        if self._fd == fd and not self._lock.locked():  # else a write notices by itself
            self._close_fd()
            logger.debug("reader of FIFO %s went away", self.path)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        gone = self._gone_waiter
        if gone is not None:
            self._gone_waiter = None
            gone.get_loop().remove_reader(fd)
            _wake(gone)
        os.close(fd)

    async def write_record(self, record: bytes) -> None:
        """Frame ``record`` and write all of it, waiting for a reader and pipe space.

        If the reader goes away mid-record (``EPIPE``), waits for the next reader and
        writes the whole record again (see the module docstring for the guarantee).

        Args:
            record: the record; it must fit the framing and ``max_record``.

        Raises:
            UnencodableRecordError: the framing cannot carry ``record`` (nothing written).
            FifoClosedError: the writer is (or got) closed.
            OSError: writing failed for another reason than a vanished reader.
        """
        frame = self.codec.encode(record)
        await anyio.lowlevel.checkpoint()  # a fast pipe must not starve other tasks
        async with self._lock:
            while True:
                await self._connect()
                try:
                    if self._unfinished:  # an earlier record, cancelled mid-record
                        await self._write_all(self._unfinished)
                        self._stats.records_written += 1
                    await self._write_all(memoryview(frame))
                except BrokenPipeError:
                    self._reader_gone()
                    logger.info("reader of FIFO %s went away mid-record; waiting", self.path)
                    continue
                self._stats.records_written += 1
                return

    async def finish_record(self) -> bool:
        """Write the rest of a record whose :meth:`write_record` was cancelled mid-record.

        Waits for pipe space as long as it takes; bound it with a timeout (a cancelled
        call leaves what is still :attr:`unfinished`).

        Returns:
            True once the record is whole in the pipe; False if no record was unfinished,
            or if its reader went away first (``EPIPE``): that reader never decoded it, so
            the record was not delivered, and the rest of it is dropped.

        Raises:
            FifoClosedError: the writer is (or got) closed.
            OSError: writing failed for another reason than a vanished reader.

        Example:
            >>> try:  # doctest: +SKIP
            ...     await writer.write_record(record)
            ... except anyio.get_cancelled_exc_class():
            ...     with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            ...         await writer.finish_record()
            ...     raise
        """
        async with self._lock:
            if self._closed:
                raise FifoClosedError(f"FIFO writer for {self.path} is closed")
            if not self._unfinished:
                await anyio.lowlevel.checkpoint()
                return False
            try:
                await self._write_all(self._unfinished)
            except BrokenPipeError:
                self._reader_gone()
                logger.info("reader of FIFO %s went away mid-record", self.path)
                return False
            self._stats.records_written += 1
            return True

    def _reader_gone(self) -> None:
        self._stats.broken_pipes += 1
        self._close_fd()  # frees the pipe and the partial record in it
        self._unfinished = memoryview(b"")

    async def _write_all(self, view: memoryview) -> None:
        # Until the first byte is written nothing of the frame is in the pipe, so a
        # cancellation leaves nothing unfinished (or an earlier frame's rest untouched).
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await self._wait_writable()
                continue
            view = view[written:]
            self._unfinished = view
            self._stats.bytes_written += written

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self._fd
        self._waiter = waiter = loop.create_future()
        loop.add_writer(fd, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._fd == fd:  # else close() has unregistered it already
                loop.remove_writer(fd)

    async def _sleep(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(delay, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()
