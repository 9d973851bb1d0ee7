"""The Unix client's request timeouts on one loop timer (client/deadlines.py
``_Deadlines``), on a real event loop with deadlines a few milliseconds away."""

from __future__ import annotations

import asyncio

import pytest

from aiobus.client.unix import _Deadlines
from aiobus.errors import RequestTimeout


@pytest.mark.asyncio
async def test_answered_requests_leave_no_timer_work_and_the_heap_stays_bounded() -> None:
    loop = asyncio.get_running_loop()
    deadlines = _Deadlines(loop)
    late = loop.create_future()
    deadlines.add(0, loop.time() + 0.05, late, "q", 0.05)
    for token in range(1, 5001):  # answered at once: each leaves only a stale heap entry
        deadlines.add(token, loop.time() + 60, loop.create_future(), "q", 60)
        deadlines.discard(token)
    assert len(deadlines._heap) <= 2 * len(deadlines._live) + 1025
    with pytest.raises(RequestTimeout, match=r"within 0\.05 s"):
        await asyncio.wait_for(late, 10)
    assert deadlines._live == {}
    deadlines.close()
    assert deadlines._handle is None


@pytest.mark.asyncio
async def test_an_earlier_deadline_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    deadlines = _Deadlines(loop)
    slow, quick = loop.create_future(), loop.create_future()
    deadlines.add(1, loop.time() + 60, slow, "q", 60)
    deadlines.add(2, loop.time() + 0.02, quick, "q", 0.02)
    with pytest.raises(RequestTimeout):
        await asyncio.wait_for(quick, 10)
    assert not slow.done() and deadlines._at == pytest.approx(loop.time() + 60, abs=1)
    deadlines.close()
