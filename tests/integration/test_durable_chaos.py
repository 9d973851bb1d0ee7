"""Durable queues under repeated kill -9 of the real broker process (issue 10).

Each cycle a producer process sends numbered messages to a durable queue with confirmed
sends (a window of ``send_nowait`` futures) and a consumer process acks them, nacking
about one in ten with a 0.2 s delay on its first attempt. Once messages flow, after a
random 0.2-0.6 s, the broker gets SIGKILL; the clients die with ConnectionLost, and the
broker is restarted on the same socket and data directory. After the last kill the test
restarts it once more and drains the queue itself.

Every child prints what it knows for certain, flushed line by line:

    s N          the producer is about to send N       c N   N's send was confirmed
    d N A ack    N delivered at attempt A, to be acked  a N   N's ack was confirmed
    d N A nack   ... to be nacked (delay 0.2 s)         n N   N's nack was confirmed
    up T, first T    the consumer starts to connect, gets its first message (monotonic)

and the checker sorts every number: *lost* (confirmed, never acked nor drained) must be
empty for ``--fsync always`` and ``batch``, since a process crash loses nothing that was
written; *unconfirmed* (sent, not confirmed, seen anyway) and *duplicated* (acked or
drained twice) are allowed by at-least-once and only counted. The one ack a consumer
has in flight when the broker dies is *in doubt*: journaled before the kill, the message
is gone for good and nobody was told (the mirror image of an unconfirmed send), else it
comes back; so it is not counted as lost. Nothing that was never sent may appear.
``always`` gets 30 kills and ``batch`` 15 (to keep ``make test`` short); the first takes
35-50 s on a busy 2-core machine, most of it the broker's restarts (interpreter start plus
journal replay). A cycle kills the broker only once both clients are working: a producer
still polling for the broker at the kill would not be a hang.

The kill schedule and the consumers' nacks come from one seed, printed with the summary;
set ``AIOBUS_CHAOS_SEED`` to replay a schedule (the timing still varies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import aiobus

from .conftest import REAP_TIMEOUT, BrokerProcess, queue_stats

pytestmark = pytest.mark.asyncio

QUEUE = "jobs"
CYCLES = {"always": 30, "batch": 15}  # kills per fsync policy
WINDOWS = (32, 256)  # the producer's confirmed sends in flight, cycle by cycle
STRIDE = 100_000  # cycle k's producer numbers its messages k*STRIDE, k*STRIDE+1, ...
STEP_TIMEOUT = 10.0  # for any one thing to happen: a child to start, a first delivery
EXIT_TIMEOUT = 5.0  # for a client to notice the dead broker and exit
BACKLOG = 2000  # the queue's max_length
_RECOVERED = re.compile(r"recovered .* ([0-9]+) bytes in ([0-9.]+) s")  # the broker's log

_PRELUDE = """\
import asyncio, collections, functools, itertools, random, sys, time
import aiobus

LIFETIME = 60.0  # a client the test forgot still ends

def out(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

async def connect(path, name):
    # The broker is (re)starting: poll, with a deadline, until it accepts.
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return await aiobus.connect(path, name=name, reconnect=False)
        except aiobus.BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)
"""

PRODUCER = _PRELUDE + """
def confirmed(n, fut):
    if not fut.cancelled() and fut.exception() is None:
        out(f"c {n}")

async def main(path, first, size):
    bus = await connect(path, "producer")
    window = collections.deque()
    try:
        async with asyncio.timeout(LIFETIME):
            for n in itertools.count(first):
                out(f"s {n}")
                fut = bus.send_nowait("jobs", n)
                fut.add_done_callback(functools.partial(confirmed, n))
                window.append(fut)
                if len(window) >= size:
                    await window.popleft()
    except aiobus.ConnectionLost:  # the broker was killed
        out("lost")
    finally:
        await bus.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

CONSUMER = _PRELUDE + """
async def main(path, seed):
    rng = random.Random(seed)
    out(f"up {time.monotonic()!r}")
    bus = await connect(path, "consumer")
    first = True
    try:
        async with asyncio.timeout(LIFETIME):
            async with bus.consume("jobs", prefetch=20) as consumer:
                async for msg in consumer:
                    if first:
                        out(f"first {time.monotonic()!r}")
                        first = False
                    if msg.attempt == 1 and rng.random() < 0.1:
                        out(f"d {msg.body} {msg.attempt} nack")
                        await msg.nack(delay=0.2)
                        out(f"n {msg.body}")
                    else:
                        out(f"d {msg.body} {msg.attempt} ack")
                        await msg.ack()
                        out(f"a {msg.body}")
    except aiobus.ConnectionLost:  # the broker was killed
        out("lost")
    finally:
        await bus.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@dataclass
class Child:
    """A client process; a reader task collects its stdout lines as they come."""

    name: str
    proc: asyncio.subprocess.Process
    err_path: Path
    lines: list[str] = field(default_factory=list)
    delivering: asyncio.Event = field(default_factory=asyncio.Event)
    confirming: asyncio.Event = field(default_factory=asyncio.Event)  # a send confirmed
    up_at: float | None = None  # when it began to connect (time.monotonic, system-wide)
    first_delivery: float | None = None

    async def collect(self) -> None:
        """Until EOF, which comes when the process exits."""
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("up "):
                self.up_at = float(line.split()[1])
            elif line.startswith("first "):
                self.first_delivery = float(line.split()[1])
                self.delivering.set()
            else:
                if line.startswith("c "):
                    self.confirming.set()
                self.lines.append(line)

    async def reap(self) -> bool:
        """Wait for it to exit; kill it if it does not. True if it exited by itself."""
        try:
            await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
            return True
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), REAP_TIMEOUT)
            return False

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@dataclass
class Tally:
    """What the children reported, over all cycles."""

    sent: set[int] = field(default_factory=set)
    confirmed: set[int] = field(default_factory=set)
    acked: collections.Counter[int] = field(default_factory=collections.Counter)
    nacked: collections.Counter[int] = field(default_factory=collections.Counter)
    # Acks sent but unanswered when the broker died: applied or not, nobody can tell.
    # Not applied, the message comes back; applied, it is gone, as it should be.
    ack_in_doubt: set[int] = field(default_factory=set)
    retried: int = 0  # deliveries at attempt > 1: after a nack or a crash

    def add(self, lines: list[str]) -> None:
        """One client's lines. A consumer awaits each ack before the next message, so
        at most one of its acks is in doubt."""
        acking = None
        for line in lines:
            kind, *rest = line.split()
            if kind == "lost":
                continue
            n = int(rest[0])
            if kind == "s":
                self.sent.add(n)
            elif kind == "c":
                self.confirmed.add(n)
            elif kind == "a":
                self.acked[n] += 1
                acking = None
            elif kind == "n":
                self.nacked[n] += 1
            elif kind == "d":
                self.retried += int(rest[1]) > 1
                acking = n if rest[2] == "ack" else None
            else:
                raise AssertionError(f"unexpected line from a client: {line!r}")
        if acking is not None:
            self.ack_in_doubt.add(acking)


async def spawn(code: str, name: str, path: str, numbers: list[int], short_tmp: Path) -> Child:
    err_path = short_tmp / f"{name}.err"
    with open(err_path, "wb") as err:  # the child holds its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, path, *map(str, numbers),
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    return Child(name, proc, err_path)


def start_broker(broker_factory: Any, fsync: str, short_tmp: Path) -> BrokerProcess:
    """(Re)start the broker on the same socket and data directory."""
    try:
        proc: BrokerProcess = broker_factory("--fsync", fsync)
    except (RuntimeError, TimeoutError) as exc:
        log = (short_tmp / "b.log").read_text(errors="replace")
        raise AssertionError(f"the broker did not restart: {exc}; its log:\n{log}") from exc
    return proc


@pytest.mark.timeout(180)  # ~45 s; slack for a loaded machine
@pytest.mark.parametrize("fsync", ["always", "batch"])
async def test_nothing_confirmed_is_lost_across_kill_9(broker_factory: Any, short_tmp: Path,
                                                       fsync: str) -> None:
    seed = int(os.environ.get("AIOBUS_CHAOS_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"\nfsync={fsync} seed={seed} (AIOBUS_CHAOS_SEED={seed} replays the schedule)")
    tally = Tally()
    children: list[Child] = []
    hung: list[str] = []  # clients that did not exit after the broker died
    restart_to_delivery: list[float] = []
    logs: list[str] = []  # each broker run's log, for a failure message
    broker = start_broker(broker_factory, fsync, short_tmp)
    started = time.monotonic()
    async with aiobus.connect(broker.path) as bus:
        # No max_deliveries: every kill counts a failed attempt for what was in flight,
        # and a message must never leave for the dead-letter queue here. A producer
        # outruns a consumer that awaits each ack: max_length makes it wait (its sends
        # park until there is room), so the backlog, the replay and the drain stay small.
        await bus.declare_queue(QUEUE, durable=True, max_deliveries=None,
                                max_length=BACKLOG, overflow="block")
    try:
        for cycle in range(CYCLES[fsync]):
            # The clients start with the broker (they poll until it accepts): their
            # interpreters load while it replays its journal.
            # A window of 32 confirmed sends, or (every other cycle) of 256: then the
            # broker reads more than 64 SENDs at once and, with "always", confirms them
            # in parts, each after its own sync (connection.py _feed_in_parts).
            producer = await spawn(PRODUCER, f"p{cycle}", broker.path,
                                   [cycle * STRIDE, WINDOWS[cycle % 2]], short_tmp)
            consumer = await spawn(CONSUMER, f"c{cycle}", broker.path, [seed + cycle],
                                   short_tmp)
            children += [producer, consumer]
            async with asyncio.TaskGroup() as tg:
                for child in (producer, consumer):
                    tg.create_task(child.collect())
                restarted = listening = None
                if broker.proc.poll() is not None:  # every cycle but the first
                    restarted = time.monotonic()
                    broker = await asyncio.to_thread(start_broker, broker_factory, fsync,
                                                     short_tmp)
                    listening = time.monotonic()
                # Both clients connected and working (a slow producer must not still be
                # polling a dead broker when the kill comes: that is not a hang).
                async with asyncio.timeout(STEP_TIMEOUT):
                    await consumer.delivering.wait()
                    await producer.confirming.wait()
                assert consumer.up_at is not None and consumer.first_delivery is not None
                if listening is not None and consumer.up_at < listening:
                    # Only when the consumer was waiting for the broker, not the other
                    # way round, does this measure the broker's restart.
                    restart_to_delivery.append(consumer.first_delivery - restarted)
                await asyncio.sleep(rng.uniform(0.2, 0.6))  # the workload runs
                os.kill(broker.pid, signal.SIGKILL)
                broker.proc.wait(REAP_TIMEOUT)
                logs.append(broker.log())
                for child in (producer, consumer):
                    if not await child.reap():
                        hung.append(child.name)
            for child in (producer, consumer):
                tally.add(child.lines)
        restarted = time.monotonic()
        broker = await asyncio.to_thread(start_broker, broker_factory, fsync, short_tmp)
        drained, first_drained, final = await drain(broker)
        if first_drained is not None:
            restart_to_delivery.append(first_drained - restarted)
        logs.append(broker.log())
    finally:
        for child in children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.proc.wait(), REAP_TIMEOUT)
    elapsed = time.monotonic() - started

    seen = tally.acked + collections.Counter(drained)
    lost = tally.confirmed - set(seen) - tally.ack_in_doubt
    acked_unanswered = tally.ack_in_doubt - set(seen)  # applied before the crash
    unexpected = set(seen) - tally.sent
    unconfirmed = set(seen) - tally.confirmed
    duplicated = {n: count for n, count in seen.items() if count > 1}
    summary = (
        f"fsync={fsync} seed={seed} cycles={CYCLES[fsync]} sent={len(tally.sent)}"
        f" confirmed={len(tally.confirmed)} acked={tally.acked.total()}"
        f" nacked={tally.nacked.total()} drained={len(drained)}"
        f" retried_deliveries={tally.retried} lost={len(lost)}"
        f" duplicated={len(duplicated)} unconfirmed={len(unconfirmed)}"
        f" ack_in_doubt={len(tally.ack_in_doubt)} (applied {len(acked_unanswered)})"
        f" unexpected={len(unexpected)} hung_clients={len(hung)}"
        f" restart_to_first_delivery_median="
        f"{statistics.median(restart_to_delivery) * 1000:.0f}ms"
        f" (min {min(restart_to_delivery) * 1000:.0f}, max"
        f" {max(restart_to_delivery) * 1000:.0f}, n={len(restart_to_delivery)})"
        f" elapsed={elapsed:.1f}s"
    )
    replays = [tuple(map(float, m.groups())) for m in map(_RECOVERED.search, logs) if m]
    if replays:
        size, seconds = max(replays)
        summary += f" largest_replay={size / 1e6:.1f}MB_in_{seconds:.2f}s"
    print(summary)
    failure = f"{summary}\nlast broker log:\n{logs[-1] if logs else ''}"
    assert not lost, (f"confirmed but never seen: {sorted(lost)[:50]}\n"
                      f"{history(children, sorted(lost)[:10])}\n{failure}")
    assert not unexpected, f"seen but never sent: {sorted(unexpected)[:50]}\n{failure}"
    assert not hung, f"clients that outlived the broker: {hung}\n{failure}"
    errors = {child.name: child.stderr()[-800:] for child in children if child.stderr()}
    assert not errors, f"client stderr ({len(errors)}): {list(errors.items())[:2]}\n{failure}"
    assert {child.proc.returncode for child in children} == {0}, failure
    assert final["dead_lettered"] == 0 and final["ready"] == 0, (final, failure)
    # The run exercised what it claims to: confirmed sends, acks and nacks in most
    # cycles, and crashes that left messages in flight to be retried.
    assert len(tally.confirmed) >= CYCLES[fsync] * 10, failure
    assert tally.acked and tally.nacked and tally.retried, failure


def history(children: list[Child], numbers: list[int]) -> str:
    """What the clients said about each of ``numbers``, in order."""
    wanted = {str(n) for n in numbers}
    said: dict[str, list[str]] = {n: [] for n in wanted}
    for child in children:
        for line in child.lines:
            parts = line.split()
            if len(parts) > 1 and parts[1] in wanted:
                said[parts[1]].append(f"{child.name}:{line}")
    return "\n".join(f"{n}: {' '.join(said[str(n)])}" for n in numbers)


async def drain(broker: BrokerProcess) -> tuple[list[int], float | None, dict[str, Any]]:
    """Consume every message left, until the queue has none ready, delayed or unacked
    (nacked ones come back after their 0.2 s). Returns the bodies, when the first came,
    and the queue's final statistics."""
    bodies: list[int] = []
    first: float | None = None
    async with aiobus.connect(broker.path, name="drain") as bus, asyncio.timeout(30):
        async with bus.consume(QUEUE, prefetch=200) as consumer:
            while True:
                try:
                    msg = await asyncio.wait_for(anext(consumer), 0.3)
                except TimeoutError:
                    stats = await queue_stats(bus, QUEUE)
                    if stats["ready"] == stats["delayed"] == stats["unacked"] == 0:
                        return bodies, first, stats
                    continue
                if first is None:
                    first = time.monotonic()
                bodies.append(msg.body)
                await msg.ack()
