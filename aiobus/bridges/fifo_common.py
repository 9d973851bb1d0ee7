"""What the FIFO reader and writer share: the FIFO errors, :func:`ensure_fifo` (create or
check a FIFO), opening one without blocking, and waking a waiting future.

The reader is in :mod:`~aiobus.bridges.fifo_reader`, the writer in
:mod:`~aiobus.bridges.fifo_writer`; :mod:`aiobus.bridges.fifo` exports them all.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from ..errors import BusError

__all__ = [
    "FifoBusyError",
    "FifoClosedError",
    "FifoError",
    "ForeignFifoError",
    "NotAFifoError",
    "ensure_fifo",
]


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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _close_waiter(waiter: asyncio.Future[None] | None, what: str) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_exception(FifoClosedError(f"{what} was closed while waiting"))
