"""FIFO I/O with real FIFOs, written and read by real shell commands, each a new process.

No broker: the bus bridges are exercised against a recording sink here, which plays a
client that confirms late and disconnects; tests/integration/test_bridges_restart.py runs
them against a real broker that restarts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest

from aiobus.bridges.fifo import (
    FifoBusyError,
    FifoClosedError,
    FifoReader,
    FifoWriter,
    NotAFifoError,
    ensure_fifo,
)
from aiobus.bridges.fifo_bus import BridgeStatistics, bus_to_fifo, fifo_to_bus
from aiobus.bridges.framing import MalformedRecordError, Oversize
from aiobus.errors import ConnectionLost, LeaseError

TIMEOUT = 10


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    return ensure_fifo(tmp_path / "jobs")


async def sh(script: str) -> bytes:
    """Run ``script`` in a new ``sh`` process (a new FIFO writer or reader each time)."""
    result = await anyio.run_process(["sh", "-c", script])
    return result.stdout


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    # Polling is fine here: the conditions are counters inside the code under test.
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await anyio.sleep(0.01)


async def receive_n(reader: FifoReader, n: int) -> list[bytes | Oversize]:
    return [await reader.receive() for _ in range(n)]


async def read_raw(fd: int, *, upto: int | None = None) -> bytes:
    """Read a non-blocking FIFO fd the slow way: ``upto`` bytes, else up to a newline."""
    data = b""
    deadline = time.monotonic() + 10.0
    while (len(data) < upto) if upto is not None else not data.endswith(b"\n"):
        assert time.monotonic() < deadline, f"read {len(data)} bytes in 10 s"
        try:
            chunk = os.read(fd, (upto - len(data)) if upto is not None else 65536)
        except BlockingIOError:
            chunk = b""
        if not chunk:  # an empty pipe, or no writer yet
            await anyio.sleep(0.01)
        data += chunk
    return data


def test_ensure_fifo(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert ensure_fifo(path) == path
    assert stat.S_ISFIFO(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ensure_fifo(path)  # already there: fine
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotAFifoError, match=r"file.* is not a FIFO \(a file\)"):
        ensure_fifo(tmp_path / "file")
    with pytest.raises(NotAFifoError, match="directory"):
        ensure_fifo(tmp_path)


@pytest.mark.asyncio
async def test_reader_survives_many_writers(fifo: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with FifoReader(fifo) as reader:
            for i in range(5):
                await sh(f"echo job{i} >> {shlex.quote(str(fifo))}")
            assert await receive_n(reader, 5) == [b"job0", b"job1", b"job2", b"job3", b"job4"]
            await sh(f"printf 'a\\r\\nb\\n' >> {shlex.quote(str(fifo))}")  # CRLF too
            assert await receive_n(reader, 2) == [b"a", b"b"]


@pytest.mark.asyncio
async def test_partial_record_across_writers_and_non_utf8(fifo: Path) -> None:
    target = shlex.quote(str(fifo))
    with anyio.fail_after(TIMEOUT):
        async with FifoReader(fifo) as reader:
            await sh(f"printf 'par' >> {target}")
            await sh(f"printf 'tial\\n\\377\\376 raw \\200' >> {target}")
            assert await reader.receive() == b"partial"
            await sh(f"printf '\\n' >> {target}")
            assert await reader.receive() == b"\xff\xfe raw \x80"


@pytest.mark.asyncio
async def test_oversize_record_is_reported_and_skipped(fifo: Path) -> None:
    target = shlex.quote(str(fifo))
    with anyio.fail_after(TIMEOUT):
        async with FifoReader(fifo, max_record=16) as reader, anyio.create_task_group() as tg:
            # More than a pipe holds: the writer blocks until the reader skips through it.
            tg.start_soon(
                sh, f"head -c 100000 /dev/zero | tr '\\0' x >> {target}; echo small >> {target}"
            )
            assert await receive_n(reader, 1) == [Oversize(100_000 + len("small"), b"x" * 256)]
            await sh(f"echo >> {target}; echo next >> {target}")
            assert await receive_n(reader, 2) == [b"", b"next"]


@pytest.mark.asyncio
async def test_framing_error_comes_after_the_records_before_it(fifo: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with FifoReader(fifo, framing="netstring") as reader:
            await sh(f"printf '3:abc,2:xyz' >> {shlex.quote(str(fifo))}")
            assert await reader.receive() == b"abc"
            with pytest.raises(MalformedRecordError, match="not ','"):
                await reader.receive()
            with pytest.raises(MalformedRecordError):  # and again: the stream is broken
                await reader.receive()


@pytest.mark.asyncio
async def test_second_receiver_is_busy_and_close_wakes_the_first(fifo: Path) -> None:
    reader = FifoReader(fifo)
    reader.open()
    records: list[bytes | Oversize] = []

    async def iterate() -> None:
        async for record in reader:
            records.append(record)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(iterate)
            await anyio.sleep(0.05)
            with pytest.raises(FifoBusyError):
                await reader.receive()
            await sh(f"echo one >> {shlex.quote(str(fifo))}")
            await wait_until(lambda: records == [b"one"])
            reader.close()  # iteration ends
    with pytest.raises(FifoClosedError):
        await reader.receive()


@pytest.mark.asyncio
async def test_writer_waits_for_a_reader_process(fifo: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with FifoWriter(fifo) as writer, anyio.create_task_group() as tg:
            done = anyio.Event()

            async def write() -> None:
                await writer.write_record(b"hello")
                done.set()

            tg.start_soon(write)
            await anyio.sleep(0.2)
            assert not done.is_set()  # no reader yet: waiting, and the loop is not blocked
            assert not writer.statistics().connected
            output = await sh(f"head -n 1 {shlex.quote(str(fifo))}")
            await done.wait()
            assert output == b"hello\n"
            assert writer.statistics().records_written == 1


@pytest.mark.asyncio
async def test_record_is_rewritten_whole_after_reader_dies_mid_record(fifo: Path) -> None:
    big = bytes(range(256)) * 800  # 200 KiB, more than a pipe holds
    big = big.replace(b"\n", b"N")
    with anyio.fail_after(TIMEOUT):
        async with FifoWriter(fifo) as writer, anyio.create_task_group() as tg:
            tg.start_soon(writer.write_record, big)
            first = await sh(f"head -c 100 {shlex.quote(str(fifo))}")  # reads a bit, exits
            assert first == big[:100]
            await wait_until(lambda: writer.statistics().broken_pipes == 1)
            async with FifoReader(fifo) as reader:
                assert await reader.receive() == big
    assert writer.statistics().records_written == 1


@pytest.mark.asyncio
async def test_finish_record_completes_a_write_cancelled_mid_record(fifo: Path) -> None:
    big = b"z" * 200_000  # more than a pipe holds
    with anyio.fail_after(TIMEOUT):
        async with FifoWriter(fifo) as writer:
            with anyio.move_on_after(0.05):  # no reader: nothing written, nothing torn
                await writer.write_record(big)
            assert writer.unfinished == 0
            assert not await writer.finish_record()
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            async with FifoWriter(fifo) as writer, anyio.create_task_group() as tg:
                scope, cancelled = anyio.CancelScope(), anyio.Event()

                async def write() -> None:
                    with scope:
                        await writer.write_record(big)
                    cancelled.set()

                tg.start_soon(write)
                head = await read_raw(fd, upto=100)
                scope.cancel()
                await cancelled.wait()
                left = writer.unfinished
                assert 0 < left < len(big)
                assert writer.statistics().bytes_written + left == len(big) + 1
                finished: list[bool] = []

                async def finish() -> None:
                    finished.append(await writer.finish_record())

                tg.start_soon(finish)
                assert head + await read_raw(fd) == big + b"\n"
                await wait_until(lambda: bool(finished))
                assert finished == [True]
                assert (writer.unfinished, writer.statistics().records_written) == (0, 1)
                assert not await writer.finish_record()  # nothing left to finish
                await writer.write_record(b"next")
                assert await read_raw(fd) == b"next\n"
        finally:
            os.close(fd)


@pytest.mark.asyncio
async def test_writer_close_wakes_a_waiting_write(fifo: Path) -> None:
    writer = FifoWriter(fifo)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def write() -> None:
                with pytest.raises(FifoClosedError):
                    await writer.write_record(b"never")

            tg.start_soon(write)
            await anyio.sleep(0.05)
            await writer.aclose()


@pytest.mark.asyncio
async def test_writer_sees_its_reader_go_without_writing(fifo: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with FifoWriter(fifo) as writer:
            await writer.wait_reader_gone()  # not connected: at once
            reader = await anyio.open_process(["sh", "-c", f"head -n 1 < {shlex.quote(str(fifo))}"])
            async with reader:
                await writer.wait_reader()
                await writer.write_record(b"first")
                assert reader.stdout is not None
                assert await reader.stdout.receive() == b"first\n"
                await writer.wait_reader_gone()  # head exits after one line
                assert not writer.statistics().connected
                assert writer.statistics().broken_pipes == 0  # noticed without a write
            async with anyio.create_task_group() as tg:  # close wakes a waiter
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    await writer.wait_reader()

                    async def wait_gone() -> None:
                        with pytest.raises(FifoClosedError):
                            await writer.wait_reader_gone()

                    tg.start_soon(wait_gone)
                    await anyio.sleep(0.05)
                    writer.close()
                finally:
                    os.close(fd)


# --- the bus bridges, against a recording sink ----------------------------------------


@dataclass
class RecordingBus:
    """Records sends and publishes; replays scripted messages for consume/subscribe.

    Sends are confirmed at once unless ``confirm_at_once`` is False; then ``pending``
    holds their futures. ``connected`` can be switched off and on (``reconnect()``), and
    every send checks the bridge's promises: connected, and under ``window`` unconfirmed.
    """

    sent: list[tuple[str, Any, dict[str, str] | None]] = field(default_factory=list)
    published: list[tuple[str, Any]] = field(default_factory=list)
    script: list[ScriptedMessage] = field(default_factory=list)
    hold: bool = False  # after the script, consume/subscribe wait (until cancelled)
    confirm_at_once: bool = True
    window: int | None = None
    pending: list[asyncio.Future[None]] = field(default_factory=list)
    connected: bool = True
    consumers: list[str] = field(default_factory=list)  # "start"/"stop" of each consumer
    _connected: anyio.Event = field(default_factory=anyio.Event)

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._connected.wait()

    def disconnect(self) -> None:
        self.connected, self._connected = False, anyio.Event()

    def reconnect(self) -> None:
        self.connected = True
        self._connected.set()

    def send_nowait(
        self, queue: str, body: Any, /, headers: dict[str, str] | None = None
    ) -> asyncio.Future[None]:
        assert self.connected, "the bridge sent while disconnected"
        unconfirmed = sum(not f.done() for f in self.pending)
        assert self.window is None or unconfirmed < self.window, "the window overflowed"
        self.sent.append((queue, body, headers))
        future = asyncio.get_running_loop().create_future()
        if self.confirm_at_once:
            future.set_result(None)
        self.pending.append(future)
        return future

    def confirm(self, n: int) -> None:
        for future in [f for f in self.pending if not f.done()][:n]:
            future.set_result(None)

    async def publish(self, topic: str, body: Any, /) -> None:
        self.published.append((topic, body))

    def consume(self, queue: str, /, *, prefetch: int = 16) -> ScriptedConsumer:
        return ScriptedConsumer(self)

    async def subscribe(self, pattern: str, /) -> AsyncIterator[ScriptedMessage]:
        for message in self.script:
            yield message
        if self.hold:
            await anyio.sleep_forever()


@dataclass
class ScriptedConsumer:
    """``bus.consume(...)``: yields the script's messages not yet taken, then waits."""

    bus: RecordingBus

    async def __aenter__(self) -> AsyncIterator[ScriptedMessage]:
        self.bus.consumers.append("start")
        return self._messages()

    async def __aexit__(self, *exc_info: object) -> None:
        self.bus.consumers.append("stop")

    async def _messages(self) -> AsyncIterator[ScriptedMessage]:
        while self.bus.script:
            yield self.bus.script.pop(0)
        if self.bus.hold:
            await anyio.sleep_forever()


@dataclass
class ScriptedMessage:
    body: Any
    outcome: list[str] = field(default_factory=list)
    lease_lost: bool = False  # ack and reject raise LeaseError, as after a reconnect
    id: str = "m1"

    async def ack(self) -> None:
        self._answer("ack")

    async def reject(self, *, reason: str) -> None:
        self._answer(f"reject:{reason}")

    def _answer(self, outcome: str) -> None:
        if self.lease_lost:
            raise LeaseError("the connection dropped", code="lease-lost")
        self.outcome.append(outcome)


@pytest.mark.asyncio
async def test_fifo_to_queue_dead_letters_oversize(fifo: Path) -> None:
    bus, stats = RecordingBus(), BridgeStatistics()
    target = shlex.quote(str(fifo))
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(fifo_to_bus, bus, fifo, queue="jobs", max_record=300, stats=stats)
            )
            await sh(f"echo one >> {target}; printf '\\377\\n' >> {target}")
            await sh(f"head -c 1000 /dev/zero | tr '\\0' y >> {target}; echo >> {target}")
            await sh(f"echo three >> {target}")
            await wait_until(lambda: len(bus.sent) == 4)
            tg.cancel_scope.cancel()
    dead_time = float(bus.sent[2][2].pop("x-dead-time"))  # type: ignore[union-attr]
    assert abs(dead_time - time.time()) < 60
    assert bus.sent == [
        ("jobs", "one", None),  # UTF-8 records are sent as str
        ("jobs", b"\xff", None),  # anything else passes through as bytes
        (
            "jobs.dlq",
            b"y" * 256,
            {"x-dead-reason": "too-large", "x-original-queue": "jobs", "x-record-length": "1000"},
        ),
        ("jobs", "three", None),
    ]
    assert stats == BridgeStatistics(records=3, oversize=1)


@pytest.mark.asyncio
async def test_fifo_to_topic_counts_oversize_and_unpacks_msgpack(fifo: Path) -> None:
    bus, stats = RecordingBus(), BridgeStatistics()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(
                    fifo_to_bus,
                    bus,
                    fifo,
                    topic="ev",
                    framing="length-prefixed",
                    max_record=8,
                    stats=stats,
                )
            )
            async with FifoWriter(fifo, framing="length-prefixed", max_record=100) as writer:
                await writer.write_record(b"a" * 20)
                await writer.write_record(b"ok")
            await wait_until(lambda: len(bus.published) == 1)
            tg.cancel_scope.cancel()
    assert bus.published == [("ev", "ok")]
    assert stats == BridgeStatistics(records=1, oversize=1)

    bus = RecordingBus()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(fifo_to_bus, bus, fifo, topic="ev", framing="msgpack"))
            async with FifoWriter(fifo, framing="msgpack") as writer:
                await writer.write_record(msgpack.packb({"n": 1, "tags": ["x"]}))
            await wait_until(lambda: len(bus.published) == 1)
            tg.cancel_scope.cancel()
    assert bus.published == [("ev", {"n": 1, "tags": ["x"]})]


@pytest.mark.asyncio
async def test_queue_to_fifo_acks_only_after_the_write(fifo: Path) -> None:
    messages = [
        ScriptedMessage(b"one"),
        ScriptedMessage("two\nlines"),
        ScriptedMessage("thr\u00e9e"),
    ]
    bus = RecordingBus(script=list(messages))
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            result: list[BridgeStatistics] = []

            async def run() -> None:
                result.append(await bus_to_fifo(bus, fifo, queue="out"))

            tg.start_soon(run)
            await anyio.sleep(0.2)
            assert messages[0].outcome == []  # no reader: not written, so not acked
            async with FifoReader(fifo) as reader:
                assert await receive_n(reader, 2) == [b"one", "thr\u00e9e".encode()]
                await wait_until(lambda: bool(result))
    assert [m.outcome for m in messages] == [["ack"], ["reject:unencodable"], ["ack"]]
    assert result == [BridgeStatistics(records=2, unencodable=1)]


@pytest.mark.asyncio
async def test_topic_to_fifo_cancelled_mid_record_finishes_it(fifo: Path) -> None:
    big = "t" * 200_000
    bus, stats = RecordingBus(script=[ScriptedMessage(big)], hold=True), BridgeStatistics()
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                scope, done = anyio.CancelScope(), anyio.Event()

                async def run() -> None:
                    with scope:
                        await bus_to_fifo(bus, fifo, topic="ev", stats=stats)
                    done.set()

                tg.start_soon(run)
                head = await read_raw(fd, upto=100)  # mid-record: the pipe is full
                scope.cancel()
                assert head + await read_raw(fd) == big.encode() + b"\n"
                await done.wait()
    finally:
        os.close(fd)
    assert stats == BridgeStatistics(records=1)


@pytest.mark.asyncio
async def test_fifo_to_queue_keeps_at_most_window_records_unconfirmed(fifo: Path) -> None:
    bus, stats = RecordingBus(confirm_at_once=False, window=4), BridgeStatistics()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(fifo_to_bus, bus, fifo, queue="jobs", window=4, stats=stats))
            await sh(f"seq 1 20 >> {shlex.quote(str(fifo))}")  # one write: the bridge has all
            await wait_until(lambda: len(bus.sent) == 4)
            for n in range(5, 21):  # each confirmation lets exactly one more record go
                bus.confirm(1)
                await wait_until(lambda: len(bus.sent) == n)  # noqa: B023
            assert stats.unconfirmed == 4
            bus.confirm(4)
            tg.cancel_scope.cancel()
    assert [body for _, body, _ in bus.sent] == [str(n) for n in range(1, 21)]
    assert stats == BridgeStatistics(records=20)  # the last 4 were counted on the way out


@pytest.mark.asyncio
async def test_fifo_to_queue_reads_nothing_while_disconnected(fifo: Path) -> None:
    bus, stats = RecordingBus(), BridgeStatistics()
    target = shlex.quote(str(fifo))
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(fifo_to_bus, bus, fifo, queue="jobs", stats=stats))
            await sh(f"echo before >> {target}")
            await wait_until(lambda: len(bus.sent) == 1)
            bus.disconnect()
            # The FIFO stays open: writers succeed, their lines wait (RecordingBus fails the
            # test if the bridge sends while disconnected).
            await sh(f"echo during-1 >> {target}; echo during-2 >> {target}")
            await anyio.sleep(0.2)
            assert len(bus.sent) == 1
            bus.reconnect()
            await wait_until(lambda: len(bus.sent) == 3)
            tg.cancel_scope.cancel()
    assert [body for _, body, _ in bus.sent] == ["before", "during-1", "during-2"]
    assert stats == BridgeStatistics(records=3)


@pytest.mark.asyncio
async def test_fifo_to_queue_stopped_waits_for_confirmations_and_counts_the_rest(
    fifo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus, stats = RecordingBus(confirm_at_once=False), BridgeStatistics()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(fifo_to_bus, bus, fifo, queue="jobs", drain_timeout=0.5, stats=stats)
            )
            await sh(f"printf 'a\\nb\\nc\\n' >> {shlex.quote(str(fifo))}")
            await wait_until(lambda: len(bus.sent) == 3)
            bus.confirm(2)
            tg.cancel_scope.cancel()
    assert stats == BridgeStatistics(records=2)
    assert "1 records read from FIFO" in caplog.text and "may be lost" in caplog.text


@pytest.mark.asyncio
async def test_queue_to_fifo_consumes_only_while_a_reader_has_the_fifo_open(fifo: Path) -> None:
    bus = RecordingBus(script=[ScriptedMessage("one"), ScriptedMessage("two")], hold=True)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(bus_to_fifo, bus, fifo, queue="out"))
            await anyio.sleep(0.2)
            assert bus.consumers == []  # no reader: no consumer, no lease to run out
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                assert await read_raw(fd, upto=8) == b"one\ntwo\n"
                assert bus.consumers == ["start"]
            finally:
                os.close(fd)
            # The reader went away: the consumer stops (its leases go back) at once.
            await wait_until(lambda: bus.consumers == ["start", "stop"])
            bus.script.append(ScriptedMessage("three"))
            await anyio.sleep(0.2)
            assert len(bus.script) == 1  # not taken while nobody reads
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                assert await read_raw(fd) == b"three\n"
                assert bus.consumers == ["start", "stop", "start"]
            finally:
                os.close(fd)
            await wait_until(lambda: len(bus.consumers) == 4)
            tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_queue_to_fifo_logs_a_lost_lease_and_goes_on(
    fifo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [ScriptedMessage("one", lease_lost=True), ScriptedMessage("two")]
    bus = RecordingBus(script=list(messages))
    with anyio.fail_after(TIMEOUT), caplog.at_level(logging.WARNING):
        async with anyio.create_task_group() as tg:
            result: list[BridgeStatistics] = []

            async def run() -> None:
                result.append(await bus_to_fifo(bus, fifo, queue="out"))

            tg.start_soon(run)
            async with FifoReader(fifo) as reader:
                assert await receive_n(reader, 2) == [b"one", b"two"]
                await wait_until(lambda: bool(result))
    assert [m.outcome for m in messages] == [[], ["ack"]]
    assert result == [BridgeStatistics(records=2, leases_lost=1)]
    assert "could not ack message m1 from queue out" in caplog.text
    assert "it will be delivered again" in caplog.text


@pytest.mark.asyncio
async def test_fifo_to_queue_sends_again_what_the_client_gave_back(fifo: Path) -> None:
    # A client whose broker does not deduplicate fails the sends a lost connection left
    # unconfirmed with ConnectionLost; the bridge sends them again once reconnected.
    bus, stats = RecordingBus(confirm_at_once=False), BridgeStatistics()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(fifo_to_bus, bus, fifo, queue="jobs", window=2, stats=stats))
            await sh(f"printf 'a\\nb\\nc\\n' >> {shlex.quote(str(fifo))}")
            await wait_until(lambda: len(bus.sent) == 2)
            bus.disconnect()
            for future in bus.pending:
                future.set_exception(ConnectionLost("the connection dropped"))
            await anyio.sleep(0.1)
            assert len(bus.sent) == 2  # nothing sent again while disconnected
            bus.reconnect()
            await wait_until(lambda: len(bus.sent) == 4)
            bus.confirm(2)
            await wait_until(lambda: len(bus.sent) == 5)
            bus.confirm(1)
            tg.cancel_scope.cancel()
    assert [body for _, body, _ in bus.sent] == ["a", "b", "a", "b", "c"]
    assert stats == BridgeStatistics(records=3, resent=2)
