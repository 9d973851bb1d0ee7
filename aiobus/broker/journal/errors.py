"""The journal's errors: one home, raised by the store, recovery and repair alike."""

from __future__ import annotations

import errno

from ...errors import JournalError

__all__ = ["JournalCorrupt", "JournalError", "os_error_name"]

# JournalError is aiobus.errors.JournalError: what a client gets for a durable send the
# journal could not take is the same class the journal raises here.


class JournalCorrupt(JournalError):
    """A bad checksum before the tail: confirmed data is damaged. Run :func:`~.repair`."""

    def __init__(self, file: str, offset: int, detail: str) -> None:
        super().__init__(f"journal segment {file} is damaged at offset {offset}: {detail}",
                         file=file, cause="corrupt")
        self.offset = offset


def os_error_name(exc: OSError) -> str:
    """``"ENOSPC"`` for an OSError with that errno: a JournalError's ``cause``."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))
