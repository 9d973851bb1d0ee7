"""Named pipes (FIFOs) on asyncio without blocking the loop.

The bridges between FIFOs and the bus (``fifo_to_bus``, ``bus_to_fifo``) live in
:mod:`aiobus.bridges.fifo_bus`.

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
import stat
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.lowlevel

from ..errors import BusError
from .framing import (
    DEFAULT_MAX_RECORD,
    Codec,
    Decoded,
    Framing,
    FramingError,
    make_codec,
)

__all__ = [
    "FifoBusyError",
    "FifoClosedError",
    "FifoError",
    "FifoReader",
    "FifoWriter",
    "FifoWriterStatistics",
    "ForeignFifoError",
    "NotAFifoError",
    "ensure_fifo",
]

logger = logging.getLogger(__name__)

_READ_SIZE: Final = 64 * 1024  # one pipe buffer (Linux default) per read
_POLL_FIRST: Final = 0.01
_POLL_MAX: Final = 0.25  # a new reader waits at most this long for a waiting writer


class FifoError(BusError):
    """Base of the FIFO errors."""

    code = "fifo"


class NotAFifoError(FifoError):
    """The path exists and is not a FIFO."""


class ForeignFifoError(FifoError):
    """The FIFO belongs to another user, or other users may read or write it (beyond the
    bridge's ``mode``): what passes through it would not be private. Pass
    ``allow_foreign=True`` (``--allow-foreign-fifo``) to use it anyway."""


class FifoClosedError(FifoError):
    """The reader or writer was closed by its owner (possibly while a call waited)."""


class FifoBusyError(FifoError):
    """Another task is already receiving from (or iterating over) this reader."""


def ensure_fifo(path: str | os.PathLike[str], mode: int = 0o600, *,
                allow_foreign: bool = False) -> Path:
    """Create a FIFO at ``path`` unless one is already there.

    An existing FIFO must belong to this process's user and grant other users no read
    or write permission that ``mode`` does not: another user who pre-created
    ``out.fifo`` with mode 0666 had read root's queue messages from it.

    Args:
        path: where the FIFO lives.
        mode: permission bits for a new FIFO (the umask applies, as for ``mkfifo(1)``).
        allow_foreign: use an existing FIFO whatever its owner and mode.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        NotAFifoError: ``path`` exists and is something else (file, directory, socket).
        ForeignFifoError: it is another user's FIFO, or others may read or write it.
        OSError: the FIFO cannot be created (missing directory, permissions).

    Example:
        >>> fifo = ensure_fifo(tmp / "jobs")  # doctest: +SKIP
    """
    fifo = Path(path)
    try:
        os.mkfifo(fifo, mode)
    except FileExistsError:
        pass
    st = os.stat(fifo)
    _check_fifo(st.st_mode, fifo)
    if not allow_foreign:
        _check_private(st, fifo, mode)
    return fifo


def _check_private(st: os.stat_result, path: Path, mode: int) -> None:
    """Owned by this user, and no group or other read/write bit beyond ``mode``."""
    me = os.geteuid()
    if st.st_uid != me:
        raise ForeignFifoError(
            f"{path} belongs to uid {st.st_uid}, not to this bridge's user (uid {me}):"
            " whoever owns it can read or write what passes through it; remove it, or"
            " pass --allow-foreign-fifo (allow_foreign=True) to use it anyway")
    extra = stat.S_IMODE(st.st_mode) & 0o066 & ~mode
    if extra:
        raise ForeignFifoError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: other users may"
            f" {_access(extra)} it; chmod go-rw it, or pass --allow-foreign-fifo"
            " (allow_foreign=True)")


def _access(bits: int) -> str:
    readable, writable = bits & 0o044, bits & 0o022
    return "read and write" if readable and writable else "read" if readable else "write"


def _check_fifo(st_mode: int, path: Path) -> None:
    if not stat.S_ISFIFO(st_mode):
        kind = "directory" if stat.S_ISDIR(st_mode) else "file" if stat.S_ISREG(st_mode) else ""
        raise NotAFifoError(f"{path} exists and is not a FIFO{f' (a {kind})' if kind else ''}")


def _open_fifo(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_fifo(os.fstat(fd).st_mode, path)  # fstat: no race with a path swapped after stat
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reader_left(fd: int) -> bool:
    """Whether the FIFO write end ``fd`` has lost its last reader (``POLLERR``)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _close_waiter(waiter: asyncio.Future[None] | None, what: str) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_exception(FifoClosedError(f"{what} was closed while waiting"))


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
