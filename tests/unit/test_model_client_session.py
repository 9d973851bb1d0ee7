"""Model-based test of the reconnecting client against the real broker core, joined in
memory (h11's way: two sans-IO endpoints, no socket).

A hypothesis state machine drives a :class:`ClientConnection` with a session (a
``client_id``) and a :class:`BrokerCore` (through the fake-clock ``Driver``). The wire
between them is two lists of frames: what the client wrote and the broker has not read
yet, and what the broker wrote and the client has not read yet. Rules send (to an
unbounded queue, and to a queue of two that blocks its senders), let either side read
some of what is in flight, drain the bounded queue through a second, plain connection,
drop the connection (whatever is in flight on it is gone, in both directions: a SEND the
broker never read, or an OK the client never read), and reconnect.

The model is the README's promise: every confirmed send is in the queue exactly once,
however the drops fell; each send's waiter completes once, with OK; nothing is failed
that could be resent. At the end the machine reconnects if needed, runs both sides
until no send is pending, and drains every queue.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import msgpack
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from aiobus.client.connection import ClientConnection
from aiobus.errors import BusError
from aiobus.protocol import Op

from .helpers import Client, Driver

QUEUES = ("free", "tight")  # "tight": max_length 2, senders wait (overflow "block")


class Sink:
    def __init__(self) -> None:
        self.done: Counter[Any] = Counter()
        self.failed: list[tuple[Any, BusError]] = []
        self.welcomes = 0

    def completed(self, waiter: Any, result: Any) -> None:
        self.done[waiter] += 1

    def completed_all(self, waiters: list[Any]) -> None:
        for waiter in waiters:
            if waiter is not None:
                self.done[waiter] += 1

    def failed(self, waiter: Any, error: BusError) -> None:
        self.failed.append((waiter, error))

    def welcomed(self, info: dict[str, Any]) -> None:
        self.welcomes += 1

    def stream_failed(self, receiver: Any, error: BusError) -> None:
        raise AssertionError(f"no streams here: {error}")

    def flush_wanted(self) -> None:
        pass


def frames_of(data: list[bytes]) -> list[list[Any]]:
    return list(msgpack.Unpacker(io.BytesIO(b"".join(data)), raw=False))


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.driver = Driver()
        self.sink = Sink()
        self.client = ClientConnection(self.sink, client_id="model")
        self.to_broker: list[list[Any]] = []
        self.to_client: list[list[Any]] = []
        self.conn: int | None = None
        self.bodies: dict[int, bytes] = {}  # waiter label -> body
        self.labels = iter(range(1, 10**9))
        self.drained: list[bytes] = []
        admin = self.driver.client("admin")
        admin.ok(Op.DECLARE, "tight", {"max_length": 2, "overflow": "block"})
        self.consumer: Client = self.driver.client("consumer")
        self._dial()

    # -- the wire -------------------------------------------------------------------------

    def _dial(self) -> None:
        self.conn = self.driver.open()
        self.client.hello("model")
        self._write()
        self._broker_reads(len(self.to_broker))  # the HELLO
        self._client_reads(len(self.to_client))  # the WELCOME
        assert self.client.welcomed
        if self.sink.welcomes > 1:
            self.client.restore()

    def _write(self) -> None:
        self.to_broker.extend(frames_of(self.client.data_to_send()))

    def _broker_reads(self, n: int) -> None:
        assert self.conn is not None
        self._write()
        for frame in self.to_broker[:n]:
            self.driver.receive(self.conn, frame)
        del self.to_broker[:n]
        self.to_client.extend(self.driver.sink.take(self.conn))

    def _client_reads(self, n: int) -> None:
        data = b"".join(msgpack.packb(f, use_bin_type=True) for f in self.to_client[:n])
        del self.to_client[:n]
        self.client.receive_data(data)

    # -- rules ----------------------------------------------------------------------------

    @rule(queue=st.sampled_from(QUEUES))
    def send(self, queue: str) -> None:
        label = next(self.labels)
        body = b"m%d" % label
        self.bodies[label] = body
        self.client.send(queue, body, 0, None, None, None, waiter=label)

    @precondition(lambda self: self.conn is not None)
    @rule(n=st.integers(1, 8))
    def broker_reads(self, n: int) -> None:
        self._broker_reads(n)

    @precondition(lambda self: self.conn is not None)
    @rule(n=st.integers(1, 8))
    def client_reads(self, n: int) -> None:
        self._client_reads(n)

    @rule()
    def drain_tight(self) -> None:
        self._drain("tight")

    @precondition(lambda self: self.conn is not None)
    @rule()
    def drop(self) -> None:
        assert self.conn is not None
        self.driver.core.disconnect(self.conn, self.driver.now)
        self.conn = None
        self.to_broker.clear()
        self.to_client.clear()
        lost = self.client.connection_lost()
        assert lost == [], f"sends are resent, never failed: {lost}"

    @precondition(lambda self: self.conn is None)
    @rule()
    def reconnect(self) -> None:
        self._dial()

    # -- checks ---------------------------------------------------------------------------

    def _drain(self, queue: str) -> None:
        """Take everything ``queue`` holds through the plain consumer connection."""
        consumer = self.consumer
        sid = consumer.ok(Op.CONSUME, 100, queue, 1000)  # sid 100: not the client's
        del sid
        while True:
            delivers = consumer.take(Op.DELIVER)
            if not delivers:
                break
            for frame in delivers:
                self.drained.append(frame[3][2])
                consumer.receive(Op.ACK, 0, frame[2])
        consumer.ok(Op.CANCEL, 100)
        if self.conn is not None:  # admitted parked sends: their OKs
            self.to_client.extend(self.driver.sink.take(self.conn))

    def teardown(self) -> None:
        for _ in range(1000):
            if self.conn is None:
                self._dial()
            self._broker_reads(len(self.to_broker))
            self._client_reads(len(self.to_client))
            self._drain("tight")
            if not self.client.pending:
                break
        else:
            raise AssertionError(f"sends still pending: {self.client.pending}")
        self._drain("free")
        assert self.sink.failed == []
        assert all(count == 1 for count in self.sink.done.values()), self.sink.done
        assert set(self.sink.done) == set(self.bodies), "every send confirmed"
        counts = Counter(self.drained)
        duplicated = [body for body, n in counts.items() if n > 1]
        lost = set(self.bodies.values()) - counts.keys()
        assert not duplicated and not lost, (duplicated, lost)


TestSession = SessionMachine.TestCase
