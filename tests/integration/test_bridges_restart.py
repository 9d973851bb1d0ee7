"""The bridges and the long-running commands across broker restarts (issue 11).

Real broker processes restarted on the same socket and data directory (SIGTERM, and
``kill -9``), real FIFOs written and read by ``sh``, real ``aiobus`` CLI processes
(``sys.executable -m aiobus.cli.main``, so they import the tree under test). Every wait
has a deadline; every process is reaped.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import aiobus

from .conftest import REAP_TIMEOUT, BrokerProcess, queue_stats
from .restarts import Lines, Restarts, restarts, wait_pipe_full

__all__ = ["restarts"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.asyncio

TIMEOUT = 30.0  # per wait; a slow CI box, not the code, sets this


class Cli:
    """An ``aiobus`` command in a child process, its stdout and stderr read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = Lines(proc.stdout)
        self.err = Lines(proc.stderr)

    async def stop(self) -> int:
        """SIGTERM, then the exit status (the rest of stderr is kept)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            rest = await self.proc.stderr.read()
            self.err.lines += rest.decode(errors="replace").splitlines()
            return await self.proc.wait()


@asynccontextmanager
async def cli(path: str, *args: str, stdout: Any = asyncio.subprocess.PIPE
              ) -> AsyncIterator[Cli]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiobus.cli.main", "--socket", path, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Cli(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)


async def stats_of(path: str, queue: str) -> dict[str, Any]:
    """A queue's statistics through a connection of its own (brokers come and go)."""
    async with aiobus.connect(path, reconnect=False) as bus:
        return await queue_stats(bus, queue)


async def wait_stats(path: str, queue: str, ok: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while not ok(stats := await stats_of(path, queue)):
            await asyncio.sleep(0.05)
    return stats


async def wait_fifo(path: Path) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not (path.exists() and stat.S_ISFIFO(path.stat().st_mode)):
            await asyncio.sleep(0.02)


async def expect_restart_reported(err: Lines, path: str) -> None:
    await err.expect(f"aiobus: connection to {path} lost (", TIMEOUT)
    await err.expect(f"aiobus: reconnected to {path}", TIMEOUT)


# -- fifo-in: a shell writer, 10,000 lines, a SIGTERM and a kill -9 ----------------------

LINES = 10_000
# A shell writer: numbered lines, each its own `>>` (open, write, close), each failure
# reported; a pause every 50 lines spreads the 10,000 over a few seconds, so the broker
# restarts in the middle of the writing.
WRITER = r"""
n=0
while [ $n -lt $LINES ]; do
  n=$((n + 1))
  printf '%05d %s\n' $n "$PAD" >> "$FIFO" || echo "failed $n" >&2
  [ $((n % 50)) -eq 0 ] && sleep 0.01
done
exit 0
"""


@pytest.mark.timeout(180)
async def test_fifo_in_queues_every_line_once_across_broker_restarts(
    restarts: Restarts, short_tmp: Path
) -> None:
    path, fifo = restarts.path, short_tmp / "in.fifo"
    async with aiobus.connect(path, reconnect=False) as bus:
        await bus.declare_queue("lines", durable=True)
        # The client resends what a lost connection left unconfirmed under the same id,
        # and the broker keeps a window of ids it accepted: so a resend is no duplicate.
        assert bus.server_info.get("dedup"), bus.server_info
    # 106-byte lines: 600 fill the pipe, so while the broker is away the writer blocks.
    env = {**os.environ, "FIFO": str(fifo), "PAD": "x" * 100, "LINES": str(LINES)}
    async with cli(path, "fifo-in", str(fifo), "--queue", "lines") as bridge:
        await wait_fifo(fifo)
        writer = await asyncio.create_subprocess_exec(
            "sh", "-c", WRITER, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            for queued, kill in ((2_000, False), (5_000, True)):
                await wait_stats(path, "lines", lambda s: s["ready"] >= queued)  # noqa: B023
                restarts.stop(kill=kill)  # SIGTERM, then kill -9, while the writer writes
                await wait_pipe_full(fifo, TIMEOUT)  # the bridge stopped reading
                assert writer.returncode is None, "the writer got ahead of the test"
                restarts.start()
                await expect_restart_reported(bridge.err, path)
            _, errors = await asyncio.wait_for(writer.communicate(), 60)
            assert writer.returncode == 0
        finally:
            if writer.returncode is None:
                writer.kill()
                await asyncio.wait_for(writer.wait(), REAP_TIMEOUT)
        await wait_stats(path, "lines", lambda s: s["ready"] >= LINES, timeout=60)
        assert await bridge.stop() == 0, bridge.err.text()
    total = (await stats_of(path, "lines"))["ready"]  # fixed now: nothing else sends

    failed = {int(n) for n in re.findall(rb"failed (\d+)", errors)}
    assert failed == set(), "the FIFO stayed open: writers never see an error"
    seen: Counter[int] = Counter()
    async with aiobus.connect(path, reconnect=False) as bus:
        async with bus.consume("lines", prefetch=1000) as consumer:
            for _ in range(total):
                msg = await asyncio.wait_for(anext(consumer), TIMEOUT)
                number, pad = msg.body.split(" ")
                assert pad == "x" * 100
                seen[int(number)] += 1
                msg.ack_nowait()
        await bus.ping()
    missing = sorted(set(range(1, LINES + 1)) - set(seen))
    assert not missing, f"{len(missing)} lines lost, e.g. {missing[:5]}"
    duplicates = {n: c for n, c in seen.items() if c > 1}
    assert not duplicates, f"{len(duplicates)} lines queued twice, e.g. {list(duplicates)[:5]}"
    assert set(seen) == set(range(1, LINES + 1)) and total == LINES


# -- fifo-out: a reader that comes late -----------------------------------------------


async def fifo_out_with_a_late_reader(broker: BrokerProcess, short_tmp: Path,
                                      ack_timeout: float | None, late: float) -> None:
    """Messages wait in the queue, fifo-out starts, a reader opens the FIFO ``late``
    seconds later (longer than the ack timeout): each message comes out exactly once."""
    path, fifo, count = broker.path, short_tmp / "out.fifo", 20
    async with aiobus.connect(path) as bus:
        if ack_timeout is not None:
            await bus.declare_queue("outq", ack_timeout=ack_timeout)
        for i in range(count):
            await bus.send("outq", f"record {i}")
    async with cli(path, "fifo-out", str(fifo), "--queue", "outq") as bridge:
        await wait_fifo(fifo)
        await asyncio.sleep(late)  # the user takes their time before `cat out.fifo`
        stats = await stats_of(path, "outq")
        assert (stats["consumers"], stats["delivered"], stats["ready"]) == (0, 0, count)
        reader = await asyncio.create_subprocess_exec(
            "cat", str(fifo), stdout=asyncio.subprocess.PIPE)
        try:
            out = Lines(reader.stdout)
            for i in range(count):
                assert await out.expect("record", TIMEOUT) == f"record {i}"
            await wait_stats(path, "outq", lambda s: s["acked"] == count)
            async with aiobus.connect(path) as bus:  # more, while the reader is there
                await bus.send("outq", "record late")
            assert await out.expect("record", TIMEOUT) == "record late"
        finally:
            reader.kill()
            await asyncio.wait_for(reader.wait(), REAP_TIMEOUT)
        # The reader went away: the consumer stops.
        stats = await wait_stats(path, "outq", lambda s: s["consumers"] == 0)
        assert (stats["delivered"], stats["acked"], stats["ready"]) == (count + 1,) * 2 + (0,)
        assert (stats["dead_lettered"], stats["expired"]) == (0, 0)
        assert bridge.proc.returncode is None
        assert await bridge.stop() == 0
        assert bridge.err.lines == []  # no lease ever expired


async def test_fifo_out_takes_nothing_before_a_late_reader(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    await fifo_out_with_a_late_reader(broker, short_tmp, ack_timeout=1, late=4)


@pytest.mark.soak
@pytest.mark.timeout(180)
async def test_fifo_out_reader_60_s_late_nothing_twice_nothing_lost(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    # The report: `cat out.fifo` 36 s after fifo-out started (ack_timeout 30).
    await fifo_out_with_a_late_reader(broker, short_tmp, ack_timeout=None, late=60)


# -- listen, consume, stat --watch, fifo-out across a restart -------------------------


async def test_stat_watch_shows_an_outage_that_comes_while_it_asks(
    restarts: Restarts, short_tmp: Path
) -> None:
    """The broker dies with a STATS of `stat --watch` unanswered (frozen by SIGSTOP,
    then SIGKILL): STATS is resent after a reconnect, so the ask waits across the
    outage, and the banner must not wait for it (it once did: a CI run waited 30 s)."""
    watch_out = short_tmp / "watch.out"
    with open(watch_out, "wb") as watch_file:
        async with cli(restarts.path, "stat", "--watch", "0.2", stdout=watch_file) as watch:
            async with asyncio.timeout(TIMEOUT):  # a table drawn: the client is connected
                while b"Ctrl-C" not in watch_out.read_bytes():
                    await asyncio.sleep(0.05)
            broker = restarts.current.proc
            broker.send_signal(signal.SIGSTOP)  # the next STATS goes unanswered
            drawn = watch_out.read_bytes().count(b"Ctrl-C")
            await asyncio.sleep(0.6)  # three redraw intervals: a STATS is asked meanwhile
            assert watch_out.read_bytes().count(b"Ctrl-C") <= drawn + 1
            restarts.stop(kill=True)
            async with asyncio.timeout(TIMEOUT / 3):
                while b"unreachable since" not in watch_out.read_bytes():
                    await asyncio.sleep(0.05)
            restarts.start()
            await expect_restart_reported(watch.err, restarts.path)
            assert await watch.stop() == 0, watch.err.text()


@pytest.mark.timeout(120)
async def test_long_running_commands_keep_running_across_a_restart(
    restarts: Restarts, short_tmp: Path
) -> None:
    path, watch_out, fifo = restarts.path, short_tmp / "watch.out", short_tmp / "out.fifo"
    with open(watch_out, "wb") as watch_file:
        async with (
            cli(path, "listen", "news") as listen,
            cli(path, "consume", "jobs", "--create") as consume,
            cli(path, "stat", "--watch", "0.2", stdout=watch_file) as watch,
            cli(path, "fifo-out", str(fifo), "--queue", "piped") as bridge,
        ):
            reader = await asyncio.create_subprocess_exec(
                "sh", "-c", f"while :; do cat {fifo}; done", stdout=asyncio.subprocess.PIPE,
                start_new_session=True)  # its own process group, to end the loop and cat
            try:
                piped = Lines(reader.stdout)
                for round in ("before", "after"):
                    async with aiobus.connect(path, reconnect=False) as bus:
                        await wait_until_registered(bus)
                        await bus.publish("news", round)
                        await bus.send("jobs", f"job {round}")
                        await bus.send("piped", f"piped {round}")
                    assert await listen.out.expect("news", TIMEOUT) == f"news {round}"
                    assert await consume.out.expect("job", TIMEOUT) == f"job {round}"
                    assert await piped.expect("piped", TIMEOUT) == f"piped {round}"
                    if round == "before":
                        # stat --watch is up too (it has drawn a table): a process still
                        # starting when the broker stops would wait for a broker to
                        # connect to, and draw no outage (a loaded machine took long
                        # enough for that: 3-5 runs in 48).
                        await wait_file(watch_out, b"QUEUE")
                        restarts.stop()
                        await wait_file(watch_out, b"unreachable since")
                        restarts.start()
                        for command in (listen, consume, watch, bridge):
                            await expect_restart_reported(command.err, path)
                        outage_at = watch_out.read_bytes().index(b"unreachable since")
                # stat --watch draws plain tables again after the outage (each redraw
                # starts with its header; into a file, no screen-clearing codes).
                async with asyncio.timeout(TIMEOUT):
                    while not any(b"QUEUE" in frame and b"unreachable" not in frame for frame
                                  in watch_out.read_bytes()[outage_at:].split(b"Ctrl-C")):
                        await asyncio.sleep(0.05)
            finally:
                os.killpg(reader.pid, signal.SIGKILL)
                await asyncio.wait_for(reader.wait(), REAP_TIMEOUT)
            for command in (listen, consume, watch, bridge):
                assert await command.stop() == 0, command.err.text()
                assert "Traceback" not in command.err.text()


async def wait_until_registered(bus: aiobus.Bus) -> None:
    """The listener, the consumer and fifo-out are (again) registered with the broker."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            stats = await bus.stats()
            subscribed = any(s["pattern"] == "news" for s in stats["topics"]["subscriptions"])
            queues = stats["queues"]
            if subscribed and all(queues.get(q, {}).get("consumers") == 1
                                  for q in ("jobs", "piped")):
                return
            await asyncio.sleep(0.05)


async def wait_file(path: Path, needle: bytes) -> None:
    async with asyncio.timeout(TIMEOUT):
        while needle not in path.read_bytes():
            await asyncio.sleep(0.05)

