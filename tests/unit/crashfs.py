"""An in-memory :class:`aiobus.broker.journal.Files` that can crash, like SQLite's crash
VFS (src/test6.c): it records every write and sync, and :meth:`CrashFS.crash` returns the
disk as a power cut could leave it, each write not yet synced applied, dropped (a hole of
zeros if later data landed) or applied as garbage. Directory changes (create, rename,
remove) last only once :meth:`sync_directory` ran; after it they all do.

``space`` caps the bytes all files may hold: an append past it writes what fits and
raises ENOSPC, as a real nearly full disk does.

``fail_sync`` makes fdatasync raise EIO. With ``lose_on_failed_sync`` (a Random) it also
does what Linux may do then (PostgreSQL's fsyncgate, 2018): each write the failed sync
covered is lost for good, turned to zeros (dropped) or garbage, on disk and in the page
cache alike (the pages were marked clean, then evicted); later syncs succeed and never
write it again.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field


@dataclass
class _File:
    durable: bytearray = field(default_factory=bytearray)
    current: bytearray = field(default_factory=bytearray)
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)  # unsynced ops


class CrashFS:
    def __init__(self) -> None:
        self.dir: dict[str, _File] = {}
        self.durable_dir: dict[str, _File] = {}
        self.handles: dict[int, _File] = {}
        self.names: dict[int, str] = {}
        self.next_handle = 3
        self.log: list[tuple[str, str]] = []  # (operation, file name)
        self.space: int | None = None
        self.fail_sync = False
        self.lose_on_failed_sync: random.Random | None = None

    # --- the Files interface -------------------------------------------------------

    def list(self) -> list[str]:
        return sorted(self.dir)

    def read(self, name: str) -> bytes:
        return bytes(self.dir[name].current)

    def read_head(self, name: str, size: int) -> bytes:
        return bytes(self.dir[name].current[:size])

    def _open(self, name: str) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle], self.names[handle] = self.dir[name], name
        return handle

    def create(self, name: str) -> int:
        if name in self.dir:
            raise FileExistsError(errno.EEXIST, name)
        self.dir[name] = _File()
        self.log.append(("create", name))
        return self._open(name)

    def open_append(self, name: str) -> int:
        if name not in self.dir:
            raise FileNotFoundError(errno.ENOENT, name)
        return self._open(name)

    def used(self) -> int:
        return sum(len(f.current) for f in self.dir.values())

    def append(self, handle: int, data: bytes | bytearray) -> None:
        f = self.handles[handle]
        room = len(data) if self.space is None else max(0, self.space - self.used())
        part = data[:room]
        if part:
            f.pending.append(("write", len(f.current), bytes(part)))
            f.current += part
        self.log.append(("append", self.names[handle]))
        if len(part) < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def size(self, handle: int) -> int:
        return len(self.handles[handle].current)

    def sync(self, handle: int) -> None:
        f = self.handles[handle]
        if self.fail_sync:
            rng = self.lose_on_failed_sync
            if rng is not None:
                for op, at, data in f.pending:
                    if op == "write" and at < len(f.current):
                        end = min(at + len(data), len(f.current))
                        f.current[at:end] = (rng.randbytes(end - at) if rng.random() < 0.5
                                             else bytes(end - at))
                f.durable = bytearray(f.current)
                f.pending.clear()
                self.log.append(("lost", self.names[handle]))
            raise OSError(errno.EIO, "Input/output error")
        f.durable = bytearray(f.current)
        f.pending.clear()
        self.log.append(("sync", self.names[handle]))

    def truncate(self, handle: int, length: int) -> None:
        f = self.handles[handle]
        del f.current[length:]
        f.pending.append(("truncate", length, b""))
        self.log.append(("truncate", self.names[handle]))

    def close(self, handle: int) -> None:
        del self.handles[handle], self.names[handle]

    def rename(self, old: str, new: str) -> None:
        self.dir[new] = self.dir.pop(old)
        self.log.append(("rename", new))

    def remove(self, name: str) -> None:
        del self.dir[name]
        self.log.append(("remove", name))

    def sync_directory(self) -> None:
        self.durable_dir = dict(self.dir)
        self.log.append(("sync_directory", ""))

    # --- crashing ------------------------------------------------------------------

    def crash(self, rng: random.Random) -> CrashFS:
        """The disk after a power cut: a new CrashFS holding only what could survive."""
        after = CrashFS()
        for name, f in self.durable_dir.items():
            content = bytearray(f.durable)
            for op, at, data in f.pending:
                fate = rng.choice(("applied", "dropped", "garbage"))
                if op == "truncate":
                    if fate != "dropped":
                        del content[at:]
                    continue
                if fate == "dropped":
                    continue
                if fate == "garbage":
                    data = rng.randbytes(len(data))
                if len(content) < at:
                    content += bytes(at - len(content))
                content[at:at + len(data)] = data
            after.dir[name] = _File(bytearray(content), bytearray(content))
        after.durable_dir = dict(after.dir)
        return after
