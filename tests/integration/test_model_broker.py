"""The queue model of tests/unit/test_model_queues.py against a real ``aiobus-broker``.

A shorter variant: each example starts a broker process on a socket in a short temp dir
(and always stops it), and the machine talks msgpack frames over blocking Unix sockets.
There is no fake clock here, so nothing may depend on time: ack timeouts are long, NACKs
retry at once, no TTLs, and time never advances. What the broker writes to every
connection as the result of one frame is collected with a PING barrier on each
connection in turn (its OK follows everything the broker wrote there before processing
it); DELIVERs from several connections are put back in broker order by their tags,
which the broker hands out in delivery order. A lost connection is awaited in STATS
(polled from an observer connection that the model does not see) before the barrier.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from aiobus.broker.settings import DEFAULT_DEDUP_SIZE, DEFAULT_DEDUP_WINDOW
from aiobus.protocol import Op

from ..unit.test_model_queues import CLIENT_ID, QueueMachine, index
from .conftest import BrokerProcess

READ_TIMEOUT = 10.0  # seconds; every answer here comes within milliseconds
QUEUES: dict[str, dict[str, Any]] = {
    "qa": {"max_deliveries": 3, "ack_timeout": 600.0, "dead_letter": "qa.dlq"},
    "qb": {"max_deliveries": 2, "ack_timeout": 600.0, "dead_letter": None, "max_length": 3,
           "overflow": "dead-letter"},
    "qa.dlq": {"ack_timeout": 600.0},
}


class Wire:
    """One client connection: frames out, frames in, blocking with a timeout."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READ_TIMEOUT)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)

    def send(self, frame: list[Any]) -> None:
        self.sock.sendall(msgpack.packb(frame, use_bin_type=True))

    def read_until(self, op: int, rid: int | None = None) -> list[list[Any]]:
        """Frames up to and including the first of type ``op`` (with ``rid``); an
        OK_RANGE comes out as the OKs it stands for."""
        frames: list[list[Any]] = []
        while True:
            for frame in self.unpacker:
                if frame[0] == Op.OK_RANGE:
                    frames.extend([Op.OK, r, None] for r in range(frame[1], frame[2] + 1))
                else:
                    frames.append(frame)
                assert frames[-1][0] != Op.CLOSE, frames[-1]
            done = [i for i, f in enumerate(frames)
                    if f[0] == op and (rid is None or f[1] == rid)]
            if done:
                assert done[0] == len(frames) - 1, frames  # nothing read past it
                return frames
            data = self.sock.recv(65536)
            assert data, f"the broker closed the connection; got {frames}"
            self.unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()


class BrokerQueueMachine(QueueMachine):
    queue_options = QUEUES
    uid = os.getuid()
    exact_time = False
    # The broker's defaults (a run takes far less than 120 s: no id leaves by time).
    dedup_window, dedup_size = DEFAULT_DEDUP_WINDOW, DEFAULT_DEDUP_SIZE

    def __init__(self) -> None:
        self.wires: dict[int, Wire] = {}
        self.broker: BrokerProcess | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="ab-", dir="/tmp"))  # AF_UNIX: 107 bytes
        try:
            super().__init__()
        except BaseException:
            self.teardown()  # hypothesis only tears down a machine it got
            raise

    def teardown(self) -> None:
        for wire in self.wires.values():
            wire.close()
        if self.broker is not None:
            self.broker.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _core_queues(self) -> list[Any]:
        return []  # no core in this process to look into (test_limits measures the broker)

    # -- talking to the broker ----------------------------------------------------------

    def _start(self) -> None:
        self.broker = BrokerProcess(str(self.tmp / "b.sock"), self.tmp / "b.log")
        self.rids = itertools.count(1)
        self.observer = self._handshake()[1]
        self.wires[0] = self.observer  # closed with the others; conn ids start at 1

    @property
    def now(self) -> float:
        return 0.0  # unused: nothing here depends on time

    def _handshake(self) -> tuple[int, Wire]:
        assert self.broker is not None
        wire = Wire(self.broker.path)
        wire.send([Op.HELLO, 1, {"client_id": CLIENT_ID}])
        (welcome,) = wire.read_until(Op.WELCOME)
        return welcome[2]["conn"], wire

    def _connect(self) -> tuple[int, int]:
        conn, wire = self._handshake()
        self.wires[conn] = wire
        return conn, os.getpid()

    def _barrier(self) -> list[tuple[int, list[Any]]]:
        """PING every connection in turn: what the broker wrote to each meanwhile, the
        DELIVERs of all of them in broker order (by tag) after the other frames."""
        others: list[tuple[int, list[Any]]] = []
        delivers: list[tuple[int, list[Any]]] = []
        for conn, wire in sorted(self.wires.items()):
            if wire is self.observer:
                continue
            rid = next(self.rids)
            wire.send([Op.PING, rid])
            for frame in wire.read_until(Op.OK, rid)[:-1]:
                (delivers if frame[0] == Op.DELIVER else others).append((conn, frame))
        return others + sorted(delivers, key=lambda entry: entry[1][2])

    def _exchange(self, conn: int, frame: list[Any]) -> list[tuple[int, list[Any]]]:
        self.wires[conn].send(frame)
        return self._barrier()

    def _stats(self) -> dict[str, Any]:
        rid = next(self.rids)
        self.observer.send([Op.STATS, rid])
        (ok,) = self.observer.read_until(Op.OK, rid)
        result: dict[str, Any] = ok[2]
        return result

    def _lose(self, conn: int) -> list[tuple[int, list[Any]]]:
        self.wires.pop(conn).close()
        deadline = time.monotonic() + READ_TIMEOUT
        while any(c["conn"] == conn for c in self._stats()["connections"]):
            assert time.monotonic() < deadline, f"connection {conn} still in STATS"
            time.sleep(0.002)
        return self._barrier()

    def _queue_stats(self) -> dict[str, Any]:
        return dict(self._stats()["queues"])

    def _peek(self, name: str) -> None:
        return None  # checked in the core's model; over the wire it would double the time

    def _closed(self) -> Any:
        return None  # a CLOSE fails Wire.read_until

    def _tidy(self) -> None:
        pass

    # -- rules: those of QueueMachine without time -----------------------------------

    def tick(self, dt: float) -> None:
        raise AssertionError("no fake clock here")

    @rule(c=index, queue=st.sampled_from(["qa", "qb"]))
    def send(self, c: int, queue: str) -> None:
        super().send(c, queue, None)

    @rule(c=index, queue=st.sampled_from(["qa", "qb"]), resend=st.none() | index)
    def send_once(self, c: int, queue: str, resend: int | None) -> None:  # type: ignore[override]
        super().send_once(c, queue, None, resend)

    @precondition(QueueMachine._can_answer)
    @rule(verb=st.sampled_from(["ack", "nack", "reject", "extend"]), i=index,
          wrong_conn=st.booleans(), delay=st.sampled_from([None, 0]),
          reason=st.sampled_from([None, "why"]))
    def answer(self, verb: str, i: int, wrong_conn: bool, delay: float | None,
               reason: str | None) -> None:
        super().answer(verb, i, wrong_conn, delay, reason, 600.0)


BrokerQueueMachine.TestCase.settings = settings(
    settings.default,
    max_examples=max(3, settings.default.max_examples // 5),
    stateful_step_count=settings.default.stateful_step_count,
)
TestBrokerQueueModel = BrokerQueueMachine.TestCase
# 30 examples, each with a broker process of its own: ~25 s on a quiet machine with
# `make test`'s 4 workers, over 60 s on a loaded one. The limit is for hangs.
TestBrokerQueueModel.pytestmark = [pytest.mark.timeout(240)]
