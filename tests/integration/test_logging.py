"""What the broker logs, read from a real broker process's output: each connection's
lifecycle at DEBUG (name, pid, uid), a protocol violation at INFO, rate-limited, and
``--log-format json`` as one JSON object per line."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import Op

from .conftest import BrokerProcess
from .test_bad_input import raw_exchange

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0
BAD = msgpack.packb([Op.CONSUME, "not a rid"])  # CLOSE bad-field


def records(broker: BrokerProcess) -> list[dict[str, Any]]:
    lines = broker.log().splitlines()
    return [json.loads(line) for line in lines]  # every line is one JSON object


async def wait_for_record(broker: BrokerProcess, fragment: str) -> dict[str, Any]:
    """The first record whose message contains ``fragment``, once the broker wrote it."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            found = [r for r in records(broker) if fragment in r["message"]]
            if found:
                return found[0]
            await asyncio.sleep(0.02)


async def test_json_lines_with_connection_lifecycle_at_debug(broker_factory: Any) -> None:
    broker = broker_factory("--log-level", "DEBUG", "--log-format", "json")
    async with aiobus.connect(broker.path, name="log-test", reconnect=False) as bus:
        await bus.ping()
        conn = bus.server_info["conn"]
    me = {"pid": os.getpid(), "uid": os.getuid()}
    connected = await wait_for_record(broker, "client 'log-test' connected")
    gone = await wait_for_record(broker, "client 'log-test' disconnected")
    for record in (connected, gone):
        assert record["level"] == "DEBUG" and record["logger"] == "aiobus.broker.server"
        assert {k: record[k] for k in ("conn", "client", "pid", "uid")} == {
            "conn": conn, "client": "log-test", **me}
        assert record["time"].endswith("+00:00") and "T" in record["time"]
    assert "closed by the client" in gone["message"]
    listening = await wait_for_record(broker, "listening on")
    assert listening["level"] == "INFO" and set(listening) == {
        "time", "level", "logger", "message"}


async def test_protocol_violations_are_logged_at_info_rate_limited(
        broker_factory: Any) -> None:
    broker = broker_factory("--log-format", "json")  # INFO: no lifecycle lines
    for _ in range(15):
        await raw_exchange(broker.path, BAD)
    first = await wait_for_record(broker, "closing connection")
    assert first["level"] == "INFO"
    assert "bad-field" in first["message"] and first["pid"] == os.getpid()
    # Each exchange ended with the broker's EOF, which follows its log line.
    closes = [r for r in records(broker) if "closing connection" in r["message"]]
    assert len(closes) == 10  # the burst; the other 5 are counted, not logged
    assert not [r for r in records(broker) if r["level"] == "DEBUG"]


async def test_text_lines_by_default(broker: BrokerProcess) -> None:
    await raw_exchange(broker.path, BAD)
    async with asyncio.timeout(TIMEOUT):
        while "closing connection" not in broker.log():
            await asyncio.sleep(0.02)
    line = next(x for x in broker.log().splitlines() if "closing connection" in x)
    assert " INFO aiobus.broker.server: closing connection " in line
