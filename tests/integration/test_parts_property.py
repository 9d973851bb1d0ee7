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
import socket
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiobus.protocol import Op

from .conftest import BrokerProcess

READ_TIMEOUT = 10.0
KINDS = st.sampled_from(["durable", "durable", "durable", "memory", "bad", "ping"])


class Wire:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READ_TIMEOUT)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.sock.sendall(msgpack.packb([Op.HELLO, 1, {"client_id": "parts"}]))
        assert self.answers(0) == []  # up to the WELCOME

    def answers(self, until: int) -> list[tuple[int, Any]]:
        """Read until rid ``until`` is answered (0: until WELCOME); each answer as
        (rid, "ok" | result | error code), an OK_RANGE as the OKs it stands for."""
        got: list[tuple[int, Any]] = []
        while True:
            for frame in self.unpacker:
                if frame[0] == Op.WELCOME and until == 0:
                    return got
                if frame[0] == Op.OK_RANGE:
                    got.extend((rid, "ok") for rid in range(frame[1], frame[2] + 1))
                elif frame[0] == Op.OK:
                    got.append((frame[1], "ok" if frame[2] is None else frame[2]))
                elif frame[0] == Op.ERROR:
                    got.append((frame[1], frame[2]))
                else:
                    raise AssertionError(f"unexpected frame {frame}")
                if got and got[-1][0] == until:
                    return got
            data = self.sock.recv(65536)
            assert data, f"connection closed; got {got}"
            self.unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()


def test_any_burst_is_answered_once_in_order_and_synced(broker_factory: Any) -> None:
    broker: BrokerProcess = broker_factory("--fsync", "always")
    wire = Wire(broker.path)
    rids = itertools.count(1)
    try:
        for name, options in (("d", {"durable": True}), ("m", {})):
            rid = next(rids)
            wire.sock.sendall(msgpack.packb([Op.DECLARE, rid, name, options]))
            [(answered, settings_)] = wire.answers(rid)  # OK with the queue's settings
            assert answered == rid and settings_["durable"] == bool(options)
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
            wire.sock.sendall(b"".join(msgpack.packb(f) for f in frames))
            assert wire.answers(expected[-1][0]) == expected
            durable_sent += kinds.count("durable")
            rid = next(rids)
            wire.sock.sendall(msgpack.packb([Op.STATS, rid]))
            [(_, stats)] = wire.answers(rid)
            assert stats["queues"]["d"]["ready"] == durable_sent
            assert stats["journal"]["pending"] == 0

        burst()
    finally:
        wire.close()
