"""The journal's errors: one home, raised by the store, recovery and repair alike."""

from __future__ import annotations

import errno

from ...errors import BusError

__all__ = ["JournalCorrupt", "JournalError", "os_error_name"]


class JournalError(BusError):
    """The journal could not be written or read: ``cause`` names why (``"ENOSPC"``...),
    ``file`` which file. Writes may be retried; reads keep working."""

    code = "journal"

    def __init__(self, message: str, *, file: str | None = None,
                 cause: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.cause = cause


class JournalCorrupt(JournalError):
    """A bad checksum before the tail: confirmed data is damaged. Run :func:`~.repair`."""

    def __init__(self, file: str, offset: int, detail: str) -> None:
        super().__init__(f"journal segment {file} is damaged at offset {offset}: {detail}",
                         file=file, cause="corrupt")
        self.offset = offset


def os_error_name(exc: OSError) -> str:
    """``"ENOSPC"`` for an OSError with that errno: a JournalError's ``cause``."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))
