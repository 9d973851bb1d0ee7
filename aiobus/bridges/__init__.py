"""Bridges between the bus and the operating system: FIFOs and signals.

:mod:`~aiobus.bridges.framing` is the sans-IO record framing; :mod:`~aiobus.bridges.fifo`
does FIFO I/O on asyncio; :mod:`~aiobus.bridges.fifo_bus` and
:mod:`~aiobus.bridges.signals` tie them to a bus client.
"""

from __future__ import annotations

from .fifo import (
    FifoBusyError,
    FifoClosedError,
    FifoError,
    FifoReader,
    FifoWriter,
    FifoWriterStatistics,
    ForeignFifoError,
    NotAFifoError,
    ensure_fifo,
)
from .fifo_bus import BridgeStatistics, FifoBus, bus_to_fifo, fifo_to_bus
from .framing import (
    DEFAULT_MAX_RECORD,
    FRAMINGS,
    Codec,
    Framing,
    FramingError,
    MalformedRecordError,
    Oversize,
    RecordTooLargeError,
    UnencodableRecordError,
    make_codec,
)
from .signals import (
    ForwardStatistics,
    SignalBus,
    SignalCaptureStatistics,
    forward_signals,
    signals_to_bus,
)

__all__ = [
    "DEFAULT_MAX_RECORD",
    "FRAMINGS",
    "BridgeStatistics",
    "Codec",
    "FifoBus",
    "FifoBusyError",
    "FifoClosedError",
    "FifoError",
    "FifoReader",
    "FifoWriter",
    "FifoWriterStatistics",
    "ForeignFifoError",
    "ForwardStatistics",
    "Framing",
    "FramingError",
    "MalformedRecordError",
    "NotAFifoError",
    "Oversize",
    "RecordTooLargeError",
    "SignalBus",
    "SignalCaptureStatistics",
    "UnencodableRecordError",
    "bus_to_fifo",
    "ensure_fifo",
    "fifo_to_bus",
    "forward_signals",
    "make_codec",
    "signals_to_bus",
]
