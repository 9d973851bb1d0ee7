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
from aiobus.client import nats as backend_module
from aiobus.client.nats_map import parse_url

from .nats_server import NatsServer

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


async def test_the_private_parts_are_there_once_connected(nats_server: NatsServer) -> None:
    nc = NatsClient()
    await nc.connect(servers=[nats_server.url], connect_timeout=5, allow_reconnect=False)
    try:
        for name, kind in backend_module._INTERNALS:
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
    monkeypatch.setattr(backend_module, "_INTERNALS",
                        (*backend_module._INTERNALS, ("_renamed_buffer", list)))
    with pytest.raises(aiobus.BrokerUnavailable, match=r"_renamed_buffer.*nats-py>=2\.7,<3"):
        await aiobus.connect(nats_server.namespace_url()).__aenter__()
