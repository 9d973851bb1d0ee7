"""Bridges between POSIX signals and the bus: capture signals as messages, and forward
messages as signals.

Theory of operation: capture
----------------------------
:func:`signals_to_bus` installs ``loop.add_signal_handler`` callbacks. The C-level handler
only writes to the loop's wake-up fd; the loop then runs our callback, which bumps a
per-signal counter, notes the time, and sets a wake-up event. It never allocates per
delivery and never awaits, so a storm costs O(number of signal kinds) memory and cannot
block the loop. One publisher task, owned by a task group inside the context manager,
turns the counters into messages.

Messages are *coalesced*: each message stands for every delivery of its signal observed
since that signal's previous message, and its ``count`` header says how many. Without a
storm (each signal published before the next arrives) that is one message per signal,
with ``count: 1``.

What is guaranteed under a storm. Deliveries are merged before the bridge sees them, at
two places it cannot change: the kernel keeps one pending instance per standard signal,
so N ``kill`` calls may be delivered fewer than N times; and asyncio learns of a delivery
through one byte on its wake-up socket, which on Linux holds a few hundred bytes' worth of
deliveries per loop turn (each 1-byte write costs a full socket buffer unit), beyond which
CPython drops the byte. "Observed deliveries" below are the loop's callbacks.

* Every observed delivery is counted in exactly one message: the ``count`` headers of a
  signal's messages add up to its observed deliveries (``stats.delivered``).
* At least one message for a signal is published after its last observed delivery; its
  ``time`` header is when the loop observed that delivery. A delivery whose wake-up byte
  was dropped is still followed by a message if a byte for the same signal was queued
  (always so in a storm of one signal); in a mixed storm that overflows the socket, a
  signal whose every byte was dropped goes unseen.
* Messages of one signal are published in order (one publisher, sequential publishes);
  different signals in the order of their oldest unpublished delivery.
* The loop is never blocked: the handler is O(1), publishing happens in a task. Dropped
  wake-up bytes are part of these semantics, so the bridge turns off CPython's stderr
  report of each one (``warn_on_full_buffer=False``, as trio does for its own wake-up fd).

On exit the handlers are removed first (later signals go to the previous handlers), then
the publisher flushes what is pending, bounded by ``flush_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as _signal
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals
from typing import Any, Protocol

import anyio
import anyio.abc

__all__ = [
    "ForwardStatistics",
    "SignalBus",
    "SignalCaptureStatistics",
    "forward_signals",
    "signals_to_bus",
]

logger = logging.getLogger(__name__)

_Handler = Callable[[int, Any], Any] | int | None


class _Message(Protocol):
    @property
    def body(self) -> Any: ...


class SignalBus(Protocol):
    """The part of the aiobus client API the signal bridges use."""

    async def publish(
        self, topic: str, body: Any, /, *, headers: dict[str, str] | None = ...
    ) -> object: ...
    def subscribe(self, pattern: str, /) -> AsyncIterable[_Message]: ...


@dataclass(slots=True)
class SignalCaptureStatistics:
    """Counters of :func:`signals_to_bus`."""

    delivered: dict[Signals, int] = field(default_factory=dict)  # deliveries observed
    published: dict[Signals, int] = field(default_factory=dict)  # messages published


class _Capture:
    """The handler side (sync, O(1)) and the publisher task of :func:`signals_to_bus`."""

    def __init__(self, mapping: Mapping[Signals, str], stats: SignalCaptureStatistics,
                 body: Callable[[Signals], Any] | None = None) -> None:
        self._topics = dict(mapping)
        self._body = body
        self._stats = stats
        # Unpublished deliveries per signal; dict order is the order of the oldest one.
        self._pending: dict[Signals, int] = {}
        self._last_time: dict[Signals, float] = {}
        self._wake = asyncio.Event()
        self._closing = False

    def on_signal(self, signum: Signals) -> None:
        self._pending[signum] = self._pending.get(signum, 0) + 1
        self._last_time[signum] = time.time()
        self._stats.delivered[signum] = self._stats.delivered.get(signum, 0) + 1
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def publish_all(self, bus: SignalBus) -> None:
        pid = str(os.getpid())
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()  # no await since the check: no delivery can slip past
                await self._wake.wait()
                continue
            signum = next(iter(self._pending))
            count = self._pending.pop(signum)
            headers = {
                "signal": signum.name,
                "signo": str(signum.value),
                "pid": pid,
                "time": f"{self._last_time[signum]:.6f}",
                "count": str(count),
            }
            body = signum.name if self._body is None else self._body(signum)
            await bus.publish(self._topics[signum], body, headers=headers)
            self._stats.published[signum] = self._stats.published.get(signum, 0) + 1


@asynccontextmanager
async def signals_to_bus(
    bus: SignalBus,
    mapping: Mapping[Signals, str],
    *,
    body: Callable[[Signals], Any] | None = None,
    flush_timeout: float = 1.0,
) -> AsyncIterator[SignalCaptureStatistics]:
    """Publish a message on the bus for the signals this process receives, while open.

    Each message's body is the signal's name (``"SIGHUP"``, a ``str``), or what ``body``
    returns for the signal when given (called in the publisher task, when the message is
    built: a service's current state, say); its headers are
    ``signal`` (name), ``signo`` (number), ``pid`` (this process), ``time`` (epoch
    seconds of the latest delivery it covers) and ``count`` (deliveries it covers; see the
    module docstring for the guarantees under a signal storm).

    Must run in the main thread, on an asyncio loop. Takes over the signals in ``mapping``
    for the duration and restores their previous Python-level handlers on exit. A callback
    that something else registered with ``loop.add_signal_handler`` for the same signal is
    replaced and not restored (asyncio keeps one callback per signal).

    Args:
        bus: a connected client (``aiobus.connect``).
        mapping: the signals to capture, each with the topic to publish it on.
        body: makes a message's body from its signal (any msgpack-serialisable value).
        flush_timeout: on exit, how long to keep publishing deliveries still pending.

    Returns:
        An async context manager yielding live :class:`SignalCaptureStatistics`.

    Raises:
        RuntimeError: a signal cannot be caught (``SIGKILL``, ``SIGSTOP``), or not in
            the main thread.
        ExceptionGroup: holding what ``bus.publish`` raised; the block is cancelled.

    Example:
        >>> async with aiobus.connect() as bus:  # doctest: +SKIP
        ...     async with signals_to_bus(bus, {Signals.SIGHUP: "app.reload"}):
        ...         await anyio.sleep_forever()
    """
    loop = asyncio.get_running_loop()
    stats = SignalCaptureStatistics()
    capture = _Capture(mapping, stats, body)
    previous: dict[Signals, _Handler] = {}
    try:
        for signum in mapping:
            previous[signum] = _signal.getsignal(signum)
            loop.add_signal_handler(signum, capture.on_signal, signum)
        _quiet_wakeup_fd()
        async with anyio.create_task_group() as tg:
            tg.start_soon(capture.publish_all, bus, name="aiobus signal publisher")
            try:
                yield stats
            finally:
                _restore(loop, previous)
                capture.close()
                tg.cancel_scope.deadline = anyio.current_time() + flush_timeout
    finally:
        _restore(loop, previous)


def _quiet_wakeup_fd() -> None:
    # Re-set the loop's wake-up fd with warn_on_full_buffer=False. Python only tells the old
    # fd when setting a new one, so block signals meanwhile: a signal arriving between the
    # two calls stays pending instead of missing the wake-up fd.
    blocked = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        fd = _signal.set_wakeup_fd(-1)
        if fd != -1:
            _signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, blocked)


def _restore(loop: asyncio.AbstractEventLoop, previous: dict[Signals, _Handler]) -> None:
    # remove_signal_handler resets the signal to SIG_DFL (SIGINT: default_int_handler),
    # not to the handler it replaced, so put that back ourselves.
    while previous:
        signum, handler = previous.popitem()
        loop.remove_signal_handler(signum)
        if handler is not None:  # None: installed outside Python; leave the default
            _signal.signal(signum, handler)


@dataclass(slots=True)
class ForwardStatistics:
    """Counters of :func:`forward_signals`."""

    sent: int = 0  # signals sent
    gone: int = 0  # target process no longer exists (ProcessLookupError)
    denied: int = 0  # no permission to signal the target (PermissionError)
    no_target: int = 0  # pidfile missing, unreadable, or not a positive pid


async def forward_signals(
    bus: SignalBus,
    topic: str,
    *,
    signal: Signals,
    pid: int | None = None,
    pidfile: str | os.PathLike[str] | None = None,
    stats: ForwardStatistics | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> ForwardStatistics:
    """Send ``signal`` to a process for every message published on ``topic``.

    The target is ``pid``, or the pid in ``pidfile``, read again for every message so a
    restarted service is found. A target that is gone, not ours to signal, or a pidfile
    that is missing or invalid is logged (rate-limited) and counted, and the bridge goes
    on with the next message.

    Args:
        bus: a connected client (``aiobus.connect``).
        topic: the topic (or pattern) to subscribe to.
        signal: the signal to send.
        pid: the target process; exclusive with ``pidfile``.
        pidfile: a file holding the target's pid (first line, decimal).
        stats: counters to update; a fresh :class:`ForwardStatistics` if omitted.
        task_status: for ``TaskGroup.start``; started before subscribing.

    Returns:
        The counters, when the subscription ends (the bus closed).

    Raises:
        ValueError: not exactly one of ``pid`` and ``pidfile``, or ``pid`` not positive.

    Example:
        >>> async with aiobus.connect() as bus:  # doctest: +SKIP
        ...     await forward_signals(
        ...         bus, "nginx.reload", signal=Signals.SIGHUP, pidfile="/run/nginx.pid"
        ...     )
    """
    if (pid is None) == (pidfile is None):
        raise ValueError("give exactly one of pid= and pidfile=")
    if pid is not None and pid <= 0:
        raise ValueError(f"pid must be positive (0 and negatives signal groups), got {pid}")
    pidpath = Path(pidfile) if pidfile is not None else None
    stats = ForwardStatistics() if stats is None else stats
    task_status.started()
    async for _message in bus.subscribe(topic):
        target = pid if pidpath is None else _read_pidfile(pidpath)
        if target is None:
            stats.no_target += 1
            _log_repeated(stats.no_target, "pidfile %s holds no valid pid", pidfile)
            continue
        try:
            os.kill(target, signal)
        except ProcessLookupError:
            stats.gone += 1
            _log_repeated(stats.gone, "process %d is gone; %s not sent", target, signal.name)
        except PermissionError:
            stats.denied += 1
            _log_repeated(stats.denied, "not allowed to send %s to %d", signal.name, target)
        else:
            stats.sent += 1
    return stats


def _read_pidfile(path: Path) -> int | None:
    # A blocking read, but of a few bytes on a local (usually tmpfs) file.
    try:
        first = path.read_text(encoding="ascii").split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None  # never 0 or -1: those signal whole process groups


def _log_repeated(count: int, message: str, *args: object) -> None:
    if count & (count - 1) == 0:  # rate limit: the 1st, 2nd, 4th, 8th... time
        logger.warning("%s (%d times so far)", message % args, count)
