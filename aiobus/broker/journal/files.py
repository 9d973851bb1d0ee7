"""The journal's file access: a small interface and its implementation over ``os``.

Everything the journal does to the disk goes through :class:`Files`, so a test double
(tests/unit/crashfs.py) can record each write and fsync and simulate a crash the way
SQLite's crash VFS does (src/test6.c): every write not yet synced is applied, dropped or
applied with garbage. The interface is deliberately the handful of calls a log needs:
append at the end, fdatasync, truncate, atomic rename plus a directory fsync, list,
remove, read whole (or only a header). Files are named inside one directory; handles are
opaque ints.

Segments are named ``<number>.seg`` with 16 digits, so that names sort in number order.
"""

from __future__ import annotations

import os
from typing import Protocol

__all__ = ["SUFFIX", "Files", "OsFiles", "segment_name", "segment_names"]

SUFFIX = ".seg"


def segment_name(number: int) -> str:
    return f"{number:016d}{SUFFIX}"


def segment_names(files: Files) -> list[str]:
    """The segments in ``files``, oldest first."""
    return sorted(n for n in files.list() if n.endswith(SUFFIX))


class Files(Protocol):
    def list(self) -> list[str]:
        """Names of the files in the journal directory."""

    def read(self, name: str) -> bytes:
        """A whole file's bytes."""

    def read_head(self, name: str, size: int) -> bytes:
        """A file's first ``size`` bytes (fewer if it is shorter)."""

    def create(self, name: str) -> int:
        """Create ``name`` (it must not exist) for appending; returns a handle."""

    def open_append(self, name: str) -> int:
        """Open an existing file for appending at its end; returns a handle."""

    def append(self, handle: int, data: bytes | bytearray) -> None:
        """Write all of ``data`` at the end of the file (may raise OSError: ENOSPC, EIO)."""

    def size(self, handle: int) -> int:
        """The file's current length."""

    def sync(self, handle: int) -> None:
        """fdatasync: the file's data (and its length) reach the disk."""

    def truncate(self, handle: int, length: int) -> None:
        """Cut the file back to ``length`` bytes."""

    def close(self, handle: int) -> None: ...

    def rename(self, old: str, new: str) -> None:
        """Atomically replace ``new`` by ``old``; durable after :meth:`sync_directory`."""

    def remove(self, name: str) -> None: ...

    def sync_directory(self) -> None:
        """fsync the directory, so creations, renames and removals are durable."""


class OsFiles:
    """:class:`Files` over a real directory."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def list(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def read(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def read_head(self, name: str, size: int) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read(size)

    def create(self, name: str) -> int:
        return os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                       0o600)

    def open_append(self, name: str) -> int:
        return os.open(self._path(name), os.O_WRONLY | os.O_APPEND)

    def append(self, handle: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (a signal, a nearly full disk)
            view = view[os.write(handle, view):]

    def size(self, handle: int) -> int:
        return os.fstat(handle).st_size

    def sync(self, handle: int) -> None:
        os.fdatasync(handle)

    def truncate(self, handle: int, length: int) -> None:
        os.ftruncate(handle, length)

    def close(self, handle: int) -> None:
        os.close(handle)

    def rename(self, old: str, new: str) -> None:
        os.replace(self._path(old), self._path(new))

    def remove(self, name: str) -> None:
        os.unlink(self._path(name))

    def sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
