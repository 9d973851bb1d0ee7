"""Named pipes (FIFOs) on asyncio without blocking the loop.

The bridges between FIFOs and the bus (``fifo_to_bus``, ``bus_to_fifo``) live in
:mod:`aiobus.bridges.fifo_bus`.

This module is where the FIFO names are imported from; the code is in three modules,
each with the theory of operation of its part: :mod:`~aiobus.bridges.fifo_reader`
(:class:`FifoReader`: reading across writers that come and go),
:mod:`~aiobus.bridges.fifo_writer` (:class:`FifoWriter` and its statistics: waiting for
a reader, the record guarantee, stopping mid-record), and
:mod:`~aiobus.bridges.fifo_common` (the errors, :func:`ensure_fifo` and what both sides
share).
"""

from __future__ import annotations

from .fifo_common import (
    FifoBusyError,
    FifoClosedError,
    FifoError,
    ForeignFifoError,
    NotAFifoError,
    ensure_fifo,
)
from .fifo_reader import FifoReader
from .fifo_writer import FifoWriter, FifoWriterStatistics

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
