"""The ``aiobus`` command line, run as the installed console script against a real
broker process: output, exit codes, signals."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aiobus
from aiobus.cli.stat import CLEAR

from .conftest import BrokerProcess, backend_of, queue_stats, unix_only, wait_until

pytestmark = pytest.mark.asyncio

AIOBUS = shutil.which("aiobus", path=os.path.dirname(sys.executable))
TIMEOUT = 20.0  # per command; a slow CI box, not the commands, sets this


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def start(*args: str, stdin: bool = False) -> asyncio.subprocess.Process:
    assert AIOBUS is not None, "the aiobus console script is not installed next to python"
    return await asyncio.create_subprocess_exec(
        AIOBUS, *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, stdin: bytes | None = None,
                 timeout: float = TIMEOUT) -> Result:
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def run(*args: str, stdin: bytes | None = None) -> Result:
    return await finish(await start(*args, stdin=stdin is not None), stdin)


@pytest.fixture
def cli(request: pytest.FixtureRequest) -> Any:
    """``await cli("send", "q", "x")``: the command against the ``broker`` fixture (with
    ``--socket`` after the subcommand; tests also pass it before), or for a ``[nats]``
    test against its ``bus``'s nats:// URL."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("bus") == "nats":
        path = request.getfixturevalue("bus").path
    else:
        path = request.getfixturevalue("broker").path

    async def call(*args: str, stdin: bytes | None = None) -> Result:
        return await run(*args, "--socket", path, stdin=stdin)

    return call


async def subscriptions(bus: aiobus.Bus, pattern: str) -> int:
    stats = await bus.stats()
    return sum(1 for sub in stats["topics"]["subscriptions"] if sub["pattern"] == pattern)


async def drain(bus: aiobus.Bus, queue: str, count: int) -> list[aiobus.Message]:
    got = []
    async with bus.consume(queue, prefetch=count) as consumer:
        for _ in range(count):
            msg = await asyncio.wait_for(anext(consumer), 5)
            await msg.ack()
            got.append(msg)
    return got


# -- no broker needed ---------------------------------------------------------------


COMMANDS = [[], ["send"], ["publish"], ["listen"], ["consume"], ["request"], ["stat"],
            ["queue"], ["queue", "list"], ["queue", "purge"], ["queue", "delete"],
            ["dlq"], ["dlq", "list"], ["dlq", "requeue"], ["dlq", "purge"], ["fifo-in"],
            ["fifo-out"], ["signal-out"]]


async def test_help_of_every_command_and_version() -> None:
    results = await asyncio.gather(*(run(*command, "--help") for command in COMMANDS))
    for command, result in zip(COMMANDS, results, strict=True):
        assert result.code == 0, (command, result.err)
        assert result.out.startswith(f"usage: aiobus {' '.join(command)}".rstrip()), command
        assert "--socket PATH" in result.out and "exit status" in result.out, command
    version = await run("--version")
    assert (version.code, version.out) == (0, f"aiobus {aiobus.__version__}\n")


BAD_USAGE = [
    [], ["frobnicate"], ["send"], ["send", "bad name", "x"], ["send", "q", "x", "--lines"],
    ["send", "q", "{", "--json"], ["send", "q", "x", "--header", "novalue"],
    ["publish", "$sys.x", "x"], ["listen", "a.>.b"], ["consume", "q", "--count", "0"],
    ["stat", "--watch", "-1"], ["dlq", "list"], ["signal-out", "--topic", "t", "--pid", "1"],
    ["signal-out", "--topic", "t", "--pid", "1", "--signal", "NOPE"],
    ["fifo-in", "/tmp/x", "--queue", "q", "--topic", "t"],
    ["queue"], ["queue", "purge"], ["queue", "delete", "$sys.q"],
    ["send", "q", "x", "--delay", "0"],
]


async def test_bad_usage_exits_2() -> None:
    # Usage is checked before connecting: the socket does not exist.
    results = await asyncio.gather(
        *(run(*args, "--socket", "/nonexistent/aiobus.sock") for args in BAD_USAGE)
    )
    for args, result in zip(BAD_USAGE, results, strict=True):
        assert result.code == 2 and result.out == "", (args, result)
        assert result.err.rstrip().splitlines()[-1].startswith("aiobus"), (args, result)


async def test_a_mistyped_command_gets_a_suggestion() -> None:
    for args, expected in ((("sned", "q", "x"), "unknown command 'sned'; did you mean 'send'?"),
                           (("queue", "lsit"), "unknown command 'lsit'; did you mean 'list'?")):
        result = await run(*args, "--socket", "/nonexistent/aiobus.sock")
        assert result.code == 2 and result.out == "", result
        assert result.err.rstrip().splitlines()[-1].endswith(expected), result


async def test_options_anywhere_and_python_dash_m(bus: aiobus.Bus
                                                  ) -> None:
    # Each was refused with "unrecognized arguments" (issue 14): options after a
    # positional, between positionals, and --socket between the queue and the body.
    for args in (("send", "mixed", "--json", '{"a": 1}', "--socket", bus.path),
                 ("send", "mixed", "--socket", bus.path, "plain"),
                 ("publish", "demo.z", "-H", "a=b", "zz", "--socket", bus.path)):
        result = await run(*args)
        assert result.code == 0, (args, result)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiobus", "send", "mixed", "via -m", "--socket", bus.path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    result = await finish(proc)
    assert result.code == 0, result
    async with bus.consume("mixed") as consumer:
        bodies = [(await asyncio.wait_for(anext(consumer), 5)).body for _ in range(3)]
    assert bodies == [{"a": 1}, "plain", "via -m"]


async def test_no_broker_exits_1_with_one_line(short_tmp: Path) -> None:
    path = str(short_tmp / "none.sock")
    results = await asyncio.gather(
        run("--socket", path, "send", "q", "x"),
        run("listen", "a.*", "--socket", path),
        run("stat", "--socket", path),
        run("dlq", "list", "q", "--socket", path),
    )
    for result in results:
        assert result.code == 1, result
        assert result.out == ""
        assert result.err.count("\n") == 1 and result.err.startswith("aiobus: "), result.err
        assert path in result.err and "no aiobus broker" in result.err


# -- against a broker -----------------------------------------------------------------


async def test_send_from_argument_stdin_lines_and_json(bus: aiobus.Bus, cli: Any) -> None:
    results = [
        await cli("send", "jobs", "héllo", "-H", "k=v", "--header", "x=1=2"),
        await cli("send", "jobs", stdin=b"two\nlines\n"),
        await cli("send", "jobs", stdin=b"\xff\x00raw"),
        await cli("send", "jobs", "--lines", stdin=b"a\r\nb\n\nlast"),
        await cli("send", "jobs", '{"n": [1, 2.5, null]}', "--json"),
        await cli("send", "jobs", "--json", "--lines", stdin=b'7\n"s"\ntrue\n'),
    ]
    assert all(r.code == 0 and r.out == r.err == "" for r in results), results
    got = await drain(bus, "jobs", 11)
    assert [m.body for m in got] == [
        "héllo", "two\nlines\n", b"\xff\x00raw", "a", "b", "", "last",
        {"n": [1, 2.5, None]}, 7, "s", True,
    ]
    assert got[0].headers == {"k": "v", "x": "1=2"}
    assert type(got[2].body) is bytes

    result = await cli("send", "short", "x", "--ttl", "0.05")
    assert result.code == 0
    if backend_of(bus) == "nats":  # removed, not dead-lettered (docs/nats.md, TTL)
        await wait_until(lambda: _expired_on_nats(bus, "short"))
    else:
        await wait_until(lambda: _dead(bus, "short"))
    bad = await cli("send", "jobs", "--json", "--lines", stdin=b"1\n{oops\n")
    assert bad.code == 2 and "stdin line 2 is not valid JSON" in bad.err
    assert [m.body for m in await drain(bus, "jobs", 1)] == [1]  # line 1 was sent


async def _expired_on_nats(bus: aiobus.Bus, queue: str) -> bool:
    stats = await queue_stats(bus, queue)
    return bool(stats["sent"] == 1 and stats["ready"] == 0 and stats["acked"] == 1)


async def _dead(bus: aiobus.Bus, queue: str) -> bool:
    return bool((await queue_stats(bus, queue)).get("dead_lettered", 0) == 1)


async def test_send_lines_keeps_sends_in_flight_and_shows_progress_on_a_terminal(
        bus: aiobus.Bus) -> None:
    lines = b"".join(b"%d\n" % n for n in range(1, 20_001))
    result = await run("send", "load", "--lines", "--socket", bus.path, stdin=lines)
    assert (result.code, result.out, result.err) == (0, "", "")  # no terminal: silent
    assert (await queue_stats(bus, "load"))["ready"] == 20_000
    got = []
    async with bus.consume("load", prefetch=100) as consumer:
        for _ in range(20_000):
            msg = await asyncio.wait_for(anext(consumer), 5)
            msg.ack_nowait()
            got.append(msg.body)
    assert got == [str(n) for n in range(1, 20_001)]  # all of them, in order
    # On a terminal, stderr counts what was confirmed (ending on the total).
    out, shown = await on_a_terminal(["send", "load", "--lines", "--socket", bus.path],
                                     lines)
    assert out == b""
    assert shown.rstrip().endswith(b"aiobus: sent 20,000"), shown[-200:]


async def on_a_terminal(args: list[str], stdin: bytes = b"") -> tuple[bytes, bytes]:
    """Run ``aiobus ARGS`` with its stderr on a pseudo-terminal; returns its stdout and
    what the terminal showed. It must exit 0."""
    controller, terminal = os.openpty()
    try:
        assert AIOBUS is not None
        proc = await asyncio.create_subprocess_exec(
            AIOBUS, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=terminal)
        os.close(terminal)
        terminal = -1
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), TIMEOUT)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0, shown
    return out, shown


async def test_dlq_requeue_keeps_sends_in_flight_and_shows_progress_on_a_terminal(
        bus: aiobus.Bus) -> None:
    total = 20_000
    dead = {"x-dead-reason": "rejected", "x-original-queue": "bulk", "x-attempts": "1"}
    sends = [bus.send_nowait("bulk.dlq", b"%d" % n, {**dead, "n": str(n)})
             for n in range(total)]
    await asyncio.wait_for(asyncio.gather(*sends), TIMEOUT)
    out, shown = await on_a_terminal(["dlq", "requeue", "bulk", "--socket", bus.path])
    assert out.decode().splitlines() == [f"requeued {total} dead letters from bulk.dlq"]
    assert shown.rstrip().endswith(f"aiobus: requeued {total:,}".encode()), shown[-200:]
    assert (await queue_stats(bus, "bulk.dlq"))["ready"] == 0
    got = []
    async with bus.consume("bulk", prefetch=100) as consumer:
        for _ in range(total):
            msg = await asyncio.wait_for(anext(consumer), 5)
            msg.ack_nowait()
            got.append((msg.body, msg.headers))
    assert got == [(b"%d" % n, {"n": str(n)}) for n in range(total)]  # in order, undressed


@unix_only  # waits on the broker's view of other processes' subscriptions, which stats()
# on NATS does not have; on NATS: test_nats.py::test_cli_publish_and_listen
async def test_publish_and_listen(bus: aiobus.Bus, cli: Any) -> None:
    text = await start("--socket", bus.path, "listen", "w.>", "--count", "3")
    as_json = await start("listen", "w.*", "--json", "-n", "2", "--socket", bus.path)
    await wait_until(lambda: _both_subscribed(bus), timeout=TIMEOUT)
    assert (await cli("publish", "w.hk", "31 °C")).code == 0
    assert (await cli("publish", "w.x.y", '{"c": [1]}', "--json")).code == 0
    await bus.publish("w.raw", b"\x00\xff", headers={"h": "v"})
    out = await finish(text)
    assert out.code == 0 and out.lines == ["w.hk 31 °C", 'w.x.y {"c":[1]}', r"w.raw \x00\xff"]
    out = await finish(as_json)
    first, second = (json.loads(line) for line in out.lines)
    assert out.code == 0
    assert first["topic"] == "w.hk" and first["body"] == "31 °C" and not first["base64"]
    assert second["topic"] == "w.raw" and second["base64"] and second["headers"] == {"h": "v"}
    assert base64.b64decode(second["body"]) == b"\x00\xff"
    assert {"id", "timestamp", "dropped"} <= second.keys()


async def _both_subscribed(bus: aiobus.Bus) -> bool:
    return await subscriptions(bus, "w.>") == 1 and await subscriptions(bus, "w.*") == 1


async def test_consume_prints_then_acks(bus: aiobus.Bus, cli: Any) -> None:
    for body in ["one", "two\tx", 3]:
        await bus.send("jobs", body)
    out = await cli("consume", "jobs", "--count", "2")
    assert (out.code, out.lines) == (0, ["one", r"two\tx"])
    stats = await queue_stats(bus, "jobs")
    # On NATS, if the command had the third message when it stopped, it released it by
    # storing a copy and ending the original, which `acked` counts (docs/nats.md).
    acked = (2, 3) if backend_of(bus) == "nats" else (2,)
    assert stats["acked"] in acked and stats["ready"] == 1 and stats["unacked"] == 0
    out = await cli("consume", "jobs", "--json", "--timeout", "0.3")
    assert out.code == 0 and len(out.lines) == 1
    record = json.loads(out.lines[0])
    assert record["queue"] == "jobs" and record["body"] == 3 and record["attempt"] == 1
    assert (await queue_stats(bus, "jobs"))["acked"] == stats["acked"] + 1


async def test_consume_of_a_missing_queue_says_so_and_creates_nothing(
    bus: aiobus.Bus, cli: Any
) -> None:
    out = await cli("consume", "nosuch", "--timeout", "1")
    assert (out.code, out.out) == (1, "")
    assert out.err.startswith("aiobus: there is no queue 'nosuch'"), out.err
    assert "nosuch" not in (await bus.stats())["queues"]
    # --create: a worker started before its producers waits on a new queue.
    out = await cli("consume", "later", "--create", "--timeout", "0.3")
    assert (out.code, out.out, out.err) == (0, "", "")
    assert "later" in (await bus.stats())["queues"]


async def test_reject_and_the_dead_letter_commands(bus: aiobus.Bus, cli: Any) -> None:
    await bus.send("jobs", "first", headers={"trace": "t1"})
    await bus.send("jobs", {"n": 2})
    out = await cli("consume", "jobs", "--reject", "--reason", "bad input", "-n", "2")
    assert out.code == 0 and len(out.lines) == 2
    assert (await queue_stats(bus, "jobs.dlq"))["ready"] == 2

    listed = await cli("dlq", "list", "jobs")
    assert listed.code == 0, listed.err
    assert listed.lines[0] == "jobs.dlq: 2 dead letters"
    assert listed.lines[1].split()[:3] == ["ID", "REASON", "ATTEMPTS"]
    assert all("rejected" in line and "bad input" in line for line in listed.lines[2:])
    assert "first" in listed.lines[2] and '{"n":2}' in listed.lines[3]
    as_json = [json.loads(line) for line in (await cli("dlq", "list", "jobs", "--json")).lines]
    assert [m["headers"]["x-dead-reason"] for m in as_json] == ["rejected", "rejected"]
    # Listing (PEEK) removed nothing, leased nothing and counted no attempt.
    stats = await queue_stats(bus, "jobs.dlq")
    assert (stats["ready"], stats["unacked"], stats["acked"], stats["delivered"]) == (2, 0, 0, 0)
    shown = await cli("dlq", "show", "jobs", as_json[1]["id"])
    assert shown.code == 0, shown.err
    assert f"id: {as_json[1]['id']}" in shown.lines and "header x-reason-text: bad input" in (
        shown.lines) and shown.lines[-1] == '{"n":2}', shown.out
    missing = await cli("dlq", "show", "jobs", "no-such-id")
    assert missing.code == 1 and "no dead letter 'no-such-id' is ready in jobs.dlq" in (
        missing.err)
    assert (await queue_stats(bus, "jobs.dlq"))["delivered"] == 0
    async with bus.consume("jobs.dlq", prefetch=2) as consumer:
        attempts = [(await asyncio.wait_for(anext(consumer), 5)).attempt for _ in range(2)]
    assert attempts == [1, 1]

    # As the FIFO bridge dead-letters an oversize record: only its head, so it stays.
    await bus.send("jobs.dlq", b"head", {"x-dead-reason": "too-large",
                                         "x-original-queue": "jobs"})
    requeued = await cli("dlq", "requeue", "jobs")
    assert requeued.code == 0 and requeued.lines == [
        "requeued 2 dead letters from jobs.dlq",
        "left 1 dead letter with reason too-large in jobs.dlq: each holds only the head of"
        " its record",
    ]
    assert (await queue_stats(bus, "jobs.dlq"))["ready"] == 1
    back = await drain(bus, "jobs", 2)
    assert [m.body for m in back] == ["first", {"n": 2}]
    assert back[0].headers == {"trace": "t1"} and back[1].headers == {}

    # A queue with its own dead-letter queue; purge deletes the dead letters.
    await bus.declare_queue("orders", dead_letter="graveyard", max_deliveries=1)
    await bus.send("orders", "o1")
    out = await cli("consume", "orders", "--reject", "-n", "1")
    assert out.code == 0 and (await queue_stats(bus, "graveyard"))["ready"] == 1
    purged = await cli("dlq", "purge", "orders")
    assert (purged.code, purged.lines) == (0, ["purged 1 dead letter from graveyard"])
    assert (await queue_stats(bus, "graveyard"))["ready"] == 0
    empty = await run("--socket", bus.path, "dlq", "list", "orders")
    assert (empty.code, empty.lines) == (0, ["graveyard: no dead letters"])


async def test_dlq_of_a_queue_that_does_not_exist(bus: aiobus.Bus, cli: Any) -> None:
    for action in (["list"], ["show", "nosuchqueue", "x"], ["requeue"], ["purge"]):
        args = action if len(action) > 1 else [*action, "nosuchqueue"]
        result = await cli("dlq", *args)
        assert result.code == 1 and result.out == "", result
        assert "there is no queue 'nosuchqueue'" in result.err, result.err
    queues = (await bus.stats())["queues"]
    assert "nosuchqueue" not in queues and "nosuchqueue.dlq" not in queues
    # A queue that exists and has had no dead letter yet: none, and still no .dlq queue.
    await bus.send("fresh", "x")
    result = await cli("dlq", "list", "fresh")
    assert (result.code, result.lines) == (0, ["fresh.dlq: no dead letters"])
    assert "fresh.dlq" not in (await bus.stats())["queues"]


async def test_stat_prometheus(bus: aiobus.Bus, cli: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await bus.send("jobs", 1)
    result = await cli("stat", "--prometheus")
    assert result.code == 0, result.err
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(result.out) for s in family.samples}
    assert got[("aiobus_queue_messages_ready", (("queue", "jobs"),))] == 1
    assert got[("aiobus_connections", ())] == 2  # the bus fixture and the command
    assert got[("aiobus_process_resident_memory_bytes", ())] > 1_000_000


async def test_request_against_a_replying_client(cli: Any, spawn_client: Any,
                                                 bus: aiobus.Bus) -> None:
    adder = await spawn_client("""
        emit(ready=True)
        async for msg in bus.consume("rpc.add"):
            await msg.reply(sum(msg.body) if isinstance(msg.body, list) else msg.body)
    """, name="adder")
    await adder.line()
    await wait_until(lambda: _consumers(bus, "rpc.add"), timeout=TIMEOUT)
    out = await cli("request", "rpc.add", "[2, 5]", "--json")
    assert (out.code, out.out) == (0, "7\n")
    out = await cli("request", "rpc.add", stdin=b"echo me")
    assert (out.code, out.out) == (0, "echo me\n")
    late = await cli("request", "rpc.nobody", "x", "--timeout", "0.2")
    assert late.code == 1 and late.out == ""
    assert late.err.startswith("aiobus: no reply") and late.err.count("\n") == 1


async def _consumers(bus: aiobus.Bus, queue: str) -> bool:
    return bool((await queue_stats(bus, queue)).get("consumers"))


async def test_stat_table_and_json(bus: aiobus.Bus, cli: Any) -> None:
    await bus.send("jobs", 1)
    await bus.send("jobs", 2)
    async with bus.subscribe("weather.*"):
        table = await cli("stat", "--sample", "0.2")
        as_json = await cli("stat", "--json", "--sample", "0")
    assert table.code == 0, table.err
    header = next(line for line in table.lines if line.startswith("QUEUE"))
    assert header.split() == ["QUEUE", "READY", "UNACKED", "DELAYED", "CONSUMERS",
                              "DEAD-LETTERED", "SENT/S", "ACKED/S"]
    row = next(line for line in table.lines if line.startswith("jobs "))
    assert row.split() == ["jobs", "2", "0", "0", "0", "0", "0.0", "0.0"]
    subscription = next(line for line in table.lines if line.startswith("weather.*"))
    assert subscription.split()[-3:] == ["0", "0", "0"]  # pending, delivered, dropped
    assert any(line.split()[1:2] == ["test"] for line in table.lines)  # the bus fixture
    journal = next(line for line in table.lines if line.startswith("journal:"))
    assert "segments" in journal and "0 live messages" in journal, journal
    process = next(line for line in table.lines if line.startswith("broker: pid"))
    assert "MiB resident" in process and "event loop lag" in process, process
    stats = json.loads(as_json.out)
    assert stats["journal"]["segments"] >= 1 and stats["journal"]["live_messages"] == 0
    assert stats["queues"]["jobs"]["ready"] == 2 and stats["rates"] is None
    assert [s["pattern"] for s in stats["topics"]["subscriptions"]] == ["weather.*"]
    assert {c["name"] for c in stats["connections"]} >= {"test", "aiobus stat"}


async def test_queue_list_purge_and_delete(bus: aiobus.Bus, cli: Any) -> None:
    await bus.declare_queue("jobs", durable=True)
    for i in range(3):
        await bus.send("jobs", i)
    await bus.send("jobs", "later", delay=3600)
    await bus.send("other", "x")
    async with bus.consume("jobs", prefetch=1) as consumer:
        held = await asyncio.wait_for(anext(consumer), TIMEOUT)
        listed = await cli("queue", "list")
        as_json = await cli("queue", "list", "--json")
        assert listed.code == 0, listed.err
        assert listed.lines[0].split() == ["QUEUE", "DURABLE", "READY", "UNACKED", "DELAYED",
                                           "CONSUMERS"]
        rows = {line.split()[0]: line.split()[1:] for line in listed.lines[1:]}
        assert rows["jobs"] == ["yes", "2", "1", "1", "1"]
        assert rows["other"] == ["no", "1", "0", "0", "0"]
        records = [json.loads(line) for line in as_json.lines]
        assert {"name": "jobs", "durable": True, "ready": 2, "unacked": 1, "delayed": 1,
                "consumers": 1} in records
        purged = await cli("queue", "purge", "jobs")
        assert (purged.code, purged.out) == (0, "purged 3 messages from jobs\n")
        refused = await cli("queue", "delete", "jobs", "--if-empty")
        assert refused.code == 1 and refused.out == ""
        assert refused.err.startswith("aiobus: queue 'jobs' is not empty: 0 ready, 0 delayed,"
                                      " 1 unacked")
        await held.ack()
    deleted = await cli("queue", "delete", "other")
    assert (deleted.code, deleted.out) == (0, "deleted queue other with 1 message\n")
    missing = await cli("queue", "purge", "other")
    assert missing.code == 1 and "there is no queue 'other'" in missing.err
    assert (await cli("queue", "delete", "jobs", "--if-empty")).code == 0
    assert "jobs" not in (await bus.stats())["queues"]


async def test_send_with_a_delay(bus: aiobus.Bus, cli: Any) -> None:
    result = await cli("send", "jobs", "later", "--delay", "3600")
    assert result.code == 0, result.err
    stats = await queue_stats(bus, "jobs")
    assert (stats["ready"], stats["delayed"]) == (0, 1)


async def test_long_running_commands_end_cleanly_on_signals(
    bus: aiobus.Bus
) -> None:
    watch = await start("stat", "--watch", "0.2", "--socket", bus.path)
    consume = await start("consume", "idle", "--create", "--socket", bus.path)
    assert watch.stdout is not None
    seen = b""
    async with asyncio.timeout(TIMEOUT):
        while seen.count(b"Ctrl-C to quit") < 2:  # drawn, then redrawn
            seen += await watch.stdout.read(4096)
        await wait_until(lambda: _consumers(bus, "idle"), timeout=TIMEOUT)
    assert CLEAR.encode() not in seen  # a pipe gets no screen-clearing codes
    watch.send_signal(signal.SIGINT)
    consume.send_signal(signal.SIGTERM)
    for proc in (watch, consume):
        result = await finish(proc)
        assert (result.code, result.err) == (0, ""), result
    assert (await queue_stats(bus, "idle"))["consumers"] == 0


async def test_stat_watch_clears_the_screen_on_a_terminal(broker: BrokerProcess) -> None:
    import pty

    assert AIOBUS is not None
    leader, follower = pty.openpty()
    os.set_blocking(leader, False)
    try:
        watch = await asyncio.create_subprocess_exec(
            AIOBUS, "stat", "--watch", "0.2", "--socket", broker.path,
            stdin=asyncio.subprocess.DEVNULL, stdout=follower,
            stderr=asyncio.subprocess.PIPE)
        os.close(follower)
        follower = -1
        seen = b""
        try:
            async with asyncio.timeout(TIMEOUT):
                while seen.count(CLEAR.encode()) < 2:  # drawn, then redrawn over it
                    await asyncio.sleep(0.05)
                    with contextlib.suppress(BlockingIOError):
                        seen += os.read(leader, 65536)
        finally:
            watch.send_signal(signal.SIGINT)
            await asyncio.wait_for(watch.wait(), TIMEOUT)
        assert watch.returncode == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


async def test_fifo_in_and_signal_out(bus: aiobus.Bus,
                                      short_tmp: Path) -> None:
    fifo = short_tmp / "in.fifo"
    bridge = await start("fifo-in", str(fifo), "--queue", "from-fifo", "--socket", bus.path)
    target = await asyncio.create_subprocess_exec("sleep", "30")
    forward = await start("signal-out", "--topic", "svc.stop", "--pid", str(target.pid),
                          "--signal", "TERM", "--socket", bus.path)
    try:
        await wait_until(lambda: _is_fifo(fifo), timeout=TIMEOUT)
        await write_fifo(fifo, b"job 1\njob 2\n")
        got = await drain(bus, "from-fifo", 2)
        assert [m.body for m in got] == ["job 1", "job 2"]  # UTF-8 records arrive as str
        if backend_of(bus) == "nats":
            # stats() on NATS shows this client's subscriptions only: publish until the
            # bridge, once subscribed, forwards one (each would send the same signal).
            async with asyncio.timeout(TIMEOUT):
                while target.returncode is None:
                    await bus.publish("svc.stop", "now")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(target.wait(), 0.1)
        else:
            await wait_until(lambda: _subscribed(bus, "svc.stop"), timeout=TIMEOUT)
            await bus.publish("svc.stop", "now")
        assert await asyncio.wait_for(target.wait(), TIMEOUT) == -signal.SIGTERM
    finally:
        if target.returncode is None:
            target.kill()
            await target.wait()
    for proc in (bridge, forward):
        proc.send_signal(signal.SIGTERM)
        result = await finish(proc)
        assert (result.code, result.err) == (0, ""), result


async def write_fifo(path: Path, data: bytes) -> None:
    """Write to a FIFO once its reader has it open (ENXIO until then)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                await asyncio.sleep(0.02)
                continue
            try:
                os.write(fd, data)  # under PIPE_BUF: all at once
            finally:
                os.close(fd)
            return


async def _is_fifo(path: Path) -> bool:
    return path.exists() and stat.S_ISFIFO(path.stat().st_mode)


async def _subscribed(bus: aiobus.Bus, pattern: str) -> bool:
    return await subscriptions(bus, pattern) == 1


async def test_fifo_out_acks_only_what_a_reader_got(bus: aiobus.Bus,
                                                    short_tmp: Path) -> None:
    fifo = short_tmp / "out.fifo"
    for i in range(3):
        await bus.send("to-fifo", f"line {i}")
    bridge = await start("fifo-out", str(fifo), "--queue", "to-fifo", "--socket", bus.path)
    try:
        await wait_until(lambda: _is_fifo(fifo), timeout=TIMEOUT)
        # No reader yet: nothing is taken from the queue, so no lease can run out.
        stats = await queue_stats(bus, "to-fifo")
        assert (stats["consumers"], stats["delivered"], stats["acked"]) == (0, 0, 0)
        # A real reader, from a shell, arrives later and gets every record.
        reader = await asyncio.create_subprocess_exec(
            "sh", "-c", f"head -n 3 < {shlex.quote(str(fifo))}",
            stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(reader.communicate(), TIMEOUT)
        assert out.decode().splitlines() == ["line 0", "line 1", "line 2"]

        async def all_acked() -> bool:
            return bool((await queue_stats(bus, "to-fifo"))["acked"] == 3)

        await wait_until(all_acked, timeout=TIMEOUT)
    finally:
        bridge.send_signal(signal.SIGTERM)
        result = await finish(bridge)
    assert result.code == 0, result


async def test_fifo_in_dead_letters_oversize_records_where_told(
        bus: aiobus.Bus, short_tmp: Path) -> None:
    fifo = short_tmp / "big.fifo"
    bridge = await start("fifo-in", str(fifo), "--queue", "sized", "--max-record", "16",
                         "--dead-letter", "sized.rejects", "--socket", bus.path)
    try:
        await wait_until(lambda: _is_fifo(fifo), timeout=TIMEOUT)
        await write_fifo(fifo, b"short\n" + b"x" * 40 + b"\nafter\n")
        got = await drain(bus, "sized", 2)
        assert [m.body for m in got] == ["short", "after"]
        (dead,) = await drain(bus, "sized.rejects", 1)
        assert dead.headers["x-dead-reason"] == "too-large"
        assert dead.headers["x-record-length"] == "40"
    finally:
        bridge.send_signal(signal.SIGTERM)
        result = await finish(bridge)
    assert result.code == 0, result
