"""The NATS backend writes into nats-py's private outgoing buffer for speed (the
``nats-py<3`` pin in pyproject says why). If a nats-py release renames those parts or
stops flushing them, these fail loudly, naming what changed, instead of the backend
becoming silently slow or losing writes."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient

import aiobus
from aiobus.client import nats_internals
from aiobus.client.nats_map import parse_url

from .nats_server import NatsServer

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


async def test_the_private_parts_are_there_once_connected(nats_server: NatsServer) -> None:
    nc = NatsClient()
    await nc.connect(servers=[nats_server.url], connect_timeout=5, allow_reconnect=False)
    try:
        for name, kind in nats_internals.INTERNALS:
            assert isinstance(getattr(nc, name, None), kind), (
                f"nats-py's Client.{name} is gone or no longer a {kind.__name__}:"
                " aiobus/client/nats.py writes to it (_append)")
        sub = await nc.subscribe("x")
        assert isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue), (
            "nats-py's Subscription._pending_queue is gone: aiobus/client/nats.py"
            " replaces it (_subscribe)")
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)


async def test_what_the_backend_appends_reaches_the_server(nats_server: NatsServer) -> None:
    """Not only there: read. A publish goes through _append into nats-py's buffer; a
    plain nats-py subscriber must get it, or nats-py no longer flushes what is there."""
    url = nats_server.namespace_url()
    server, namespace, _ = parse_url(url)
    plain = await nats.connect(server, allow_reconnect=False, connect_timeout=5)
    try:
        got: asyncio.Queue[Any] = asyncio.Queue()
        sub = await plain.subscribe(f"{namespace}.t.private", cb=got.put)
        await plain.flush()
        async with aiobus.connect(url) as bus:
            for i in range(3):
                await bus.publish("private", b"%d" % i)
            try:
                bodies = [(await asyncio.wait_for(got.get(), TIMEOUT)).data for _ in range(3)]
            except TimeoutError:
                pytest.fail("nothing the backend appended to nats-py's _pending was sent:"
                            " nats-py's flusher no longer reads it (aiobus/client/nats.py"
                            " _append)")
        assert bodies == [b"0", b"1", b"2"]
        await sub.unsubscribe()
    finally:
        await asyncio.wait_for(plain.close(), TIMEOUT)


async def test_a_nats_py_without_them_is_refused_at_connect_naming_them(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nats_internals, "INTERNALS",
                        (*nats_internals.INTERNALS, ("_renamed_buffer", list)))
    with pytest.raises(aiobus.BrokerUnavailable, match=r"_renamed_buffer.*nats-py>=2\.7,<3"):
        await aiobus.connect(nats_server.namespace_url()).__aenter__()


def record_writes(nc: NatsClient, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The protocol verbs nats-py writes to its socket from now on, in order."""
    verbs: list[bytes] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines

    def record(chunk: bytes) -> None:
        verbs.extend(line.split(b" ")[0] for line in bytes(chunk).split(b"\r\n")
                     if line[:1].isupper())

    def recorded_write(payload: bytes) -> None:
        record(payload)
        write(payload)

    def recorded_writelines(payload: list[bytes]) -> None:
        for chunk in payload:
            record(chunk)
        writelines(payload)

    monkeypatch.setattr(transport, "write", recorded_write)
    monkeypatch.setattr(transport, "writelines", recorded_writelines)
    return verbs


async def test_flush_pings_ahead_of_its_buffer_and_the_backend_does_not(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py's flush() writes its PING straight to the socket, ahead of a SUB still in
    its buffer for the flusher task: its PONG does not mean that the server has the SUB
    (under load a request then sent to that queue group got "no responders"). The
    backend's round trip (``nats_internals.round_trip``: subscribe(), ping(), stats())
    has the buffer written first. Should a nats-py release fix the order, the first
    check fails, and ``round_trip`` may go back to a plain flush()."""
    nc = NatsClient()
    await nc.connect(servers=[nats_server.url], connect_timeout=5, allow_reconnect=False)
    try:
        verbs = record_writes(nc, monkeypatch)
        await nc.subscribe("x")
        await nc.flush(timeout=TIMEOUT)  # type: ignore[arg-type]
        assert verbs == [b"PING", b"SUB"], verbs
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    async with aiobus.connect(nats_server.namespace_url()) as bus:
        verbs = record_writes(bus._backend._nc, monkeypatch)  # type: ignore[attr-defined]
        async with bus.subscribe("x"):
            assert b"SUB" in verbs and verbs[-1] == b"PING", verbs
        del verbs[:]
        async with bus.consume("jobs"):
            await bus.ping()
        # (consume() subscribes to its deliveries and its queue's requests)
        assert b"SUB" in verbs and verbs.index(b"PING") > max(
            i for i, verb in enumerate(verbs) if verb == b"SUB"), verbs
