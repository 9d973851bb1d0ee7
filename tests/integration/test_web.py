"""The broker's HTTP side against a real broker process: /metrics parsed by
prometheus_client against a known workload, the token and cross-site checks, the
dead-letter API, the optional extra, and Broker.serve() embedded."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

import aiobus

from .conftest import BrokerProcess, queue_stats
from .web_broker import WebBroker, start_web_broker

pytestmark = pytest.mark.asyncio
TIMEOUT = 10.0


@pytest.fixture
def web(broker_factory: Any) -> WebBroker:
    return start_web_broker(broker_factory)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def get(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
        return resp.status, await resp.text()


async def post(url: str, body: Any = None, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(
            url, json={} if body is None else body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
        return resp.status, await resp.text()


async def test_metrics_of_a_known_workload(web: WebBroker) -> None:
    async with aiobus.connect(web.broker.path, name="test") as bus:
        await bus.declare_queue("jobs", max_deliveries=3)
        for i in range(5):
            await bus.send("jobs", i)
        async with bus.consume("jobs", prefetch=3) as consumer:
            first = await asyncio.wait_for(anext(consumer), TIMEOUT)
            second = await asyncio.wait_for(anext(consumer), TIMEOUT)
            third = await asyncio.wait_for(anext(consumer), TIMEOUT)
            await first.ack()
            await second.reject("bad input")
            await third.nack(delay=0)
            # The two freed slots took the last two; the nacked one comes back after them.
            rest = [await asyncio.wait_for(anext(consumer), TIMEOUT) for _ in range(3)]
            assert [(m.id, m.attempt) for m in rest if m.attempt > 1] == [(third.id, 2)]
            await bus.publish("news", "x")
            status, text = await get(web.url + "metrics")
            assert status == 200
            got = samples(text)
            jobs = (("queue", "jobs"),)
            assert {name: got[(name, jobs)] for name in (
                "aiobus_queue_messages_ready", "aiobus_queue_messages_unacked",
                "aiobus_queue_consumers", "aiobus_queue_messages_published_total",
                "aiobus_queue_messages_delivered_total", "aiobus_queue_messages_acked_total",
                "aiobus_queue_messages_redelivered_total")} == {
                "aiobus_queue_messages_ready": 0, "aiobus_queue_messages_unacked": 3,
                "aiobus_queue_consumers": 1, "aiobus_queue_messages_published_total": 5,
                "aiobus_queue_messages_delivered_total": 6,
                "aiobus_queue_messages_acked_total": 1,
                "aiobus_queue_messages_redelivered_total": 1}
            assert got[("aiobus_queue_messages_dead_lettered_total",
                        (("queue", "jobs"), ("reason", "rejected")))] == 1
            assert got[("aiobus_queue_messages_ready", (("queue", "jobs.dlq"),))] == 1
            assert got[("aiobus_topic_messages_unrouted_total", ())] == 1
            assert got[("aiobus_connections", ())] == 1
            assert got[("aiobus_process_resident_memory_bytes", ())] > 1_000_000
            assert 0 <= got[("aiobus_event_loop_lag_seconds", ())] < 5
            # `aiobus stat --prometheus` prints the same families.
            cli = subprocess.run([sys.executable, "-m", "aiobus.cli.main", "stat",
                                  "--prometheus", "--socket", web.broker.path],
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert cli.returncode == 0, cli.stderr
            assert {f.name for f in text_string_to_metric_families(cli.stdout)} == {
                f.name for f in text_string_to_metric_families(text)}


async def test_token_file_origin_and_host_checks(web: WebBroker) -> None:
    mode = stat.S_IMODE(os.stat(web.token_path).st_mode)
    assert mode == 0o600 and len(web.token) >= 32
    async with aiobus.connect(web.broker.path) as bus:
        await bus.send("jobs.dlq", "x", headers={"x-original-queue": "jobs"})
        url = web.url + "api/queues/jobs.dlq/requeue"
        assert (await post(url))[0] == 401  # no token
        assert (await post(url, **{"X-Aiobus-Token": "wrong"}))[0] == 401
        own = web.url.rstrip("/")
        assert (await post(url, **{"X-Aiobus-Token": web.token,
                                   "Origin": "http://evil.example"}))[0] == 403
        assert (await get(web.url, Origin="http://evil.example"))[0] == 403
        assert (await get(web.url + "metrics", **{"Sec-Fetch-Site": "cross-site"}))[0] == 403
        assert (await get(web.url + "metrics", Host="evil.example"))[0] == 403  # rebinding
        assert (await queue_stats(bus, "jobs.dlq"))["ready"] == 1  # nothing happened
        status, text = await post(url, **{"X-Aiobus-Token": web.token, "Origin": own})
        assert (status, text) == (200, '{"requeued": 1}')
        assert (await queue_stats(bus, "jobs"))["ready"] == 1
        status, page = await get(web.url)  # read-only on loopback: no token needed
        assert status == 200 and str(web.token_path) in page and web.token not in page
    web.broker.terminate()
    assert not web.token_path.exists()


async def test_dead_letter_api_browses_without_changing_then_purges(web: WebBroker) -> None:
    async with aiobus.connect(web.broker.path) as bus:
        await bus.send("jobs", {"order": 7}, headers={"trace": "t1"})
        await bus.send("jobs", b"\x00\xffbinary")
        async with bus.consume("jobs", prefetch=2) as consumer:
            for _ in range(2):
                msg = await asyncio.wait_for(anext(consumer), TIMEOUT)
                await msg.reject("boom: KeyError 'x'")
        assert (await get(web.url + "api/queues/jobs.dlq/messages"))[0] == 401  # contents
        token = {"X-Aiobus-Token": web.token}
        status, text = await get(web.url + "api/queues/jobs.dlq/messages", **token)
        assert status == 200
        page = json.loads(text)
        assert page["ready"] == 2
        first, second = page["messages"]
        assert first["headers"]["x-reason-text"] == "boom: KeyError 'x'"
        assert first["headers"]["x-dead-reason"] == "rejected" and first["body"] == '{"order": 7}'
        shown = json.loads((await get(web.url + f"api/queues/jobs.dlq/messages/{second['id']}",
                                      **token))[1])
        assert (shown["shown_as"], shown["body"]) == ("hex", "00 ff 62 69 6e 61 72 79")
        stats = await queue_stats(bus, "jobs.dlq")
        assert (stats["ready"], stats["delivered"], stats["unacked"]) == (2, 0, 0)
        assert (await get(web.url + "api/queues/nosuch/messages", **token))[0] == 404
        assert "nosuch" not in (await bus.stats())["queues"]
        status, text = await post(web.url + "api/queues/jobs.dlq/purge",
                                  **{"X-Aiobus-Token": web.token})
        assert (status, text) == (200, '{"purged": 2}')


async def test_http_without_the_extra_names_it(short_tmp: Path) -> None:
    shadow = short_tmp / "shadow"
    (shadow / "aiohttp").mkdir(parents=True)
    (shadow / "aiohttp" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    path = short_tmp / "b.sock"
    result = subprocess.run(
        [sys.executable, "-m", "aiobus.cli.broker", "--socket", str(path), "--data-dir",
         str(short_tmp / "data"), "--http", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert result.returncode == 1
    assert "aiobus-ipc[web]" in result.stderr and "aiohttp" in result.stderr, result.stderr
    assert not path.exists()  # it failed before binding anything


async def test_http_address_is_checked() -> None:
    result = subprocess.run([sys.executable, "-m", "aiobus.cli.broker", "--http", ":80"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2 and "give an address" in result.stderr


async def test_no_http_by_default(broker: BrokerProcess) -> None:
    assert not Path(broker.path + ".token").exists()
    assert "dashboard" not in broker.log()


async def test_broker_serve_in_a_task_group(short_tmp: Path) -> None:
    broker = aiobus.Broker(short_tmp / "e.sock", http="127.0.0.1:0")
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(broker.serve)
            assert broker.http_url is not None and broker.token_path is not None
            async with aiobus.connect(short_tmp / "e.sock") as bus:
                await bus.send("q", 1)
            status, text = await get(broker.http_url + "metrics")
            assert status == 200 and 'aiobus_queue_messages_ready{queue="q"} 1' in text
            await broker.aclose()  # serve() returns, and the task group with it
    assert not Path(broker.token_path).exists()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(broker.http_url + "metrics")
