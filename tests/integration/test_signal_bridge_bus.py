"""The signal bridge against a real broker: a real signal becomes a real topic message."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import aiobus
from aiobus.bridges import signals_to_bus

pytestmark = pytest.mark.asyncio


async def test_a_signal_publishes_the_state_the_service_reports(bus: aiobus.Bus) -> None:
    state = {"jobs": 0}
    async with bus.subscribe("svc.alice.state") as watcher:
        async with signals_to_bus(
            bus, {signal.SIGUSR1: "svc.alice.state"},
            body=lambda signum: {"jobs": state["jobs"], "signal": signum.name},
        ):
            state["jobs"] = 3
            os.kill(os.getpid(), signal.SIGUSR1)
            msg = await asyncio.wait_for(anext(watcher), 5)
    assert msg.body == {"jobs": 3, "signal": "SIGUSR1"}
    assert msg.headers["signal"] == "SIGUSR1" and msg.headers["pid"] == str(os.getpid())
    assert msg.headers["count"] == "1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored
