"""Repair: put a damaged segment aside and keep every record that still reads.

Recovery refuses damage before the tail (:class:`~.errors.JournalCorrupt`) rather than
skip it silently; repairing is a separate, explicit step (``aiobus-broker --repair``),
and it names what may have been lost. docs/journal.md says what its count can miss.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import decode as d
from . import records as r
from .files import SUFFIX, Files, segment_names

__all__ = ["RepairReport", "repair"]


@dataclass(frozen=True, slots=True)
class RepairReport:
    file: str
    moved_to: str  # the damaged original, kept for forensics
    damaged: list[tuple[int, int]]  # byte spans (start, end) that were unreadable
    lost: list[tuple[str, int]]  # (queue, seq) of each message that may be lost


def repair(files: Files, name: str) -> RepairReport:
    """Move the damaged segment ``name`` aside as ``<name>.damaged`` and put in its place
    every record that still reads; report which messages were lost.

    A queue's sends in one segment have the consecutive sequence numbers from the
    ``next_seq`` its opening QueueDeclared names up to the next segment's (or, in the
    last segment, to the highest one read): each number in that range with no readable
    Sent, and no readable removal here or later, is reported lost. (A message that
    compaction had copied into the damaged span escapes this count; docs/journal.md.)

    Example::

        try:
            journal, recovered = Journal.open(files)
        except JournalCorrupt as exc:
            report = repair(files, exc.file)   # log report.lost, then open again
    """
    names = segment_names(files)
    data = files.read(name)
    good, spans = d.salvage(data)
    header = data[:r.HEADER_SIZE]
    if d.decode_segment(header, last=False).number is None:
        header = r.segment_header(int(name.removesuffix(SUFFIX)))
        spans.insert(0, (0, r.HEADER_SIZE))
    later = names[names.index(name) + 1:]
    # seq ranges per qid: [start, end)
    start: dict[int, int] = {}
    seen: dict[int, set[int]] = {}
    qnames: dict[int, str] = {}
    for _, _, record in good:
        if type(record) is r.QueueDeclared:
            start.setdefault(record.qid, record.next_seq)
            qnames[record.qid] = record.name
        elif type(record) is r.Sent or type(record) is r.Removed:
            seen.setdefault(record.qid, set()).add(record.seq)
        elif type(record) is r.RemovedRun:
            seen.setdefault(record.qid, set()).update(record.seqs)
        elif type(record) is r.SentRun:
            seen.setdefault(record.qid, set()).update(
                range(record.first, record.first + len(record.messages)))
    end: dict[int, int] = {qid: max(seqs) + 1 for qid, seqs in seen.items()}
    for i, later_name in enumerate(later):
        decoded = d.decode_segment(files.read(later_name), last=i == len(later) - 1)
        for _, record in decoded.records:
            if type(record) is r.QueueDeclared and record.qid in start and i == 0:
                end[record.qid] = max(end.get(record.qid, 0), record.next_seq)
                qnames.setdefault(record.qid, record.name)
            elif type(record) is r.Removed:
                seen.setdefault(record.qid, set()).add(record.seq)
            elif type(record) is r.RemovedRun:
                seen.setdefault(record.qid, set()).update(record.seqs)
    lost = [
        (qnames.get(qid, f"#{qid}"), seq)
        for qid in sorted(start)
        for seq in range(start[qid], end.get(qid, start[qid]))
        if seq not in seen.get(qid, ())
    ] if spans else []
    moved = name + ".damaged"
    replacement = header + b"".join(data[a:b] for a, b, _ in good)
    files.rename(name, moved)
    files.sync_directory()
    tmp = name + ".tmp"
    handle = files.create(tmp)
    try:
        files.append(handle, replacement)
        files.sync(handle)
    finally:
        files.close(handle)
    files.rename(tmp, name)
    files.sync_directory()
    return RepairReport(name, moved, spans, lost)
