"""What only the NATS backend has, against a real nats-server (tests/integration/
nats_server.py): its mapping of settings, the behaviours docs/nats.md documents where NATS
differs from the local broker, and the ``aiobus`` command line on a nats:// URL."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio

import aiobus
from aiobus.client.nats_map import Namespace, parse_url

from .conftest import queue_stats, wait_until
from .nats_server import NatsServer, delete_namespace

pytestmark = pytest.mark.asyncio

AIOBUS = shutil.which("aiobus", path=os.path.dirname(sys.executable))
TIMEOUT = 10.0


@pytest_asyncio.fixture
async def url(nats_server: NatsServer) -> Any:
    """A namespace of its own on the session's nats-server."""
    url = nats_server.namespace_url()
    try:
        yield url
    finally:
        await delete_namespace(url)


async def next_msg(stream: Any, timeout: float = TIMEOUT) -> aiobus.Message:
    return await asyncio.wait_for(anext(stream), timeout)


async def stream_info(url: str, queue: str) -> dict[str, Any]:
    server, name, _ = parse_url(url)
    nc = await nats.connect(server)
    try:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{Namespace(name).stream(queue)}", b"",
                                 timeout=5)
        consumer = await nc.request(
            f"$JS.API.CONSUMER.INFO.{Namespace(name).stream(queue)}.aiobus", b"", timeout=5)
    finally:
        await nc.close()
    info: dict[str, Any] = json.loads(reply.data)
    info["consumer"] = json.loads(consumer.data)
    return info


async def test_settings_map_to_the_stream_and_a_second_declare_is_checked(url: str) -> None:
    async with aiobus.connect(url) as bus, aiobus.connect(url) as other:
        settings = await bus.declare_queue("jobs", max_length=10, overflow="reject",
                                           ack_timeout=7, max_deliveries=3, durable=True)
        info = await stream_info(url, "jobs")
        config, consumer = info["config"], info["consumer"]["config"]
        assert (config["retention"], config["discard"], config["max_msgs"]) == (
            "workqueue", "new", 10)
        assert config["storage"] == "file" and config["allow_msg_ttl"] is True
        assert config["subjects"][0].endswith(".q.jobs")
        assert consumer["ack_wait"] == 7 * 10**9 and consumer["max_deliver"] == 4
        assert json.loads(config["metadata"]["aiobus.settings"]) == settings
        # Another client's declare is checked against the metadata.
        assert await other.declare_queue("jobs", max_length=10, overflow="reject",
                                         ack_timeout=7, max_deliveries=3,
                                         durable=True) == settings
        with pytest.raises(aiobus.QueueMismatch, match="max_length"):
            await other.declare_queue("jobs", max_length=11, overflow="reject",
                                      ack_timeout=7, max_deliveries=3, durable=True)


async def test_a_queue_created_by_use_adopts_its_first_declaration(url: str) -> None:
    async with aiobus.connect(url) as bus:
        await bus.send("jobs", 1)
        assert (await queue_stats(bus, "jobs"))["settings"]["ack_timeout"] == 30.0
        settings = await bus.declare_queue("jobs", ack_timeout=2)
        assert settings["ack_timeout"] == 2.0
        info = await stream_info(url, "jobs")
        assert info["consumer"]["config"]["ack_wait"] == 2 * 10**9
        with pytest.raises(aiobus.QueueMismatch):
            await bus.declare_queue("jobs", ack_timeout=3)


async def test_unsupported_settings_are_typed_errors(url: str) -> None:
    async with aiobus.connect(url) as bus:
        await bus.declare_queue("bounded", max_length=2, overflow="reject")
        with pytest.raises(aiobus.InvalidOption, match="delay"):
            await bus.send("bounded", 1, delay=1)  # schedules cannot use DiscardNew


async def test_overflow_dead_letter_moves_the_oldest_message_not_yet_delivered(
        url: str) -> None:
    """Overflow 'dead-letter' is the sender's, as 'block' is: the stream refuses the send
    (DiscardNew), and the client moves the oldest message no consumer has had to the
    dead-letter queue with the local broker's headers, then sends again. Messages held
    by consumers stay; if consumers hold them all, the new message is the one
    dead-lettered (as locally). Each way of sending does it."""
    async with aiobus.connect(url) as bus:
        await bus.declare_queue("ring", max_length=2, overflow="dead-letter")
        await bus.send("ring", 0)
        await bus.send_nowait("ring", 1)
        async with bus.consume("ring", prefetch=1) as consumer:
            assert (await next_msg(consumer)).body == 0  # held
            await bus.send("ring", 2, headers={"k": "v"})  # full: 1, not yet had, goes
            await bus.send("ring", 3, confirm=False)  # full: 2 goes

            async def two_dead() -> bool:  # (an unconfirmed send is on its way)
                return (await queue_stats(bus, "ring.dlq")).get("ready") == 2

            await wait_until(two_dead, TIMEOUT)
            stats = await queue_stats(bus, "ring")
            assert (stats["ready"], stats["unacked"]) == (1, 1)
            async with bus.consume("ring", prefetch=1) as other:
                assert (await next_msg(other)).body == 3
                await bus.send("ring", 4)  # both held: 4 itself goes
                stats = await queue_stats(bus, "ring")
                assert (stats["ready"], stats["unacked"]) == (0, 2)
        async with bus.consume("ring.dlq", prefetch=3) as dlq:
            dead = [await next_msg(dlq) for _ in range(3)]
    assert [d.body for d in dead] == [1, 2, 4]
    assert dead[1].headers is not None and dead[1].headers["k"] == "v"
    for d in dead:
        assert d.headers is not None
        assert (d.headers["x-dead-reason"], d.headers["x-original-queue"],
                d.headers["x-attempts"]) == ("overflow", "ring", "0")
        assert float(d.headers["x-dead-time"]) > 0


async def test_a_send_to_a_full_blocking_queue_waits_for_an_ack_to_make_room(
        url: str) -> None:
    """Documented: overflow 'block' is the sender's: it sends again, backing off, while
    the stream is full, counted in this client's ``parked``. JetStream keeps a message
    until it is acked, so room is made by an ack, not by a delivery; and a send still
    waiting when its bus closes fails with ConnectionClosed."""
    async with aiobus.connect(url) as bus:
        await bus.declare_queue("bounded", max_length=1)  # overflow "block", the default
        await bus.send("bounded", 1)
        blocked = asyncio.create_task(bus.send("bounded", 2))
        unconfirmed = bus.send_nowait("bounded", 3)
        await asyncio.sleep(0.3)
        assert not blocked.done() and not unconfirmed.done()
        assert (await queue_stats(bus, "bounded"))["parked"] == 2
        async with bus.consume("bounded", prefetch=1) as consumer:
            first = await next_msg(consumer)
            await asyncio.sleep(0.3)
            assert not blocked.done()  # delivered, not acked: still no room
            await first.ack()
            second = await next_msg(consumer)
            await second.ack()
            third = await next_msg(consumer)
            await third.ack()
        await asyncio.wait_for(asyncio.gather(blocked, unconfirmed), TIMEOUT)
        assert {second.body, third.body} == {2, 3}
        assert (await queue_stats(bus, "bounded"))["parked"] == 0
        await bus.send("bounded", 4)
        async with aiobus.connect(url) as producer:
            parked = producer.send_nowait("bounded", 5)
            await asyncio.sleep(0.1)
        with pytest.raises(aiobus.ConnectionClosed):
            await asyncio.wait_for(parked, TIMEOUT)


async def test_ttl_removes_the_message_without_dead_lettering_it(url: str) -> None:
    """Documented: JetStream deletes an expired message (whole seconds, at least 1 s);
    nothing reaches the dead-letter queue."""
    async with aiobus.connect(url) as bus:
        await bus.send("ttl", "stale", ttl=0.3)  # rounded up to 1 s
        await bus.send("ttl", "fresh")
        assert (await queue_stats(bus, "ttl"))["ready"] == 2
        deadline = time.monotonic() + TIMEOUT
        while (await queue_stats(bus, "ttl"))["ready"] != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert "ttl.dlq" not in (await bus.stats())["queues"]
        async with bus.consume("ttl") as consumer:
            assert (await next_msg(consumer)).body == "fresh"


async def test_a_release_stores_a_copy_and_counts_no_attempt(url: str) -> None:
    """Documented: a consumer that stops stores a copy of each unacked message (same id,
    time, headers and attempt, the rest of its TTL), ready at once at the back of the
    queue, and ends the original; ``sent`` and ``acked`` count both. A queue at its
    max_length refuses the copy: then the release is a NAK, which counts an attempt."""
    async with aiobus.connect(url) as bus:
        await bus.send("jobs", "x", headers={"k": "v"}, ttl=60)
        await bus.send("jobs", "y")
        async with bus.consume("jobs", prefetch=1) as consumer:
            first = await next_msg(consumer)
            assert (first.body, first.attempt) == ("x", 1)
        stats = await queue_stats(bus, "jobs")  # "x" released: its copy is behind "y"
        assert (stats["ready"], stats["unacked"], stats["sent"], stats["acked"]) == (
            2, 0, 3, 1)
        async with bus.consume("jobs", prefetch=2) as consumer:
            got = [await next_msg(consumer) for _ in range(2)]
            assert [(m.body, m.attempt) for m in got] == [("y", 1), ("x", 1)]
            copy = got[1]
            assert (copy.id, copy.headers, copy.timestamp) == (
                first.id, {"k": "v"}, first.timestamp)
            for msg in got:
                await msg.ack()
        info = await stream_info(url, "jobs")
        assert info["state"]["messages"] == 0

        await bus.declare_queue("full", max_length=1, overflow="reject")
        await bus.send("full", "z")
        async with bus.consume("full") as consumer:
            assert (await next_msg(consumer)).attempt == 1
        async with bus.consume("full") as consumer:
            again = await next_msg(consumer)
            assert (again.body, again.attempt) == ("z", 2)  # NAKed: counted
            await again.ack()


async def test_an_exhausted_message_is_dead_lettered_on_its_final_arrival(url: str) -> None:
    """A lease that times out on the last attempt: MaxDeliver is max_deliveries + 1, so
    the message arrives once more and the client dead-letters it instead of delivering."""
    async with aiobus.connect(url) as bus:
        await bus.declare_queue("poison", max_deliveries=2, ack_timeout=0.5)
        await bus.send("poison", "p", headers={"trace": "t"})
        async with bus.consume("poison") as consumer:
            first = await next_msg(consumer)
            await first.nack(reason="first")
            second = await next_msg(consumer)
            assert second.attempt == 2  # held past its ack timeout: nobody answers it
            async with bus.consume("poison.dlq") as dlq:
                dead = await next_msg(dlq)
        assert dead.id == first.id and dead.body == "p"
        assert dead.headers["x-dead-reason"] == "max-deliveries"
        assert dead.headers["x-attempts"] == "2" and dead.headers["trace"] == "t"
        assert dead.headers["x-original-queue"] == "poison"
        assert (await queue_stats(bus, "poison"))["ready"] == 0


async def test_no_responders_is_a_request_timeout(url: str) -> None:
    async with aiobus.connect(url) as bus:
        started = time.monotonic()
        with pytest.raises(aiobus.RequestTimeout):
            await bus.request("rpc.nobody", 1, timeout=0.3)
        assert time.monotonic() - started < 5
        # Sent again until a responder subscribes, as a request waits in a local queue.
        late = asyncio.create_task(bus.request("rpc.late", 20, timeout=10))
        await asyncio.sleep(0.2)
        assert not late.done()
        async with bus.consume("rpc.late") as responder:
            msg = await next_msg(responder)
            await msg.reply(msg.body + 1)
        assert await asyncio.wait_for(late, TIMEOUT) == 21


async def test_requests_travel_on_core_nats_to_competing_responders(url: str) -> None:
    """A request is not stored in the queue's stream: it goes to one of the queue's
    consumers (a queue group); nack gives it to the group again with the next attempt,
    a consumer that stops gives its unanswered ones back without counting one, and
    reject drops it (no dead letter: the requester times out)."""
    async with aiobus.connect(url) as bus, aiobus.connect(url) as other:
        await bus.declare_queue("rpc", max_deliveries=2)
        async with bus.consume("rpc", prefetch=1) as first:
            asked = asyncio.create_task(bus.request("rpc", "q", headers={"k": "v"},
                                                    timeout=TIMEOUT))
            msg = await next_msg(first)
            assert (msg.body, msg.headers, msg.attempt, msg.queue) == ("q", {"k": "v"}, 1,
                                                                      "rpc")
            assert msg.reply_to is not None and msg.id
            stats = await queue_stats(bus, "rpc")
            assert (stats["ready"], stats["unacked"], stats["sent"]) == (0, 0, 0)
            await msg.nack()
            again = await next_msg(first)  # the only responder: back to it
            assert (again.id, again.attempt) == (msg.id, 2)
            second = other.consume("rpc")
            await second.start()
            await other.ping()
        # ``first`` stopped holding ``again``: given back, same attempt, to ``second``,
        # which the server has (other.ping() is a round trip after its SUB: not a bare
        # nats-py flush(), whose PING overtakes the SUB; test_nats_private.py).
        async with second:
            taken = await next_msg(second)
            assert (taken.id, taken.body, taken.attempt) == (msg.id, "q", 2)
            await taken.reply("a")
            assert await asyncio.wait_for(asked, TIMEOUT) == "a"
            rejected = asyncio.create_task(bus.request("rpc", "r", timeout=1))
            dropped = await next_msg(second)
            assert dropped.body == "r"
            await dropped.reject()
            with pytest.raises(aiobus.RequestTimeout):
                await rejected
        assert "rpc.dlq" not in (await bus.stats())["queues"]


async def test_a_delayed_send_is_a_schedule(url: str) -> None:
    async with aiobus.connect(url) as bus:
        sent = time.monotonic()
        await bus.send("later", "x", delay=0.5, headers={"k": "v"})
        stats = await queue_stats(bus, "later")
        assert (stats["ready"], stats["delayed"]) == (0, 1)
        async with bus.consume("later") as consumer:
            msg = await next_msg(consumer)
        assert time.monotonic() - sent >= 0.45
        assert (msg.body, msg.headers, msg.attempt) == ("x", {"k": "v"}, 1)


async def test_lifetime_counters_are_none_not_wrong(url: str) -> None:
    async with aiobus.connect(url) as bus:
        await bus.send("jobs", 1)
        stats = await bus.stats()
        queue = stats["queues"]["jobs"]
        assert [queue[k] for k in ("dead_lettered", "expired", "discarded", "duplicates")] \
            == [None] * 4
        assert stats["topics"]["unrouted"] is None and stats["journal"] is None
        # Connections are this client's own (NATS lists them in /connz), and `consumers`
        # counts pull requests waiting: none for a consumer whose prefetch is full.
        assert stats["connections_total"] is None and len(stats["connections"]) == 1
        async with bus.consume("jobs", prefetch=1) as consumer:
            held = await next_msg(consumer)
            assert (await queue_stats(bus, "jobs"))["consumers"] == 0
            await held.ack()
            deadline = time.monotonic() + TIMEOUT
            while (await queue_stats(bus, "jobs"))["consumers"] != 1:  # pulling again
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)


async def test_the_nats_extra_is_named_when_nats_py_is_missing(tmp_path: Any) -> None:
    code = textwrap.dedent("""
        import asyncio, sys
        sys.modules["nats"] = None  # as if nats-py were not installed
        import aiobus
        async def main():
            try:
                await aiobus.connect("nats://127.0.0.1:1")
            except aiobus.BrokerUnavailable as exc:
                print(exc)
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True)
    assert "pip install 'aiobus-ipc[nats]'" in out.stdout, out


# -- the command line on a nats:// URL ------------------------------------------------


async def cli(url: str, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    assert AIOBUS is not None
    proc = await asyncio.create_subprocess_exec(
        AIOBUS, *args, "--socket", url,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# 8 commands and a client process, each a Python start with its own 20 s deadline: over
# 60 s in all once, with make test's 4 workers beside a CPU hog and other jobs.
@pytest.mark.timeout(150)
async def test_cli_send_consume_request_and_stat(url: str, spawn_client: Any) -> None:
    assert await cli(url, "send", "jobs", "one", "-H", "k=v") == (0, "", "")
    assert (await cli(url, "send", "jobs", "--lines", stdin=b"two\nthree\n"))[0] == 0
    code, out, err = await cli(url, "consume", "jobs", "--count", "3")
    assert (code, out.splitlines()) == (0, ["one", "two", "three"]), err
    code, out, err = await cli(url, "stat", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["queues"]["jobs"]["ready"] == 0 and stats["queues"]["jobs"]["acked"] == 3
    code, out, err = await cli(url, "stat")
    assert code == 0 and any(line.split()[:3] == ["jobs", "0", "0"]
                             for line in out.splitlines()), (out, err)
    adder = await spawn_client("""
        emit(ready=True)
        async for msg in bus.consume("rpc.add"):
            await msg.reply(sum(msg.body))
    """, path=url)
    assert await adder.line() == {"ready": True}
    code, out, err = await cli(url, "request", "rpc.add", "[2, 5]", "--json")
    assert (code, out) == (0, "7\n"), err
    code, out, err = await cli(url, "request", "rpc.nobody", "x", "--timeout", "0.3")
    assert code == 1 and err.startswith("aiobus: no reply")


async def test_cli_publish_and_listen(url: str) -> None:
    assert AIOBUS is not None
    listen = await asyncio.create_subprocess_exec(
        AIOBUS, "listen", "w.>", "--count", "2", "--socket", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiobus.connect(url) as bus:
            # Publish until the listener has subscribed (pub/sub is at-most-once).
            async with asyncio.timeout(20):
                while listen.returncode is None:
                    assert (await cli(url, "publish", "w.hk", "31 °C"))[0] == 0
                    await bus.publish("w.x.y", {"c": [1]})
                    try:
                        await asyncio.wait_for(asyncio.shield(listen.wait()), 0.2)
                    except TimeoutError:
                        pass
        out = (await listen.stdout.read()).decode() if listen.stdout else ""
    finally:
        if listen.returncode is None:
            listen.kill()
        await listen.wait()
    assert listen.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("w.") for line in lines), lines


async def test_the_sweeper_dead_letters_what_a_dead_consumer_left(url: str) -> None:
    """A consumer that dies holding the final arrival (here a raw nats-py client that
    never answers): when the next pull comes (a live consumer's), the server gives up
    on the message (MAX_DELIVERIES advisory), and a client that declared or consumes the
    queue moves it to the dead-letter queue and out of the stream."""
    server, name, _ = parse_url(url)
    stream = Namespace(name).stream("fragile")
    async with aiobus.connect(url) as bus:
        await bus.declare_queue("fragile", max_deliveries=1, ack_timeout=0.3)
        await bus.send("fragile", "doomed", headers={"trace": "t"})
        nc = await nats.connect(server)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            for attempt in (1, 2):  # MaxDeliver is max_deliveries + 1
                await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.aiobus",
                                 b'{"batch": 1, "expires": 5000000000}', reply=inbox)
                got = await sub.next_msg(timeout=5)
                assert got.data.endswith(b"doomed") and got.reply, attempt
        finally:
            await nc.close()
        async with bus.consume("fragile") as live, bus.consume("fragile.dlq") as dlq:
            dead = await next_msg(dlq)
            with pytest.raises(TimeoutError):
                await next_msg(live, timeout=0.5)  # never delivered again
        assert dead.body == "doomed" and dead.headers["trace"] == "t"
        assert (dead.headers["x-dead-reason"], dead.headers["x-attempts"]) == (
            "max-deliveries", "1")
        stats = await queue_stats(bus, "fragile")
        assert (stats["ready"], stats["unacked"]) == (0, 0)


async def test_a_given_back_message_counts_as_unacked_until_delivered_again(url: str) -> None:
    """Documented: a nack with a delay stores the message again as a schedule due then
    (``delayed``), except on a queue with max_length (no schedules there): a NAK with the
    delay, and JetStream keeps the message ack-pending (``unacked``), as it keeps one
    whose lease expired; the consumer's own pull request may take that again at once."""
    async with aiobus.connect(url) as bus:
        await bus.declare_queue("jobs", ack_timeout=0.3)
        await bus.declare_queue("bounded", max_length=5, overflow="reject")
        for queue, expected in (("jobs", (0, 0, 1)), ("bounded", (0, 1, 0))):
            await bus.send(queue, "n")
            async with bus.consume(queue, prefetch=2) as consumer:
                msg = await next_msg(consumer)
                await msg.nack(delay=30)
                stats = await queue_stats(bus, queue)
                assert (stats["ready"], stats["unacked"], stats["delayed"]) == expected
        await bus.purge_queue("jobs")
        await bus.send("jobs", "held")
        async with bus.consume("jobs", prefetch=2) as stalled:
            held = await next_msg(stalled)
            again = await next_msg(stalled)  # its lease expired: back to the same consumer
            assert (again.body, again.attempt) == (held.body, 2)
            # The client times a lease from its receipt: held came first, so one
            # ack_timeout after this receipt its deadline has passed on the client too.
            await asyncio.sleep(0.3)
            with pytest.raises(aiobus.LeaseError) as info:
                await held.ack(confirm=True)
            assert info.value.code == "lease-expired"
            await again.ack()


async def test_there_are_no_presence_events(url: str) -> None:
    async with aiobus.connect(url) as bus:
        async with bus.subscribe("$sys.client.>") as presence:
            async with aiobus.connect(url, name="alice"):
                pass
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(presence), 0.3)


async def test_what_a_stopped_consumer_is_sent_before_the_server_has_its_unsub_comes_through(
        url: str) -> None:
    """A consumer that stops unsubscribes its pull inbox, and nats-py would drop at once
    what the server had sent there before it had the UNSUB; such a message stayed leased
    to nobody until its ack timeout (seen: `aiobus consume --count 2` leaving its third
    message unacked, 1 run in 40). The subscription keeps its handler until a round trip
    after the UNSUB (the handler gives a delivery back, as any message a stopping
    consumer holds). Here a message is handed to nats-py's reader for the subscription
    as the server would have sent it; the race itself is not made on demand. (What the
    server marks delivered to the pull as the UNSUB arrives, and then drops for want of
    interest, never reaches the client: it comes back after its ack timeout.)"""
    async with aiobus.connect(url) as bus:
        backend = bus._backend  # type: ignore[attr-defined]
        nc = backend._nc
        got: list[bytes] = []
        sid = await backend._subscribe("drain.me", lambda msg: got.append(msg.data))
        backend._unsubscribe(sid, drain=True)
        await nc._process_msg(sid, b"drain.me", b"", b"on its way", b"")
        assert got == [b"on its way"]

        async def forgotten() -> bool:
            return sid not in nc._subs

        await wait_until(forgotten, TIMEOUT)  # once the server has the UNSUB
        await nc._process_msg(sid, b"drain.me", b"", b"after", b"")
        assert got == [b"on its way"]
        plain = await backend._subscribe("plain", lambda msg: got.append(msg.data))
        backend._unsubscribe(plain)  # without drain: gone at once
        await nc._process_msg(plain, b"plain", b"", b"dropped", b"")
        assert got == [b"on its way"]


async def test_a_pull_that_reaches_no_consumer_is_asked_again_soon(url: str) -> None:
    """A pull request that reaches no JetStream consumer gets a 503 (no responders): a
    server restarting, before its JetStream is up; a consumer deleted. Nothing is then
    outstanding, so the consumer asks again shortly (backing off up to 2 s) rather than
    after the watchdog's 12 s. Here the queue's consumer is deleted under a consumer
    whose prefetch is full, and made again by another client."""
    async with aiobus.connect(url) as bus, aiobus.connect(url) as other:
        await bus.send("jobs", 1)
        await bus.send("jobs", 2)
        async with bus.consume("jobs", prefetch=1) as consumer:
            held = await next_msg(consumer)
            server, name, _ = parse_url(url)
            nc = await nats.connect(server)
            try:
                await nc.request(
                    f"$JS.API.CONSUMER.DELETE.{Namespace(name).stream('jobs')}.aiobus", b"",
                    timeout=TIMEOUT)
            finally:
                await nc.close()
            await held.ack()  # room: its pull reaches no consumer (503)
            await other.ping()
            async with other.consume("jobs", prefetch=1):
                pass  # makes the queue's consumer again (what it took, it gives back)
            # JetStream starts the new consumer from the first message: 1 again, or 2.
            assert (await next_msg(consumer, 5.0)).body in (1, 2)


async def test_jetstream_not_up_yet_is_waited_for_and_none_at_all_is_named(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JetStream API request nobody takes (503) may go again: once JetStream has
    answered this client, that means it is not up yet (a server restarting), and the
    request is sent again, backing off, for up to 5 s. Before any answer it means no
    JetStream: BrokerUnavailable at once, saying so."""
    async with aiobus.connect(url) as bus:
        nc = bus._backend._nc  # type: ignore[attr-defined]
        real = nc.request
        refusals = 0

        async def request(*args: Any, **kwargs: Any) -> Any:
            nonlocal refusals
            if refusals:
                refusals -= 1
                raise nats.errors.NoRespondersError
            return await real(*args, **kwargs)

        monkeypatch.setattr(nc, "request", request)
        refusals = 1
        with pytest.raises(aiobus.BrokerUnavailable, match="JetStream is not enabled"):
            await bus.send("jobs", 1)  # the first request of this client
        await bus.send("jobs", 1)
        refusals = 3
        assert (await queue_stats(bus, "jobs"))["ready"] == 1
        assert refusals == 0


async def test_a_server_restart_loses_no_durable_message_and_streams_go_on(
        tmp_path: Any) -> None:
    """nats-server killed and started again (same port, same store): the bus reconnects,
    a durable queue keeps its messages, its consumer carries on, and a subscription marks
    the first message after the gap."""
    from .test_nats_cluster import free_ports

    (port,) = free_ports(1)
    workdir = Path(tempfile.mkdtemp(prefix="natsr-", dir="/tmp"))
    server = NatsServer(workdir, "-p", str(port), name="r")
    got: list[int] = []
    try:
        async with aiobus.connect(f"nats://127.0.0.1:{port}/r") as bus:
            await bus.declare_queue("jobs", durable=True)
            changes = bus.state_changes()

            async def consume() -> None:
                async for msg in bus.consume("jobs"):
                    got.append(msg.body)
                    await msg.ack()

            consuming = asyncio.create_task(consume())
            async with bus.subscribe("news") as news:
                for i in range(5):
                    await bus.send("jobs", i)
                await bus.publish("news", "before")
                assert (await next_msg(news)).gap is False

                async def consuming_all() -> bool:  # started before the kill, on a loaded
                    return len(got) == 5  # machine too: the consumer is to carry on

                await wait_until(consuming_all, TIMEOUT)
                server.kill()
                assert (await asyncio.wait_for(anext(changes), TIMEOUT)).state.value == \
                    "disconnected"
                server = NatsServer(workdir, "-p", str(port), name="r")
                assert (await asyncio.wait_for(anext(changes), TIMEOUT)).state.value == \
                    "reconnected"
                for i in range(5, 10):
                    await asyncio.wait_for(bus.send("jobs", i), TIMEOUT)
                await bus.publish("news", "after")
                after = await next_msg(news)
                assert (after.body, after.gap) == ("after", True)
                deadline = time.monotonic() + TIMEOUT
                while len(set(got)) < 10:
                    assert time.monotonic() < deadline, got
                    await asyncio.sleep(0.05)
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
        assert set(got) == set(range(10))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
