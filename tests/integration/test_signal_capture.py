"""Signal bridges with real signals: ``os.kill`` and ``kill`` processes aimed at this test
process, and real child processes as forwarding targets.

The bus is a recording sink for ``publish`` calls only: these tests are about the OS side.
The end-to-end test against the real broker belongs with the client.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aiobus.bridges.signals import ForwardStatistics, forward_signals, signals_to_bus

TIMEOUT = 10
USR1, USR2 = Signals.SIGUSR1, Signals.SIGUSR2


@dataclass
class RecordingBus:
    """Records publishes (optionally slowly); replays ``script`` for subscribe."""

    delay: float = 0.0
    published: list[tuple[str, Any, dict[str, str]]] = field(default_factory=list)
    script: list[Callable[[], object]] = field(default_factory=list)

    async def publish(
        self, topic: str, body: Any, /, *, headers: dict[str, str] | None = None
    ) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        self.published.append((topic, body, dict(headers or {})))

    async def subscribe(self, pattern: str, /) -> AsyncIterator[Any]:
        for before in self.script:
            before()  # runs before each message is handed over
            yield object()


class PreviousHandler:
    """A Python-level handler installed before the bridge, to check it comes back."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.calls.append(signum)


@pytest.fixture
def previous() -> Iterator[PreviousHandler]:
    handler = PreviousHandler()
    saved = {sig: signal.signal(sig, handler) for sig in (USR1, USR2)}
    try:
        yield handler
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.005)


async def kill_from_shell(script: str) -> None:
    await anyio.run_process(["sh", "-c", script])


@pytest.mark.asyncio
async def test_one_message_per_signal(previous: PreviousHandler) -> None:
    bus = RecordingBus()
    mapping = {USR1: "sig.usr1", USR2: "sig.usr2"}
    with anyio.fail_after(TIMEOUT):
        async with signals_to_bus(bus, mapping) as stats:
            before = time.time()
            os.kill(os.getpid(), USR1)
            await wait_until(lambda: len(bus.published) == 1)
            await kill_from_shell(f"kill -USR2 {os.getpid()}")  # from another process
            await wait_until(lambda: len(bus.published) == 2)
    assert [(topic, body) for topic, body, _ in bus.published] == [
        ("sig.usr1", "SIGUSR1"),
        ("sig.usr2", "SIGUSR2"),
    ]
    headers = bus.published[0][2]
    assert headers.keys() == {"signal", "signo", "pid", "time", "count"}
    assert headers["signal"] == "SIGUSR1"
    assert headers["signo"] == str(int(USR1))
    assert headers["pid"] == str(os.getpid())
    assert headers["count"] == "1"
    assert before <= float(headers["time"]) <= time.time()
    assert stats.delivered == {USR1: 1, USR2: 1} and stats.published == {USR1: 1, USR2: 1}
    assert previous.calls == []  # the bridge had the signals, not the previous handler


@pytest.mark.asyncio
async def test_previous_handlers_are_restored(previous: PreviousHandler) -> None:
    default_usr2 = signal.signal(USR2, signal.SIG_IGN)
    calls = previous.calls
    try:
        with anyio.fail_after(TIMEOUT):
            async with signals_to_bus(RecordingBus(), {USR1: "a", USR2: "b"}):
                assert signal.getsignal(USR1) is not previous
        assert signal.getsignal(USR1) is previous
        assert signal.getsignal(USR2) == signal.SIG_IGN
        os.kill(os.getpid(), USR1)  # the Python handler runs at the next bytecode
        await anyio.lowlevel.checkpoint()
        assert calls == [USR1]
    finally:
        signal.signal(USR2, default_usr2)


@pytest.mark.asyncio
async def test_handlers_are_restored_when_publishing_fails(previous: PreviousHandler) -> None:
    class BrokenBus(RecordingBus):
        async def publish(self, topic: str, body: Any, /, *, headers: Any = None) -> None:
            raise ConnectionResetError("bus went away")

    with pytest.raises(ExceptionGroup) as info, anyio.fail_after(TIMEOUT):
        async with signals_to_bus(BrokenBus(), {USR1: "a"}):
            os.kill(os.getpid(), USR1)
            await anyio.sleep_forever()  # cancelled by the failing publisher
    assert info.group_contains(ConnectionResetError)
    assert signal.getsignal(USR1) is previous


@pytest.mark.asyncio
async def test_signal_storm_guarantees(previous: PreviousHandler) -> None:
    # A slow bus, so deliveries pile up while a publish is in flight and get coalesced.
    bus = RecordingBus(delay=0.002)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    def counted() -> int:
        return sum(int(headers["count"]) for _, _, headers in bus.published)

    with anyio.fail_after(TIMEOUT):
        async with signals_to_bus(bus, {USR1: "storm"}) as stats:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                await anyio.sleep(0.01)
                ticks_before = ticks
                # 500 kills from another process: the kernel may merge them.
                await kill_from_shell(
                    f"i=0; while [ $i -lt 500 ]; do kill -USR1 {os.getpid()}; i=$((i+1)); done"
                )
                assert ticks > ticks_before  # the loop kept running during the storm
                await wait_until(lambda: counted() == stats.delivered.get(USR1))
                from_shell = stats.delivered[USR1]
                assert 1 <= from_shell <= 500
                # 1000 kills from this process, each delivered before os.kill returns; the
                # loop drains its wake-up socket every 100, so none is dropped.
                for batch in range(10):
                    for _ in range(100):
                        os.kill(os.getpid(), USR1)
                    await anyio.sleep(0.001 * (batch % 2))
                await wait_until(lambda: counted() == stats.delivered.get(USR1))
                assert stats.delivered[USR1] == from_shell + 1000
                # 2000 kills without letting the loop run: its wake-up socket overflows and
                # CPython drops deliveries (quietly: warnings are errors in this suite).
                before_overflow = stats.delivered[USR1]
                for _ in range(2000):
                    os.kill(os.getpid(), USR1)
                last_kill = time.time()
                await anyio.sleep(0.05)
                await wait_until(lambda: counted() == stats.delivered.get(USR1))
                tg.cancel_scope.cancel()

    delivered = stats.delivered[USR1]
    assert before_overflow < delivered <= before_overflow + 2000
    counts = [int(headers["count"]) for _, _, headers in bus.published]
    assert sum(counts) == delivered  # every observed delivery is in exactly one message
    assert len(counts) < delivered  # coalesced: fewer messages than deliveries
    times = [float(headers["time"]) for _, _, headers in bus.published]
    assert times == sorted(times)  # in delivery order
    assert times[-1] >= last_kill  # a message follows the last delivery
    assert stats.published[USR1] == len(bus.published)
    assert previous.calls == []


@pytest.mark.asyncio
async def test_forward_signals_to_pid_and_pidfile(tmp_path: Path) -> None:
    # Targets are our own children; a pid above pid_max is guaranteed not to exist.
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    pidfile = tmp_path / "service.pid"
    async with (
        await anyio.open_process(["sleep", "30"]) as first,
        await anyio.open_process(["sleep", "30"]) as second,
    ):
        try:
            steps: list[Callable[[], object]] = [
                lambda: pidfile.write_text(f"{first.pid}\n"),
                lambda: pidfile.write_text(f"{second.pid}\n"),  # re-read per message
                lambda: pidfile.write_text(f"{gone}\n"),
                lambda: pidfile.write_text("0\n"),  # would signal our process group
                lambda: pidfile.unlink(),
            ]
            with anyio.fail_after(TIMEOUT):
                stats = await forward_signals(
                    RecordingBus(script=steps), "svc.stop", signal=Signals.SIGTERM, pidfile=pidfile
                )
                assert await first.wait() == -Signals.SIGTERM
                assert await second.wait() == -Signals.SIGTERM
        finally:
            for proc in (first, second):
                if proc.returncode is None:
                    proc.kill()
    assert stats == ForwardStatistics(sent=2, gone=1, no_target=2)

    with anyio.fail_after(TIMEOUT):
        stats = await forward_signals(
            RecordingBus(script=[lambda: None]), "t", signal=Signals.SIGTERM, pid=gone
        )
    assert stats == ForwardStatistics(gone=1)
    with pytest.raises(ValueError, match="exactly one"):
        await forward_signals(RecordingBus(), "t", signal=Signals.SIGTERM)
    with pytest.raises(ValueError, match="positive"):
        await forward_signals(RecordingBus(), "t", signal=Signals.SIGTERM, pid=-1)
