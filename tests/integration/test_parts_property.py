"""A property of the long reads that ``--fsync always`` confirms in parts (connection.py
``_feed_in_parts``, output.py ``_confirm_early``): whatever mix of frames a client writes
at once (durable and in-memory sends, a send the broker refuses, PINGs), every request is
answered exactly once, in request order, and the durable queue holds exactly the sends
that were confirmed, their records written (the journal has nothing pending by the time
the answers are in: STATS says so; that a confirmation waits for its sync is
test_group_commit.py's). Against a real broker process with the fsync helper,
over a real Unix socket; hypothesis picks the mixes, some shorter than a part, most longer.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiobus.protocol import Op

from .conftest import BrokerProcess
from .test_model_broker import Wire

KINDS = st.sampled_from(["durable", "durable", "durable", "memory", "bad", "ping"])


def answers(frames: list[list[Any]]) -> list[tuple[int, Any]]:
    """Each answer as (rid, "ok" | result | error code)."""
    return [(f[1], ("ok" if f[2] is None else f[2]) if f[0] == Op.OK else f[2])
            for f in frames if f[0] in (Op.OK, Op.ERROR)]


def test_any_burst_is_answered_once_in_order_and_synced(broker_factory: Any) -> None:
    broker: BrokerProcess = broker_factory("--fsync", "always")
    wire = Wire(broker.path)
    rids = itertools.count(1)
    try:
        wire.send([Op.HELLO, 1, {"client_id": "parts"}])
        wire.read_until(Op.WELCOME)
        for name, options in (("d", {"durable": True}), ("m", {})):
            rid = next(rids)
            wire.send([Op.DECLARE, rid, name, options])
            [ok] = wire.read_until(Op.OK, rid)  # with the queue's settings
            assert ok[2]["durable"] == bool(options)
        durable_sent = 0

        @settings(max_examples=25, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(kinds=st.one_of(st.lists(KINDS, min_size=1, max_size=64),  # one part
                               st.lists(KINDS, min_size=65, max_size=400)))
        def burst(kinds: list[str]) -> None:
            nonlocal durable_sent
            frames, expected = [], []
            for kind in kinds:
                rid = next(rids)
                if kind == "ping":
                    frames.append([Op.PING, rid])
                else:
                    queue = {"durable": "d", "memory": "m", "bad": "bad name!"}[kind]
                    frames.append([Op.SEND, rid, queue, b"x" * 100, 0, None, None, None])
                expected.append((rid, "invalid-name" if kind == "bad" else "ok"))
            rid = next(rids)  # a PING last: its OK ends the answers
            frames.append([Op.PING, rid])
            expected.append((rid, "ok"))
            wire.sock.sendall(b"".join(msgpack.packb(f) for f in frames))
            assert answers(wire.read_until(Op.OK, expected[-1][0])) == expected
            durable_sent += kinds.count("durable")
            rid = next(rids)
            wire.send([Op.STATS, rid])
            [(_, stats)] = answers(wire.read_until(Op.OK, rid))
            assert stats["queues"]["d"]["ready"] == durable_sent
            assert stats["journal"]["pending"] == 0

        burst()
    finally:
        wire.close()
