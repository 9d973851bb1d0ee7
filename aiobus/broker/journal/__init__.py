"""The durable-queue journal: segment files of checksummed records, and their replay.

Sans-IO: ``records`` (the format: record types and encoding), ``decode`` (the decoder)
and ``replay`` (folding records into the live state). With I/O: ``files`` (the
file-access interface and its ``os`` implementation), ``recovery`` (reading a directory
back), ``store`` (the Journal, in layers: ``appending``, the append buffer and its
runs; ``segments``, write/sync and rotation; ``compaction``, compaction and rebuild) and
``repair``; ``errors`` is shared.
docs/journal.md describes the format and the rules.
"""

from __future__ import annotations

from .errors import JournalCorrupt, JournalError
from .files import Files, OsFiles
from .records import RemovalReason
from .recovery import Recovered, RecoveredMessage, RecoveredQueue, RecoveryReport, TornTail
from .repair import RepairReport, repair
from .store import Journal, SyncTicket

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
    "SyncTicket",
    "TornTail",
    "repair",
]
