"""The README's quickstart, run as a new user would: each snippet is a file under
examples/quickstart/, the README shows exactly that file, and each runs against a real
broker found through ``$AIOBUS_SOCKET`` (the way ``aiobus.connect()`` finds one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

import aiobus

from .conftest import REAP_TIMEOUT, BrokerProcess
from .test_examples import Example

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
SNIPPETS = ("worker.py", "subscriber.py", "producer.py", "rpc.py", "embedded.py")

Start = Callable[[str], Awaitable[Example]]


async def test_the_readme_shows_each_file_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    assert sorted(p.name for p in QUICKSTART.glob("*.py")) == sorted(SNIPPETS)
    for name in SNIPPETS:
        match = re.search(rf"<!-- examples/quickstart/{re.escape(name)} -->\n```python\n"
                          r"(.*?)```\n", readme, re.S)
        assert match is not None, f"README shows no {name}"
        assert match[1] == (QUICKSTART / name).read_text(), f"README's {name} differs"


@pytest_asyncio.fixture
async def start(broker: BrokerProcess) -> AsyncIterator[Start]:
    started: list[Example] = []

    async def run(name: str) -> Example:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(QUICKSTART / name), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "AIOBUS_SOCKET": broker.path})
        example = Example(name, proc)
        started.append(example)
        return example

    try:
        yield run
    finally:
        for example in started:
            if example.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    example.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(example.proc.wait(), REAP_TIMEOUT)


async def test_worker_subscriber_and_producer_in_the_readme_order(
        start: Start, broker: BrokerProcess) -> None:
    worker = await start("worker.py")
    subscriber = await start("subscriber.py")
    async with aiobus.connect(broker.path) as bus:  # both registered before the producer
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            stats = await bus.stats()
            if (stats["queues"].get("jobs", {}).get("consumers") == 1
                    and len(stats["topics"]["subscriptions"]) == 1):
                break
            assert asyncio.get_running_loop().time() < deadline, stats
            await asyncio.sleep(0.02)
    assert await (await start("producer.py")).succeeds() == []
    for n in range(10):
        await worker.expect(rf"^job {{'n': {n}}} attempt 1$")
    await subscriber.expect(r"^weather\.hk {'celsius': 31}$")
    for example in (worker, subscriber):  # Ctrl-C, as the README says
        example.proc.send_signal(signal.SIGINT)
        await example.finish()


async def test_request_reply(start: Start) -> None:
    assert await (await start("rpc.py")).succeeds() == ["7"]


async def test_embedded_broker(start: Start) -> None:
    assert await (await start("embedded.py")).succeeds() == ["hello from inside"]
