"""The durable-queue journal: segment files of checksummed records, and their replay.

``records`` is sans-IO (encoding, the decoder, :class:`~.records.Replay`); ``files`` is
the file-access interface and its ``os`` implementation; ``store`` holds segments, the
append buffer, write/sync, recovery, compaction and repair. docs/journal.md describes
the format and the rules.
"""

from __future__ import annotations

from .files import Files, OsFiles
from .records import RemovalReason
from .store import (
    Journal,
    JournalCorrupt,
    JournalError,
    Recovered,
    RecoveredMessage,
    RecoveredQueue,
    RecoveryReport,
    RepairReport,
    TornTail,
    repair,
)

__all__ = [
    "Files",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "OsFiles",
    "Recovered",
    "RecoveredMessage",
    "RecoveredQueue",
    "RecoveryReport",
    "RemovalReason",
    "RepairReport",
    "TornTail",
    "repair",
]
