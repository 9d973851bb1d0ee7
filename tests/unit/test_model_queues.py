"""Model-based test of the broker core's queues (docs/PROTOCOL.md §8 and §11).

A hypothesis ``RuleBasedStateMachine`` drives a sans-IO :class:`BrokerCore` through the
fake-clock :class:`Driver` with several connections and consumers (some on the same
queue and connection): SEND, CONSUME, ACK, ACK_MANY, NACK, REJECT, EXTEND, CANCEL, lost
connections and the passing of time. A small reference model of each queue follows the
*documented* semantics and predicts every answer, the attempt and dead-letter headers of
every DELIVER, and the STATS counters; each step is checked against it.

What the model does not predict it checks as a constraint (so another legal choice by
the broker passes): which consumer gets a message (any with a free slot and no zombie
lease), and the order of messages that came back together where the protocol leaves it
open (the leases of a lost connection with several consumers; everything that happened
at one instant of the clock). Such messages form a *batch* in the model's ready list: a
DELIVER may take any message of the batch at the head, or, while the step that made a
*floating* batch runs (the broker pumps after each event in it, so later events can put
messages ahead of ones already taken), any message of that batch or the head behind it.

Times are multiples of 0.5 s, exact in binary, so deadlines meet exactly and the model
sees the same ties the broker does.

Resends (§8 "Resends and deduplication"): every connection says HELLO with one
``client_id``, as one client reconnecting would, and :meth:`QueueMachine.send_once`
sends a new seq or resends an earlier one (to the queue it first went to, with a new
body: the broker looks at the id only). The model keeps each queue's window (ids
accepted in the last ``dedup_window`` seconds, the ``dedup_size`` newest) and predicts:
a resend of an id in it is answered OK, counted in ``duplicates``, and adds nothing;
any other is a new message with that same id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aiobus.broker.core import BrokerCore
from aiobus.broker.queue_state import MESSAGE_OVERHEAD, MsgState, QMsg, Queue, Run
from aiobus.protocol import Op

from .helpers import Driver, RecordingSink

# DECLARE options of the queues the machine uses. "qa" retries (at once, then after
# 1.5 s), expires and dead-letters into "qa.dlq"; "qb" discards its dead letters and
# holds at most 3 waiting messages, dead-lettering the oldest when a SEND finds it full.
QUEUES: dict[str, dict[str, Any]] = {
    "qa": {"max_deliveries": 4, "ack_timeout": 4.0, "retry_delays": [0, 1.5],
           "dead_letter": "qa.dlq", "ttl": 9.0},
    "qb": {"max_deliveries": 2, "ack_timeout": 3.0, "dead_letter": None, "max_length": 3,
           "overflow": "dead-letter"},
    "qa.dlq": {"ack_timeout": 6.0},
}
CLIENT_ID = "model"  # every connection's: one client that reconnects
DEDUP_WINDOW = 10.0  # small, so that runs see ids leave the window by time ...
DEDUP_SIZE = 4  # ... and by number
MAX_CONNECTIONS = 4
MAX_CONSUMERS = 6
UID = 1000
GRID = 0.5  # seconds: every time and duration here is a multiple


class LoggingSink(RecordingSink):
    """A :class:`RecordingSink` that also logs every frame in the order the core wrote
    it, across connections (the model checks delivery order over all consumers)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, list[Any]]] = []

    def send(self, conn: int, frame: list[Any]) -> None:
        super().send(conn, frame)
        self.log.append((conn, frame))

    def close(self, conn: int, code: str, message: str) -> None:
        super().close(conn, code, message)
        self.log.append((conn, [Op.CLOSE, code, message]))


def make_driver() -> tuple[Driver, LoggingSink]:
    """A :class:`Driver` whose core writes to a :class:`LoggingSink`."""
    driver = Driver()
    sink = LoggingSink()
    driver.sink = sink
    driver.core = BrokerCore(sink, id_prefix="t", dedup_window=DEDUP_WINDOW,
                             dedup_size=DEDUP_SIZE)
    return driver, sink


@dataclass(frozen=True)
class Spec:
    """A queue's settings, as the model needs them."""

    max_deliveries: int | None
    ack_timeout: float
    retry_delays: tuple[float, ...]
    dead_letter: str | None
    ttl: float | None
    max_length: int | None

    @classmethod
    def of(cls, name: str, options: dict[str, Any]) -> Spec:
        dlq = name.endswith(".dlq")  # PROTOCOL.md §8 "Creation and defaults"
        return cls(
            max_deliveries=options.get("max_deliveries", None if dlq else 5),
            ack_timeout=float(options.get("ack_timeout", 30.0)),
            retry_delays=tuple(options.get("retry_delays", ())),
            dead_letter=options.get("dead_letter", None if dlq else name + ".dlq"),
            ttl=options.get("ttl"),
            max_length=options.get("max_length"),
        )

    def retry_delay(self, failures: int) -> float:
        delays = self.retry_delays
        return float(delays[min(failures, len(delays)) - 1]) if delays else 0.0


@dataclass(eq=False)
class Msg:
    """One message in one queue (a dead letter is a new Msg in the dead-letter queue)."""

    queue: str
    body: bytes
    expires: float | None
    state: str = "ready"  # ready, leased, delayed or gone
    failures: int = 0
    delay_end: float = 0.0
    id: str | None = None  # learnt from its first DELIVER (or from the original)
    last_reason: str | None = None
    last_pid: int | None = None
    headers: dict[str, str] | None = None  # what a dead letter's DELIVER carries


@dataclass(eq=False)
class QueueModel:
    name: str
    spec: Spec
    ready: list[tuple[Msg, int | None]] = field(default_factory=list)  # (msg, batch)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("sent", "delivered", "acked", "dead_lettered", "expired", "discarded",
         "duplicates"), 0))
    # The deduplication window: resendable ids (by seq) -> when accepted, oldest first.
    window: dict[int, float] = field(default_factory=dict)

    def remove_ready(self, msg: Msg) -> None:
        (index,) = [i for i, (m, _) in enumerate(self.ready) if m is msg]
        del self.ready[index]


@dataclass(eq=False)
class Lease:
    conn: int
    sid: int
    msg: Msg
    deadline: float
    zombie: bool = False


@dataclass(eq=False)
class Consumer:
    queue: str
    prefetch: int
    tags: list[int] = field(default_factory=list)  # leases and zombies, delivery order


index = st.integers(min_value=0, max_value=1 << 16)


class QueueMachine(RuleBasedStateMachine):
    """The machine on the sans-IO core. The methods under "talking to the broker" are
    all it does to reach it; tests/integration/test_model_broker.py replaces them to
    run a shorter variant against a real broker process."""

    queue_options = QUEUES
    uid = UID
    exact_time = True  # the model knows the broker's clock (x-dead-time is checked)
    dedup_window, dedup_size = DEDUP_WINDOW, DEDUP_SIZE  # as the broker under test has

    def __init__(self) -> None:
        super().__init__()
        self._start()
        self.queues = {name: QueueModel(name, Spec.of(name, options))
                       for name, options in self.queue_options.items()}
        self.msgs: dict[tuple[str, bytes], Msg] = {}
        self.ids: dict[str, bytes] = {}  # message id -> body: ids are unique
        self.conns: dict[int, int] = {}  # open connection -> its pid
        self.sids: dict[int, itertools.count[int]] = {}
        self.consumers: dict[tuple[int, int], Consumer] = {}
        self.leases: dict[int, Lease] = {}
        self.old_tags: list[int] = []  # answered, released or dropped: now unknown
        self.seen_tags: set[int] = set()
        self.rids = itertools.count(1)
        self.bodies = itertools.count(1)
        self.batches = itertools.count(1)
        self.pids = itertools.count(5000)
        self.seqs = itertools.count(1)
        self.resendable: list[tuple[str, int]] = []  # (queue, seq) sent with a seq
        # Per step: batches whose order is open while the step runs, consumers whose
        # zombie appeared at this instant (and which may have been served before it),
        # and, when ``relaxed``, what goes to the front is collected into one batch.
        self.floating: set[int] = set()
        self.lenient: set[tuple[int, int]] = set()
        self.relaxed = False
        self.front_pending: dict[str, list[Msg]] = {}
        self.back_pending: dict[str, list[Msg]] = {}
        admin = self._open()
        for name, options in self.queue_options.items():
            rid = next(self.rids)
            entries = self._exchange(admin, [Op.DECLARE, rid, name, options])
            assert [f[:2] for _, f in entries] == [[Op.OK, rid]], entries
        self._open()

    # -- talking to the broker ----------------------------------------------------------

    def _start(self) -> None:
        self.d, self.sink = make_driver()

    @property
    def now(self) -> float:
        return self.d.now

    def _exchange(self, conn: int, frame: list[Any]) -> list[tuple[int, list[Any]]]:
        """Feed one frame; return what the core wrote (to any connection) meanwhile."""
        start = len(self.sink.log)
        self.d.receive(conn, frame)
        return self.sink.log[start:]

    def _connect(self) -> tuple[int, int]:
        """A new connection after its handshake: (connection id, peer pid)."""
        pid = next(self.pids)
        conn = self.d.open(pid=pid, uid=self.uid)
        entries = self._exchange(conn, [Op.HELLO, 1, {"client_id": CLIENT_ID}])
        assert [(c, f[0]) for c, f in entries] == [(conn, Op.WELCOME)], entries
        return conn, pid

    def _lose(self, conn: int) -> list[tuple[int, list[Any]]]:
        """The client side of ``conn`` goes away; what the broker wrote meanwhile."""
        start = len(self.sink.log)
        self.d.core.disconnect(conn, self.now)
        return self.sink.log[start:]

    def _advance_to(self, t: float) -> None:
        """The broker's clock reaches ``t`` (on the model's clock): run what is due."""
        self.d.advance_to(t)

    def _queue_stats(self) -> dict[str, Any]:
        return dict(self.d.core.stats()["queues"])

    def _core_queues(self) -> list[Queue]:
        """The core's own queues, for invariants on its internals."""
        return list(self.d.core.queues.queues.values())

    def _peek(self, name: str) -> dict[str, Any] | None:
        """PEEK of every ready message of ``name`` (None: not checked)."""
        return self.d.core.peek(name, {"limit": 1000})

    def _tidy(self) -> None:
        self.sink.inbox.clear()  # the model reads the log; the inboxes only grow

    def _closed(self) -> Any:
        """Connections the broker closed (none may be)."""
        return self.sink.closed

    def _open(self) -> int:
        conn, pid = self._connect()
        self.conns[conn] = pid
        self.sids[conn] = itertools.count(1)
        return conn

    @staticmethod
    def _answer(entries: list[tuple[int, list[Any]]], conn: int, rid: int,
                code: str | None) -> None:
        """The request ``rid`` of ``conn`` got OK (``code`` None) or ERROR ``code``."""
        answers = [f for c, f in entries
                   if c == conn and f[0] in (Op.OK, Op.ERROR) and f[1] == rid]
        assert len(answers) == 1, (rid, entries)
        if code is None:
            assert answers[0][0] == Op.OK, answers[0]
        else:
            assert answers[0][:3] == [Op.ERROR, rid, code], (code, answers[0])

    def _pick_conn(self, i: int) -> int:
        conns = sorted(self.conns)
        return conns[i % len(conns)]

    # -- the model's transitions --------------------------------------------------------

    def _push_front(self, msgs: list[Msg]) -> None:
        """Messages back to the front of their queue, in the order given."""
        for msg in msgs:
            msg.state = "ready"
        if self.relaxed:
            for msg in msgs:
                self.front_pending.setdefault(msg.queue, []).append(msg)
        elif msgs:
            self.queues[msgs[0].queue].ready[0:0] = [(m, None) for m in msgs]

    def _push_back(self, msg: Msg) -> None:
        msg.state = "ready"
        self.back_pending.setdefault(msg.queue, []).append(msg)

    def _flush(self) -> None:
        """End of a step's model effects: place what came back or arrived."""
        for name, msgs in self.front_pending.items():
            batch = next(self.batches)
            self.floating.add(batch)
            self.queues[name].ready[0:0] = [(m, batch) for m in msgs]
        for name, msgs in self.back_pending.items():
            batch = next(self.batches) if len(msgs) > 1 else None
            self.queues[name].ready.extend((m, batch) for m in msgs)
        self.front_pending, self.back_pending = {}, {}

    def _requeue(self, msg: Msg) -> None:
        """Back to the front now: expires instead if its TTL has passed (§8 TTL)."""
        if msg.expires is not None and msg.expires <= self.now:
            self._expire(msg)
        else:
            self._push_front([msg])

    def _expire(self, msg: Msg) -> None:
        self.queues[msg.queue].counters["expired"] += 1
        self._dead_letter(msg, "expired", None)

    def _fail(self, msg: Msg, delay: float | None, reason: str | None, pid: int) -> None:
        """A failed attempt (NACK, ack timeout, connection lost): §8 "Attempts"."""
        spec = self.queues[msg.queue].spec
        msg.failures += 1
        msg.last_reason = reason
        msg.last_pid = pid
        if spec.max_deliveries is not None and msg.failures >= spec.max_deliveries:
            self._dead_letter(msg, "max-deliveries", reason)
            return
        if delay is None:
            delay = spec.retry_delay(msg.failures)
        if delay <= 0:
            self._requeue(msg)
        elif msg.expires is not None and msg.expires <= self.now:
            self._expire(msg)  # §8 TTL: a retry delay never stretches a TTL
        else:
            msg.state = "delayed"
            msg.delay_end = self.now + delay

    def _dead_letter(self, msg: Msg, reason: str, text: str | None) -> None:
        """§8 "Dead letters": to the dead-letter queue with x- headers, or discarded."""
        queue = self.queues[msg.queue]
        msg.state = "gone"
        target = queue.spec.dead_letter
        if target is None:
            queue.counters["discarded"] += 1
            return
        queue.counters["dead_lettered"] += 1
        headers = {"x-original-queue": msg.queue, "x-dead-reason": reason,
                   "x-attempts": str(msg.failures)}
        if self.exact_time:
            headers["x-dead-time"] = f"{self.now:.6f}"
        text = text if text is not None else msg.last_reason
        if text is not None:
            headers["x-reason-text"] = text
        if msg.last_pid is not None:
            headers["x-consumer-pid"] = str(msg.last_pid)
            headers["x-consumer-uid"] = str(self.uid)
        dlq = self.queues[target]
        ttl = dlq.spec.ttl  # a dead letter does not inherit the TTL
        letter = Msg(target, msg.body, None if ttl is None else self.now + ttl, id=msg.id,
                     headers=headers)
        assert (target, msg.body) not in self.msgs
        self.msgs[(target, msg.body)] = letter
        dlq.counters["sent"] += 1
        self._push_back(letter)

    def _check_lease(self, conn: int, tag: int) -> str | None:
        """What the core answers to ``conn`` about ``tag``: None for a live lease; an
        error code otherwise (a zombie is dropped, freeing its slot)."""
        lease = self.leases.get(tag)
        if lease is None or lease.conn != conn:
            return "lease-unknown"
        if lease.zombie:
            self._drop_lease(tag)
            return "lease-expired"
        return None

    def _drop_lease(self, tag: int) -> Lease:
        lease = self.leases.pop(tag)
        self.consumers[lease.conn, lease.sid].tags.remove(tag)
        self.old_tags.append(tag)
        return lease

    def _ack(self, tag: int) -> None:
        lease = self._drop_lease(tag)
        lease.msg.state = "gone"
        self.queues[lease.msg.queue].counters["acked"] += 1

    # -- checking what the core wrote -----------------------------------------------------

    def _allowed(self, queue: QueueModel) -> set[int]:
        """ids (``id()``) of the messages a DELIVER from ``queue`` may carry now."""
        allowed = {id(m) for m, b in queue.ready if b in self.floating}
        rest = [(m, b) for m, b in queue.ready if b not in self.floating]
        if rest:
            head, batch = rest[0]
            if batch is None:
                allowed.add(id(head))
            else:
                allowed.update(id(m) for m, _ in itertools.takewhile(
                    lambda entry: entry[1] == batch, rest))
        return allowed

    def _deliveries(self, entries: list[tuple[int, list[Any]]]) -> None:
        """Check and apply every DELIVER in ``entries``, in the order written."""
        self._flush()
        for conn, frame in entries:
            if frame[0] == Op.DELIVER:
                self._deliver(conn, frame)
            else:
                assert frame[0] in (Op.OK, Op.ERROR, Op.WELCOME), frame
        self.floating.clear()
        self.lenient.clear()

    def _deliver(self, conn: int, frame: list[Any]) -> None:
        _, sid, tag, message, attempt, reply_to = frame
        consumer = self.consumers.get((conn, sid))
        assert consumer is not None, (
            f"DELIVER to consumer {sid} of connection {conn}, which is gone: {frame}")
        mid, name, body, kind, headers, _ = message
        assert name == consumer.queue, frame
        queue = self.queues[name]
        msg = self.msgs.get((name, body))
        assert msg is not None and msg.state == "ready", (
            f"DELIVER of {body!r} from {name}, which is {msg and msg.state}: {frame}")
        assert id(msg) in self._allowed(queue), (
            f"DELIVER of {body!r} out of order; ready: {[(m.body, b) for m, b in queue.ready]}")
        assert attempt == msg.failures + 1, (frame, msg)
        assert (kind, reply_to) == (0, None), frame
        assert tag not in self.seen_tags, f"tag {tag} delivered twice"
        self.seen_tags.add(tag)
        if msg.id is None:
            msg.id = mid
        assert mid == msg.id, (frame, msg.id)
        if not mid.startswith(CLIENT_ID + "-"):  # a resend outside the window reuses one
            assert self.ids.setdefault(mid, body) == body, f"id {mid} names two messages"
        if not self.exact_time and headers is not None:
            headers = dict(headers)
            float(headers.pop("x-dead-time"))
        assert headers == msg.headers, (headers, msg.headers)
        assert len(consumer.tags) < consumer.prefetch, (
            f"consumer {sid} of connection {conn} got more leases than prefetch "
            f"{consumer.prefetch}")
        assert (conn, sid) in self.lenient or not any(
            self.leases[t].zombie for t in consumer.tags), (
            f"consumer {sid} of connection {conn} holds a zombie lease and got {frame}")
        queue.remove_ready(msg)
        msg.state = "leased"
        self.leases[tag] = Lease(conn, sid, msg, self.now + queue.spec.ack_timeout)
        consumer.tags.append(tag)
        queue.counters["delivered"] += 1

    # -- rules ----------------------------------------------------------------------

    @initialize(consumers=st.lists(
        st.tuples(index, st.sampled_from(["qa", "qa", "qb", "qa.dlq"]), st.integers(1, 3)),
        min_size=1, max_size=3))
    def start_consumers(self, consumers: list[tuple[int, str, int]]) -> None:
        """Most runs need consumers from the start to get far."""
        for c, queue, prefetch in consumers:
            self.consume(c, queue, prefetch)

    @precondition(lambda self: len(self.conns) < MAX_CONNECTIONS)
    @rule()
    def connect(self) -> None:
        self._open()

    @rule(c=index, queue=st.sampled_from(["qa", "qb"]),
          ttl=st.sampled_from([None, None, 2.0, 5.0, 20.0]))
    def send(self, c: int, queue: str, ttl: float | None) -> None:
        self._send(c, queue, ttl, None)

    @rule(c=index, queue=st.sampled_from(["qa", "qb"]),
          ttl=st.sampled_from([None, 2.0, 20.0]), resend=st.none() | index)
    def send_once(self, c: int, queue: str, ttl: float | None, resend: int | None) -> None:
        """A SEND with a seq: a new one, or (``resend``) one sent with a seq before, to
        the queue it went to; a duplicate while its id is in that queue's window."""
        if resend is None or not self.resendable:
            self._send(c, queue, ttl, next(self.seqs))
            return
        queue, seq = self.resendable[resend % len(self.resendable)]
        model = self.queues[queue]
        self._trim_window(model)
        if seq in model.window:
            conn, rid = self._pick_conn(c), next(self.rids)
            entries = self._exchange(conn, [Op.SEND, rid, queue, b"again", 0, None, ttl, None,
                                            None, seq])
            self._answer(entries, conn, rid, None)
            model.counters["duplicates"] += 1
            self._deliveries(entries)
        else:
            self._send(c, queue, ttl, seq)

    def _trim_window(self, model: QueueModel) -> None:
        for seq, at in list(model.window.items()):
            if at > self.now - self.dedup_window:
                break
            del model.window[seq]

    def _send(self, c: int, queue: str, ttl: float | None, seq: int | None) -> None:
        conn = self._pick_conn(c)
        model = self.queues[queue]
        spec = model.spec
        waiting = len(model.ready) + sum(m.state == "delayed" for m in self._in(queue))
        full = spec.max_length is not None and waiting >= spec.max_length
        if full and model.ready and model.ready[0][1] is not None:
            # Which message of a batch the broker holds first is open, so which one a
            # full queue drops would be too: send elsewhere (a resend: not at all).
            if seq is not None and (queue, seq) in self.resendable:
                return
            queue, model, spec, full = "qa", self.queues["qa"], self.queues["qa"].spec, False
        body = b"m%d" % next(self.bodies)
        rid = next(self.rids)
        frame = [Op.SEND, rid, queue, body, 0, None, ttl, None]
        if seq is not None:
            frame += [None, seq]
        entries = self._exchange(conn, frame)
        self._answer(entries, conn, rid, None)
        if ttl is None:
            ttl = spec.ttl
        msg = Msg(queue, body, None if ttl is None else self.now + ttl,
                  id=None if seq is None else f"{CLIENT_ID}-{seq}")
        if seq is not None:  # accepted (even when dead-lettered at once): in the window
            self._trim_window(model)
            model.window[seq] = self.now
            if len(model.window) > self.dedup_size:
                del model.window[next(iter(model.window))]
            if (queue, seq) not in self.resendable:
                self.resendable.append((queue, seq))
        self.msgs[(queue, body)] = msg
        model.counters["sent"] += 1
        if not full:
            self._push_back(msg)
        elif model.ready:  # §8 overflow "dead-letter": the oldest ready one goes
            oldest = model.ready[0][0]
            model.remove_ready(oldest)
            self._dead_letter(oldest, "overflow", None)
            self._push_back(msg)
        else:  # only delayed messages: the new one goes
            self._dead_letter(msg, "overflow", None)
        self._deliveries(entries)

    @precondition(lambda self: len(self.consumers) < MAX_CONSUMERS)
    @rule(c=index, queue=st.sampled_from(["qa", "qa", "qb", "qa.dlq"]),
          prefetch=st.integers(1, 3))
    def consume(self, c: int, queue: str, prefetch: int) -> None:
        conn = self._pick_conn(c)
        sid = next(self.sids[conn])
        rid = next(self.rids)
        entries = self._exchange(conn, [Op.CONSUME, rid, sid, queue, prefetch])
        self._answer(entries, conn, rid, None)
        first = [i for i, (c2, f) in enumerate(entries)
                 if c2 == conn and f[0] == Op.DELIVER and f[1] == sid]
        ok = [i for i, (c2, f) in enumerate(entries) if c2 == conn and f[0] == Op.OK]
        assert not first or ok[0] < first[0], "CONSUME's OK must precede its first DELIVER"
        self.consumers[conn, sid] = Consumer(queue, prefetch)
        self._deliveries(entries)

    def _pick_tag(self, i: int, wrong_conn: bool) -> tuple[int, int]:
        """A tag to answer (live, zombie, or one answered before) and the connection to
        answer it from: its own, or with ``wrong_conn`` another one."""
        candidates = sorted(self.leases) + self.old_tags[-3:]
        tag = candidates[i % len(candidates)]
        owner = self.leases[tag].conn if tag in self.leases else None
        if owner in self.conns and not wrong_conn:
            return owner, tag
        others = [c for c in sorted(self.conns) if c != owner] or sorted(self.conns)
        return others[i % len(others)], tag

    def _can_answer(self) -> bool:
        return bool(self.leases or self.old_tags)

    @precondition(_can_answer)
    @rule(verb=st.sampled_from(["ack", "nack", "reject", "extend"]), i=index,
          wrong_conn=st.booleans(), delay=st.sampled_from([None, 0, 0.0, 0.5, 2.0]),
          reason=st.sampled_from([None, "why"]), seconds=st.sampled_from([0.5, 2.0, 10.0]))
    def answer(self, verb: str, i: int, wrong_conn: bool, delay: float | None,
               reason: str | None, seconds: float) -> None:
        """ACK, NACK (delay None: the schedule; 0: at once), REJECT or EXTEND one tag:
        a live lease, a zombie, or one answered before; from its connection or not."""
        conn, tag = self._pick_tag(i, wrong_conn)
        rid = next(self.rids)
        frame = {"ack": [Op.ACK, rid, tag], "nack": [Op.NACK, rid, tag, delay, reason],
                 "reject": [Op.REJECT, rid, tag, reason],
                 "extend": [Op.EXTEND, rid, tag, seconds]}[verb]
        entries = self._exchange(conn, frame)
        code = self._check_lease(conn, tag)
        self._answer(entries, conn, rid, code)
        if code is None:
            if verb == "ack":
                self._ack(tag)
            elif verb == "nack":
                lease = self._drop_lease(tag)
                self._fail(lease.msg, delay, reason, self.conns[conn])
            elif verb == "reject":
                msg = self._drop_lease(tag).msg
                msg.failures += 1  # a REJECT is a failed attempt too
                msg.last_pid = self.conns[conn]
                self._dead_letter(msg, "rejected", reason)
            else:
                self.leases[tag].deadline = self.now + seconds
        self._deliveries(entries)

    @precondition(_can_answer)
    @rule(picks=st.lists(index, min_size=1, max_size=4), c=index)
    def ack_many(self, picks: list[int], c: int) -> None:
        conn = self._pick_conn(c)
        own = sorted(t for t, lease in self.leases.items() if lease.conn == conn)
        candidates = own + self.old_tags[-2:] + sorted(self.leases)[:1]
        tags = [candidates[i % len(candidates)] for i in picks]
        entries = self._exchange(conn, [Op.ACK_MANY, tags])
        errors = []
        for tag in tags:
            code = self._check_lease(conn, tag)
            if code is None:
                self._ack(tag)
            else:
                errors.append(code)
        got = [f for c2, f in entries if c2 == conn and f[0] in (Op.OK, Op.ERROR)]
        assert [f[:3] for f in got] == [[Op.ERROR, 0, code] for code in errors], (tags, got)
        self._deliveries(entries)

    @precondition(lambda self: self.consumers)
    @rule(i=index)
    def cancel(self, i: int) -> None:
        conn, sid = sorted(self.consumers)[i % len(self.consumers)]
        rid = next(self.rids)
        entries = self._exchange(conn, [Op.CANCEL, rid, sid])
        self._answer(entries, conn, rid, None)
        consumer = self.consumers.pop((conn, sid))
        back = []
        for tag in consumer.tags:  # delivery order
            lease = self.leases.pop(tag)
            self.old_tags.append(tag)
            if lease.zombie:
                continue  # forgotten
            msg = lease.msg
            if msg.expires is not None and msg.expires <= self.now:
                self._expire(msg)  # released after its TTL: expires at once
            else:
                back.append(msg)  # released: no attempt counted
        self._push_front(back)
        self._deliveries(entries)

    @rule(c=index)
    def cancel_unknown(self, c: int) -> None:
        conn = self._pick_conn(c)
        rid = next(self.rids)
        entries = self._exchange(conn, [Op.CANCEL, rid, 999])
        self._answer(entries, conn, rid, "unknown-subscription")
        self._deliveries(entries)

    @rule(c=index)
    def disconnect(self, c: int) -> None:
        conn = self._pick_conn(c)
        entries = self._lose(conn)
        pid = self.conns.pop(conn)
        # §8 Attempts: a lost connection counts one attempt for every held lease; its
        # consumers' leases come back ahead of what waits (in an order left open here).
        self.relaxed = True
        mine = sorted(key for key in self.consumers if key[0] == conn)
        tags = sorted(t for key in mine for t in self.consumers[key].tags)
        for key in mine:
            del self.consumers[key]
        for tag in tags:
            lease = self.leases.pop(tag)
            self.old_tags.append(tag)
            if not lease.zombie:
                self._fail(lease.msg, None, "connection-lost", pid)
        self._deliveries(entries)
        self.relaxed = False
        if not self.conns:
            self._open()  # keep one: most rules need a connection

    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 3.0, 7.0]))
    def tick(self, dt: float) -> None:
        """Let ``dt`` seconds pass, visiting every point of the 0.5 s grid on the way (every
        deadline lies on it), so the core never runs two instants' timers at once."""
        for _ in range(int(dt / GRID)):
            self._instant(self.now + GRID)

    def _in(self, queue: str) -> list[Msg]:
        return [m for m in self.msgs.values() if m.queue == queue]

    def _instant(self, t: float) -> None:
        """Everything due at ``t``: ack timeouts, ends of delays, TTLs of ready ones."""
        start = len(self.sink.log)
        self._advance_to(t)
        self.relaxed = True
        for tag in sorted(self.leases):
            lease = self.leases[tag]
            if not lease.zombie and lease.deadline <= t:
                # §8 "Ack timeout and zombie leases".
                lease.zombie = True
                self.lenient.add((lease.conn, lease.sid))
                self._fail(lease.msg, None, "ack-timeout", self.conns[lease.conn])
        for msg in list(self.msgs.values()):
            if msg.state != "delayed":
                continue
            if msg.expires is not None and msg.expires <= t:
                self.queues[msg.queue].counters["expired"] += 1  # §8 TTL: as when READY
                self._dead_letter(msg, "expired", None)
            elif msg.delay_end <= t:
                self._requeue(msg)
        for queue in self.queues.values():
            for msg, _ in list(queue.ready):
                if msg.expires is not None and msg.expires <= t:
                    queue.remove_ready(msg)
                    self._expire(msg)
        self._deliveries(self.sink.log[start:])
        self.relaxed = False

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def nobody_is_closed(self) -> None:
        assert not self._closed(), self._closed()

    @invariant()
    def stats_match_the_model(self) -> None:
        stats = self._queue_stats()
        assert sorted(stats) == sorted(self.queues), sorted(stats)
        for name, queue in self.queues.items():
            got = stats[name]
            expected = {
                "ready": len(queue.ready),
                "unacked": sum(1 for lease in self.leases.values()
                               if lease.msg.queue == name and not lease.zombie),
                "delayed": sum(1 for m in self._in(name) if m.state == "delayed"),
                "parked": 0,
                "consumers": sum(1 for c in self.consumers.values() if c.queue == name),
                **queue.counters,
            }
            assert {k: got[k] for k in expected} == expected, (name, got, expected)
            assert got["settings"] == {**got["settings"], **self.queue_options[name]}, name
            # Conservation, from STATS alone: every message accepted is in one place.
            assert got["sent"] == (got["ready"] + got["unacked"] + got["delayed"] + got["acked"]
                                   + got["dead_lettered"] + got["discarded"]), (name, got)
            assert sum(got["dead_lettered_reasons"].values()) == got["dead_lettered"], got
            assert got["redelivered"] <= got["delivered"], got

    @invariant()
    def peek_shows_exactly_the_ready_messages(self) -> None:
        for name, queue in self.queues.items():
            page = self._peek(name)
            if page is None:
                return
            shown = sorted(message[2] for message, _ in page["messages"])
            assert shown == sorted(m.body for m, _ in queue.ready), name
            assert page["ready"] == len(queue.ready), name

    @invariant()
    def each_message_is_in_one_place(self) -> None:
        ready = [id(m) for q in self.queues.values() for m, _ in q.ready]
        leased = [id(lease.msg) for lease in self.leases.values() if not lease.zombie]
        assert len(set(ready)) == len(ready) and len(set(leased)) == len(leased)
        for msg in self.msgs.values():
            assert (id(msg) in ready) == (msg.state == "ready"), msg
            assert (id(msg) in leased) == (msg.state == "leased"), msg

    @invariant()
    def prefetch_is_respected_and_no_consumer_idles(self) -> None:
        for (conn, sid), consumer in self.consumers.items():
            assert len(consumer.tags) <= consumer.prefetch
            zombies = any(self.leases[t].zombie for t in consumer.tags)
            idle = not zombies and len(consumer.tags) < consumer.prefetch
            assert not (idle and self.queues[consumer.queue].ready), (
                f"consumer {sid} of connection {conn} has a free slot and "
                f"{consumer.queue} has ready messages")
        self._tidy()


    @invariant()
    def bytes_are_charged_as_held(self) -> None:
        """Each queue's ``bytes`` is what it holds (ready, delayed, leased), and each
        payer's Account the sum of its queues'."""
        accounts: dict[int, tuple[Any, int]] = {}
        for queue in self._core_queues():
            assert queue.bytes == held_bytes(queue), queue.name
            account, total = accounts.get(id(queue.account), (queue.account, 0))
            accounts[id(account)] = (account, total + queue.bytes)
        for account, total in accounts.values():
            assert account.bytes == total, (account.uid, account.bytes, total)


def held_bytes(queue: Queue) -> int:
    """The bytes ``queue`` holds, counted from its messages (queue_state.Account)."""
    def size(item: Any) -> int:
        return (len(item) if type(item) is bytes else len(item.packed)) + MESSAGE_OVERHEAD

    total = sum(size(m) for m in queue.tail) + sum(size(m) for m in queue.delayed_msgs)
    for entry in queue.ready:
        if type(entry) is Run:
            start = entry.ends[entry.next - 1] if entry.next else 0
            total += (entry.ends[-1] - start
                      + MESSAGE_OVERHEAD * (len(entry.ends) - entry.next))
        elif type(entry) is not QMsg or entry.state is MsgState.READY:
            total += size(entry)
    return total + sum(size(lease.msg) for consumer in queue.consumers
                       for lease in consumer.leases.values() if not lease.expired)


TestQueueModel = QueueMachine.TestCase


# -- short scenarios the machine found, kept as plain tests ------------------------------


def run_steps(*steps: tuple[str, dict[str, Any]]) -> None:
    """Run ``QueueMachine`` rules by name, checking the invariants after each."""
    machine = QueueMachine()
    checks = [machine.nobody_is_closed, machine.stats_match_the_model,
              machine.each_message_is_in_one_place,
              machine.prefetch_is_respected_and_no_consumer_idles,
              machine.bytes_are_charged_as_held]
    for name, arguments in steps:
        getattr(machine, name)(**arguments)
        for check in checks:
            check()


def test_a_lost_connection_counts_one_attempt_per_held_lease() -> None:
    """Two consumers of one queue on one connection; the connection goes while the first
    holds a lease. PROTOCOL.md §8 Attempts: one attempt for every held lease, and the
    message is not redelivered to the dead connection's other consumer."""
    run_steps(
        ("consume", {"c": 0, "queue": "qa", "prefetch": 1}),
        ("consume", {"c": 0, "queue": "qa", "prefetch": 1}),
        ("send", {"c": 1, "queue": "qa", "ttl": None}),
        ("disconnect", {"c": 0}),
    )


def test_a_delayed_message_expires_at_its_ttl() -> None:
    """TTL 2 s, nacked at 0.5 s with a 2 s delay: PROTOCOL.md §8 TTL, "DELAYED: at once,
    as when READY", so it expires at 2.0 s, not when the delay ends at 2.5 s; and one
    that fails with a delay after its TTL passed expires at once."""
    nack = {"verb": "nack", "i": 0, "wrong_conn": False, "delay": 2.0, "reason": None,
            "seconds": 0.5}
    run_steps(
        ("consume", {"c": 0, "queue": "qa", "prefetch": 1}),
        ("send", {"c": 1, "queue": "qa", "ttl": 2.0}),
        ("tick", {"dt": 0.5}),
        ("answer", nack),
        ("tick", {"dt": 1.5}),
        ("tick", {"dt": 0.5}),
        ("send", {"c": 1, "queue": "qa", "ttl": 2.0}),
        ("tick", {"dt": 3.0}),
        ("answer", nack),
    )
