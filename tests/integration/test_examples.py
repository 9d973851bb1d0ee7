"""The examples in ``examples/``, each run as a child process against a real broker.

A test reads what an example prints, line by line, and waits for a line rather than for
time to pass; every wait has a deadline and every process is reaped in the fixture's
teardown. Signals are real (``os.kill``), the FIFO is written by real ``sh`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

import aiobus

from .conftest import REAP_TIMEOUT, BrokerProcess
from .restarts import Restarts, restarts

__all__ = ["restarts"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.asyncio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
TIMEOUT = 10.0


class Example:
    """An example script in a child process; stdout and stderr are read as one stream."""

    def __init__(self, script: str, proc: asyncio.subprocess.Process) -> None:
        self.script = script
        self.proc = proc
        self.lines: list[str] = []  # everything printed so far

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    async def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Read lines until one matches the regex ``pattern``; return its match."""
        assert self.proc.stdout is not None
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        code = await self.proc.wait()
                        raise AssertionError(f"{self.script} exited with {code} before printing"
                                             f" {pattern!r}; it printed:\n{self.output()}")
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    if match := regex.search(self.lines[-1]):
                        return match
        except TimeoutError:
            raise AssertionError(f"{self.script} did not print {pattern!r} within {timeout} s;"
                                 f" it printed:\n{self.output()}") from None

    async def finish(self, timeout: float = TIMEOUT) -> int:
        """Read the rest of the output and wait for the exit; return the exit code."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                rest = await self.proc.stdout.read()
                self.lines.extend(rest.decode(errors="replace").splitlines())
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"{self.script} still running after {timeout} s;"
                                 f" it printed:\n{self.output()}") from None

    async def succeeds(self, timeout: float = TIMEOUT) -> list[str]:
        code = await self.finish(timeout)
        assert code == 0, f"{self.script} exited with {code}:\n{self.output()}"
        return self.lines

    async def type_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()


Run = Callable[..., Awaitable[Example]]


@pytest_asyncio.fixture
async def run(broker: BrokerProcess) -> AsyncIterator[Run]:
    """Start an example: ``await run("chat.py", "--nick", "alice", stdin=True)``."""
    started: list[Example] = []

    async def start(script: str, *args: str, stdin: bool = False) -> Example:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / script), "--socket", broker.path, *args,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        example = Example(script, proc)
        started.append(example)
        return example

    try:
        yield start
    finally:
        for example in started:
            if example.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    example.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(example.proc.wait(), REAP_TIMEOUT)


async def sh(command: str) -> None:
    proc = await asyncio.create_subprocess_exec("sh", "-c", command)
    try:
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0, command
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)


# -- the examples and their README -------------------------------------------------------


async def test_every_example_is_listed_in_the_readme_and_type_checks() -> None:
    assert len(SCRIPTS) == 7, SCRIPTS
    readme = (EXAMPLES / "README.md").read_text()
    for script in SCRIPTS:
        assert f"[{script}]({script})" in readme, f"{script} is missing from the README"
    if shutil.which("mypy", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("mypy is not installed")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(EXAMPLES),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)
    assert proc.returncode == 0, out.decode()


# -- 1. job pool -------------------------------------------------------------------------


async def test_job_pool_retries_with_backoff_and_dead_letters(
    run: Run, short_tmp: Path
) -> None:
    fifo = short_tmp / "jobs.fifo"
    pool = await run("job_pool.py", "--fifo", str(fifo), "--backoff", "0.1", "--jobs", "5")
    await pool.expect(r"retries after \[0.1, 0.2, 0.4\] s; feed me")
    for job in ("https://example.org/report", "https://flaky.example/page",
                "https://down.example/", "not-a-url", "https://example.org/b"):
        await sh(f"echo {shlex.quote(job)} >> {shlex.quote(str(fifo))}")  # a new writer each
    out = "\n".join(await pool.succeeds())

    assert re.search(r"example.org/report done on attempt 1", out), out
    assert re.search(r"example.org/b done on attempt 1", out), out
    # Transient failures are retried after growing delays; flaky recovers on attempt 3.
    assert re.search(r"flaky.example/page attempt 1 failed .*retry in 0.1 s", out), out
    assert re.search(r"flaky.example/page attempt 2 failed .*retry in 0.2 s", out), out
    assert re.search(r"flaky.example/page done on attempt 3", out), out
    assert re.search(r"down.example/ attempt 3 failed .*retry in 0.4 s", out), out
    assert re.search(r"down.example/ attempt 4 failed .*giving up", out), out
    down = re.search(r"dead letter: 'https://down.example/' reason=max-deliveries attempts=4"
                     r" \(connection refused\) ([\d.]+) s after", out)
    assert down is not None, out
    assert float(down[1]) >= 0.6, "the three retry delays (0.1 + 0.2 + 0.4 s) were not applied"
    # Invalid input goes to the dead-letter queue at once, with the worker's reason.
    assert re.search(r"dead letter: 'not-a-url' reason=rejected attempts=1"
                     r" \(not an http\(s\) URL", out), out
    assert out.count("not-a-url' is invalid") == 1, out
    assert out.splitlines()[-1] == "3 done, 2 dead-lettered", out


# -- 2. calculator -----------------------------------------------------------------------


async def test_calculator_service_and_clients_as_processes(run: Run) -> None:
    service = await run("calculator.py", "service")
    await service.expect(r"calculator service ready on queue calc.requests")

    assert "add(2, 3) = 5" in await (await run("calculator.py", "client", "add", "2", "3")
                                     ).succeeds()
    client = await run("calculator.py", "client", "divide", "1", "0")
    assert await client.finish() == 1
    assert client.lines == ["divide(1, 0) raised DivisionByZero: cannot divide 1 by zero"]

    tour = await (await run("calculator.py", "client")).succeeds()
    assert tour[:2] == ["add(2, 3) = 5", "multiply(4, 2.5) = 10.0"]
    assert tour[2].startswith("divide(1, 0) raised DivisionByZero: ")
    assert tour[3].startswith("power(2, 8) raised UnknownOperation: unknown operation 'power'")
    assert tour[4].startswith("add('two', 3) raised BadArguments: add takes two numbers")

    service.proc.send_signal(signal.SIGTERM)
    lines = await service.succeeds()
    assert lines[-2:] == ["SIGTERM: stopping", "calculator service stopped"]
    assert sum("-> {'error'" in line for line in lines) == 4  # 1 + 3 errors, all answered


async def test_calculator_demo(run: Run) -> None:
    lines = await (await run("calculator.py", "demo")).succeeds()
    answers = [line for line in lines if not line.startswith(("service", "calculator"))]
    assert [a.split(" raised ")[-1].split(":")[0] for a in answers] == [
        "add(2, 3) = 5", "multiply(4, 2.5) = 10.0", "DivisionByZero", "UnknownOperation",
        "BadArguments",
    ]


# -- 3. weather --------------------------------------------------------------------------


def readings(lines: list[str], pattern: str) -> list[tuple[str, str]]:
    """(city, metric) of each reading a listener printed for ``pattern``."""
    prefix = f"[{pattern}] "
    return [tuple(line[len(prefix):].split()[:2])  # type: ignore[misc]
            for line in lines if line.startswith(prefix) and "done after" not in line]


async def test_weather_demo_wildcards(run: Run) -> None:
    lines = await (await run("weather.py", "demo", "--count", "2")).succeeds()
    assert sorted(readings(lines, "weather.*.temp")) == sorted(
        [(city, "temp") for city in ("hk", "london", "paris")] * 2)
    assert sorted(readings(lines, "weather.hk.>")) == sorted(
        [("hk", metric) for metric in ("temp", "humidity", "wind")] * 2)
    assert "[weather.*.temp] done after 6 readings" in lines
    assert "[weather.hk.>] done after 6 readings" in lines


async def test_weather_stations_and_listeners_as_processes(run: Run) -> None:
    hk_all = await run("weather.py", "listen", "weather.hk.>", "--count", "3")
    temps = await run("weather.py", "listen", "weather.*.temp", "--count", "2")
    await hk_all.expect(r"^listening to weather.hk.>$")
    await temps.expect(r"^listening to weather.\*.temp$")
    for city in ("paris", "hk"):
        station = await run("weather.py", "station", city, "--count", "1", "--interval", "0")
        assert f"station {city}: published 3 readings" in await station.succeeds()
    hk_lines = await hk_all.succeeds()
    assert sorted(readings(hk_lines, "weather.hk.>")) == [
        ("hk", "humidity"), ("hk", "temp"), ("hk", "wind")]
    temp_lines = await temps.succeeds()
    assert sorted(readings(temp_lines, "weather.*.temp")) == [("hk", "temp"), ("paris", "temp")]


# -- 4. pipeline -------------------------------------------------------------------------


async def test_pipeline_all_stages_in_one_process(run: Run) -> None:
    lines = await (await run("pipeline.py", "all", "--count", "50")).succeeds()
    assert "sink: end of stream after 5 numbers: [10, 20, 30, 40, 50]" in lines
    assert "filter by 2: passed 25 numbers from pipeline.numbers to pipeline.by2," \
           " then end of stream" in lines
    assert any(line.startswith("filter by 5: passed 5 numbers") for line in lines)


async def test_pipeline_stages_as_processes_in_any_order(run: Run) -> None:
    # The source runs first and exits: the queues hold the stream until the stages come.
    source = await run("pipeline.py", "source", "--count", "30")
    assert "source: sent 1..30 and end of stream to pipeline.numbers" in await source.succeeds()
    stages = [await run("pipeline.py", name) for name in ("sink", "by5", "by2")]
    sink_lines = await stages[0].succeeds()
    assert [line for line in sink_lines if line.startswith("sink: ")] == [
        "sink: 10", "sink: 20", "sink: 30", "sink: end of stream after 3 numbers: [10, 20, 30]"]
    for stage in stages[1:]:
        assert "then end of stream" in (await stage.succeeds())[-1]


# -- 5. chat -----------------------------------------------------------------------------


async def test_chat_broadcast_presence_and_kill_9(run: Run) -> None:
    alice = await run("chat.py", "--nick", "alice", stdin=True)
    await alice.expect(r"^joined #lobby as alice; here: nobody yet$")
    bob = await run("chat.py", "--nick", "bob", stdin=True)
    await bob.expect(r"^joined #lobby as bob; here: alice$")
    await alice.expect(rf"^\* bob joined \(pid {bob.pid}\)$")
    carol = await run("chat.py", "--nick", "carol", stdin=True)
    await carol.expect(r"^joined #lobby as carol; here: alice, bob$")
    for other in (alice, bob):
        await other.expect(rf"^\* carol joined \(pid {carol.pid}\)$")

    await alice.type_line("hello all")
    for other in (bob, carol):
        await other.expect(r"^<alice> hello all$")
    await carol.type_line("brb")
    for other in (alice, bob):
        await other.expect(r"^<carol> brb$")

    os.kill(carol.pid, signal.SIGKILL)
    assert await carol.finish() == -signal.SIGKILL
    for other in (alice, bob):
        await other.expect(rf"^\* carol left \(pid {carol.pid}\)$")
    await bob.type_line("still here")
    await alice.expect(r"^<bob> still here$")
    await alice.type_line("me too")
    await bob.expect(r"^<alice> me too$")

    bob.close_stdin()
    assert (await bob.succeeds())[-1] == "left #lobby"
    await alice.expect(rf"^\* bob left \(pid {bob.pid}\)$")
    alice.close_stdin()
    assert (await alice.succeeds())[-1] == "left #lobby"
    assert not any(line.startswith("<alice>") for line in alice.lines), "saw its own line"


# -- 6. host and workers -----------------------------------------------------------------


async def test_host_spreads_tasks_over_worker_processes(run: Run) -> None:
    workers = [await run("host_workers.py", "worker", "--name", f"w{n}") for n in (1, 2, 3)]
    for n, worker in enumerate(workers, 1):
        await worker.expect(rf"^worker w{n}: ready$")
    lines = await (await run("host_workers.py", "host", "--tasks", "12")).succeeds()

    done = [re.fullmatch(r"host: task +(\d+) = (\d+) +by (w\d)", line) for line in lines]
    results = {int(m[1]): (int(m[2]), m[3]) for m in done if m}
    assert results.keys() == set(range(1, 13)), lines
    assert all(square == task * task for task, (square, _) in results.items())
    counts = re.fullmatch(r"host: per worker: w1=(\d+), w2=(\d+), w3=(\d+)", lines[-1])
    assert counts is not None, lines
    assert sum(map(int, counts.groups())) == 12
    assert all(int(c) >= 1 for c in counts.groups()), f"work was not spread: {lines[-1]}"
    for n, worker in enumerate(workers, 1):
        assert (await worker.succeeds())[-1] == f"worker w{n}: shutting down"


async def test_host_workers_demo(run: Run) -> None:
    lines = await (await run("host_workers.py", "demo", "--workers", "2", "--tasks", "6")
                   ).succeeds()
    assert re.search(r"^host: per worker: w1=\d+, w2=\d+$", "\n".join(lines), re.M), lines
    assert sum(line.endswith("shutting down") for line in lines) == 2


# -- 7. presence -------------------------------------------------------------------------


async def test_presence_up_state_on_sigusr1_and_down(run: Run) -> None:
    monitor = await run("presence.py", "monitor", "--downs", "2")
    await monitor.expect(r"^monitor: watching services; up now: none$")

    alice = await run("presence.py", "service", "--name", "alice")
    await alice.expect(rf"^service alice up, pid {alice.pid}:")
    await monitor.expect(rf"^UP +alice \(pid {alice.pid}, uid {os.getuid()}\)$")
    bob = await run("presence.py", "service", "--name", "bob")
    await bob.expect(r"^service bob up")
    await monitor.expect(rf"^UP +bob \(pid {bob.pid}, ")

    # A monitor started later lists the services already up (from the broker's stats).
    late = await run("presence.py", "monitor", "--downs", "2")
    up_now = await late.expect(r"^monitor: watching services; up now: (.*)$")
    assert sorted(re.findall(r"(\w+) \(pid (\d+), uid (\d+)\)", up_now[1])) == [
        ("alice", str(alice.pid), str(os.getuid())), ("bob", str(bob.pid), str(os.getuid()))]

    os.kill(alice.pid, signal.SIGUSR1)
    for watcher in (monitor, late):
        await watcher.expect(rf"^STATE alice: alive, answered SIGUSR1 \(pid {alice.pid}, 1 ")

    alice.proc.send_signal(signal.SIGTERM)  # a clean stop ...
    assert (await alice.succeeds())[-1] == (
        "service alice: SIGTERM, stopping (1 SIGUSR1 received, 1 state reports published)")
    os.kill(bob.pid, signal.SIGKILL)  # ... and a crash look the same from outside
    assert await bob.finish() == -signal.SIGKILL
    for watcher in (monitor, late):
        await watcher.expect(rf"^DOWN +alice \(pid {alice.pid}, ")
        await watcher.expect(rf"^DOWN +bob \(pid {bob.pid}, ")
        assert (await watcher.succeeds())[-1] == "monitor: 2 service(s) went down, exiting"


# --socket where the aiobus command takes it too: after the role, between arguments.
PLACEMENTS = [
    ["pipeline.py", "--socket", "{path}", "all"],
    ["pipeline.py", "all", "--socket", "{path}"],
    ["weather.py", "demo", "--socket", "{path}"],
    ["weather.py", "station", "--socket", "{path}", "hk", "--count", "1"],
    ["host_workers.py", "demo", "--socket", "{path}"],
    ["presence.py", "monitor", "--socket", "{path}"],
    ["calculator.py", "client", "--socket", "{path}", "add", "2", "3"],
    ["chat.py", "--nick", "a", "--socket", "{path}"],
    ["job_pool.py", "--jobs", "1", "--socket", "{path}"],
]


@pytest.mark.parametrize("command", PLACEMENTS, ids=lambda c: " ".join(c[:2]))
async def test_an_example_without_a_broker_says_how_to_start_one(
        short_tmp: Path, command: list[str]) -> None:
    path = str(short_tmp / "no.sock")
    script, *args = (word.format(path=path) for word in command)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)
    assert proc.returncode == 1, err.decode()  # not 2: the options parsed
    assert err.decode().startswith(f"error: no aiobus broker is listening on {path}"), err.decode()
    assert "start one with `aiobus-broker`" in err.decode()


# -- across a broker restart -----------------------------------------------------------


async def test_examples_keep_running_across_a_broker_restart(
    run: Run, restarts: Restarts
) -> None:
    service = await run("calculator.py", "service")
    await service.expect(r"calculator service ready on queue calc.requests")
    listener = await run("weather.py", "listen", "weather.hk.>", "--count", "3")
    await listener.expect(r"^listening to weather.hk.>$")

    restarts.stop()
    restarts.start()
    where = re.escape(restarts.path)
    for example in (service, listener):
        await example.expect(rf"^connection to {where} lost \(.*\); reconnecting$")
        await example.expect(rf"^reconnected to {where}$")
    await wait_subscribed(restarts.path, "weather.hk.>")  # resubscribed by the client

    assert "add(2, 3) = 5" in await (await run("calculator.py", "client", "add", "2", "3")
                                     ).succeeds()
    station = await run("weather.py", "station", "hk", "--count", "1", "--interval", "0")
    await station.succeeds()
    assert sorted(readings(await listener.succeeds(), "weather.hk.>")) == [
        ("hk", "humidity"), ("hk", "temp"), ("hk", "wind")]
    service.proc.send_signal(signal.SIGTERM)
    lines = await service.succeeds()
    for example in (service, listener):
        assert "Traceback" not in example.output() and "ExceptionGroup" not in example.output()
    assert lines[-1] == "calculator service stopped"


async def wait_subscribed(path: str, pattern: str) -> None:
    async with aiobus.connect(path, reconnect=False) as bus, asyncio.timeout(TIMEOUT):
        while not any(sub["pattern"] == pattern
                      for sub in (await bus.stats())["topics"]["subscriptions"]):
            await asyncio.sleep(0.05)
