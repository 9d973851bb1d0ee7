"""The seven workloads: which systems each compares, with how many messages, and how a
run's results turn into numbers. Every case runs `plan.repeats` times, interleaved across
systems (A B C A B C ...), so a slow minute on the machine hurts every row alike.

W1 topic 1 -> 1 (msgs/s)      W2 fan-out 1 -> 4 (deliveries/s)
W3 queue, per-message ack, 1 -> 1 and 1 -> 4 (msgs/s); with durable rows: aiobus
   `--fsync always|batch|never`, Redis AOF `appendfsync always`, RabbitMQ durable + confirms
W4 request/reply, sequential (p50 / p99 / p99.9 in µs)
W5 W1 and W3 at 16 B, 1 KiB, 64 KiB, 1 MiB (msgs/s and MB/s)
W6 broker memory per queued message and per idle connection, journal bytes per durable
   queued message (memory.py)
W7 aiobus, 100 producer connections and 10 consumers (msgs/s, p50 / p99 latency)

Throughput runs from the producer's first send to the last receive of any consumer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiobus_peer
import local_peer
import memory
import nats_peer
import rabbitmq_peer
import redis_peer
import zmq_peer
from harness import Case, CaseFailed, run_case, throughput


@dataclass(frozen=True)
class Plan:
    """Message counts for one mode; `FULL` takes ~6 minutes on 2 cores, `QUICK` under one."""

    repeats: int
    w1: int
    w2: int
    w3: int
    w3_repeats: int  # W3's: its ratios (durable_notes) are its point, and runs are short
    w4: int
    w4_warmup: int
    w5: dict[int, int]  # body size -> messages
    w6_messages: int
    w6_connections: int
    w6_repeats: int
    w7_each: int  # messages per producer connection


FULL = Plan(repeats=3, w1=200_000, w2=50_000, w3=100_000, w3_repeats=5, w4=10_000,
            w4_warmup=500,
            w5={16: 30_000, 1024: 30_000, 65536: 2_000, 1 << 20: 150},
            w6_messages=1_000_000, w6_connections=1_000, w6_repeats=3, w7_each=1_000)
QUICK = Plan(repeats=3, w1=10_000, w2=4_000, w3=3_000, w3_repeats=3, w4=1_000,
             w4_warmup=100,
             w5={16: 3_000, 1 << 20: 20},
             w6_messages=50_000, w6_connections=200, w6_repeats=1, w7_each=20)  # fmt: skip


@dataclass
class Table:
    """One workload's results: per row (system, group), each metric's values per repeat."""

    key: str
    title: str
    metrics: list[str]  # the first one is the headline, compared with aiobus
    higher_is_better: bool = True
    rows: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: tuple[str, str], values: dict[str, float]) -> None:
        cell = self.rows.setdefault(row, {m: [] for m in self.metrics})
        for metric in self.metrics:
            cell[metric].append(values[metric])

    def median(self, row: tuple[str, str], metric: str) -> float | None:
        values = self.rows.get(row, {}).get(metric)
        return statistics.median(values) if values else None


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def rate_metrics(size: int) -> Callable[[list[dict[str, Any]], Case], dict[str, float]]:
    def measure(results: list[dict[str, Any]], case: Case) -> dict[str, float]:
        t = throughput(results, case)
        return {"msgs/s": t["rate"], "MB/s": t["rate"] * size / 1e6,
                "lost": t["lost"]}  # fmt: skip

    return measure


def latency_metrics(results: list[dict[str, Any]], case: Case) -> dict[str, float]:
    latencies = [x for r in results for x in r.get("latencies", ())]
    return {"p50 µs": _percentile(latencies, 0.5), "p99 µs": _percentile(latencies, 0.99),
            "p99.9 µs": _percentile(latencies, 0.999)}  # fmt: skip


def many_metrics(results: list[dict[str, Any]], case: Case) -> dict[str, float]:
    return {"msgs/s": throughput(results, case)["rate"], **latency_metrics(results, case)}


Maker = Callable[[], Case]
DASH, TIMES = "\u2013", "\u00d7"  # en dash, multiplication sign: as report.py writes


def interleave(table: Table, makers: dict[tuple[str, str], Maker],
               measure: Callable[[list[dict[str, Any]], Case], dict[str, float]],
               repeats: int, log: Callable[[str], None],
               systems: Sequence[str] = ()) -> None:  # fmt: skip
    """Run every maker `repeats` times, round-robin; a failing row is dropped, not fatal.
    With `systems`, only the rows whose name contains one of them (run.py --systems)."""
    for rep in range(repeats):
        for row, make in makers.items():
            if row in table.errors or (systems and not any(s in row[0] for s in systems)):
                continue
            started = time.monotonic()
            label = " ".join(row).strip()
            for attempt in (1, 2):  # one retry: a rare flake should not cost a row
                try:
                    case = make()
                    values = measure(run_case(case), case)
                    break
                except (CaseFailed, OSError, RuntimeError, ValueError) as exc:
                    reason = str(exc).strip().splitlines()[-1][:300]
                    log(f"{table.key} {label}: FAILED (attempt {attempt}) {reason}")
                    if attempt == 2:
                        table.errors[row] = reason
                    else:
                        table.notes.append(f"- {label}, run {rep + 1}: failed once and was "
                                           f"run again: {reason}")
            if row in table.errors:
                continue
            table.add(row, values)
            shown = ", ".join(f"{k} {v:,.1f}" for k, v in values.items())
            log(f"{table.key} #{rep + 1} {' '.join(row).strip()}: {shown} "
                f"({time.monotonic() - started:.1f} s)")  # fmt: skip


def _on_nats(env: Any) -> str:
    """The NATS backend's rows: aiobus's own peer code on a nats:// URL (issue 15)."""
    return f"{env.nats_url}/bench"


def _compiled(env: Any) -> str:
    """The compiled build's broker (issue 13, `make compiled`). Its socket is "" when the
    build is missing, and such a row fails, saying so."""
    if not env.aiobus_compiled_socket:
        raise RuntimeError("no compiled broker (make compiled; see the run's log)")
    return str(env.aiobus_compiled_socket)


def _in_compiled(env: Any, case: Case) -> Case:
    """``case`` with every client process importing the compiled build's aiobus: the
    same peer code as the "aiobus" rows, compiled broker and compiled client."""
    for worker in (*case.prepare, *case.workers, *case.cleanup):
        worker.site = env.aiobus_compiled_site
    return case


COMPILED = "aiobus, compiled"
TOPIC_PEERS = {
    "aiobus": aiobus_peer.topic_case,
    COMPILED: lambda env, n, size, subs=1: _in_compiled(env, aiobus_peer.topic_case(
        env, n, size, subs, path=_compiled(env))),
    "aiobus on NATS": lambda env, n, size, subs=1: aiobus_peer.topic_case(
        env, n, size, subs, path=_on_nats(env)),
    "NATS core": nats_peer.topic_case,
    "Redis pub/sub": redis_peer.topic_case,
    "ZeroMQ PUB/SUB": zmq_peer.topic_case,
}
TOPIC_BASELINES = {
    "mp.Queue": lambda env, n, size, subs=1: local_peer.topic_case("mpq", env, n, size),
    "relay (minimal uvloop)": lambda env, n, size, subs=1: local_peer.topic_case(
        "relay", env, n, size, subs),
    "limit (bare Unix socket)": lambda env, n, size, subs=1: local_peer.topic_case(
        "limit", env, n, size),
}
QUEUE_PEERS = {
    # The README's worker loop first: the idiomatic way to consume, quoted in the README.
    "aiobus, msg.process()": lambda env, n, size, consumers: aiobus_peer.queue_case(
        env, n, size, consumers, ack="process"),
    "aiobus, await msg.ack()": lambda env, n, size, consumers: aiobus_peer.queue_case(
        env, n, size, consumers, ack="await"),
    "aiobus, ack_nowait()": aiobus_peer.queue_case,
    f"{COMPILED}, msg.process()": lambda env, n, size, consumers: _in_compiled(
        env, aiobus_peer.queue_case(env, n, size, consumers, ack="process",
                                    path=_compiled(env))),
    "aiobus on NATS, msg.process()": lambda env, n, size, consumers: aiobus_peer.queue_case(
        env, n, size, consumers, ack="process", path=_on_nats(env)),
    "Redis Streams group": redis_peer.queue_case,
    "NATS JetStream": nats_peer.queue_case,
}
# W3 only: each system's acknowledgement that waits for the server, a round trip per
# message (issue 13: "each idiom against its peer's equivalent"). At a round trip each
# they would only slow the W5 sweep; at most AWAITED_MAX messages a case (JetStream's
# ack_sync() runs at a few thousand a second here).
AWAITED_MAX = 20_000
W3_AWAITED_PEERS = {
    "aiobus, await msg.ack(confirm=True)": lambda env, n, size, consumers: (
        aiobus_peer.queue_case(env, min(n, AWAITED_MAX), size, consumers, ack="confirm")),
    "Redis Streams group, XACK awaited each": lambda env, n, size, consumers: (
        redis_peer.queue_case(env, min(n, AWAITED_MAX), size, consumers, awaited=True)),
    "NATS JetStream, ack_sync()": lambda env, n, size, consumers: nats_peer.queue_case(
        env, min(n, AWAITED_MAX), size, consumers, sync=True),
}
# W3 only: at a few thousand messages a second, RabbitMQ would make the W5 sweep take
# minutes more and adds nothing the W3 rows do not show.
W3_ONLY_PEERS = {"RabbitMQ (aio-pika)": rabbitmq_peer.queue_case}
# W3's durable rows: confirmed sends with 256 in flight (aiobus `send_nowait` window,
# Redis pipelines of 256 XADDs, RabbitMQ 256 publishes awaiting confirms), so a
# confirmation means the message is on disk (always) or written to the OS (batch,
# never). "aiobus, confirmed sends" is the same producer on an in-memory queue: the base
# for what the journal costs. RabbitMQ durable sends at most 25,000 messages (~2,000
# msgs/s here: 100,000 would take most of the case's 60 s deadline; 10 s is steady state).
RABBITMQ_DURABLE_MAX = 25_000
DURABLE_PEERS = {
    # (In this order, which interleave keeps in every repeat: the rows durable_notes
    # compares run one after the other.)
    "aiobus, confirmed sends": aiobus_peer.confirmed_queue_case,
    # The README's worker loop behind the same producer: issue 13's W3 (a producer with
    # confirmed sends in flight, as Redis Streams' pipelined XADDs are), where the loop
    # users write is measured against ack_nowait() and Redis Streams in one run.
    "aiobus, confirmed sends, msg.process()": lambda env, n, size, consumers: (
        aiobus_peer.confirmed_queue_case(env, n, size, consumers, ack="process")),
    f"{COMPILED}, confirmed sends, msg.process()": lambda env, n, size, consumers: (
        _in_compiled(env, aiobus_peer.confirmed_queue_case(
            env, n, size, consumers, ack="process", path=_compiled(env)))),
    # The compiled build's in-memory base and durable brokers: what the journal costs
    # there, and `always` against Redis AOF with both at their fastest.
    f"{COMPILED}, confirmed sends": lambda env, n, size, consumers: _in_compiled(
        env, aiobus_peer.confirmed_queue_case(env, n, size, consumers, path=_compiled(env))),
    **{f"{COMPILED} durable, fsync {policy}": (
        lambda env, n, size, consumers, policy=policy: _in_compiled(
            env, aiobus_peer.confirmed_queue_case(env, n, size, consumers, fsync=policy,
                                                  compiled=True)))
       for policy in ("batch", "always")},
    "Redis Streams, AOF fsync always": lambda env, n, size, consumers: redis_peer.queue_case(
        env, n, size, consumers, aof=True),
    "aiobus durable, fsync always": lambda env, n, size, consumers: (
        aiobus_peer.confirmed_queue_case(env, n, size, consumers, fsync="always")),
    "RabbitMQ durable + confirms": lambda env, n, size, consumers: rabbitmq_peer.queue_case(
        env, min(n, RABBITMQ_DURABLE_MAX), size, consumers, durable=True),
    "aiobus durable, fsync batch": lambda env, n, size, consumers: (
        aiobus_peer.confirmed_queue_case(env, n, size, consumers, fsync="batch")),
    # The same producer on an in-memory queue of the `batch` broker itself: what the
    # journal costs on one broker process (the row above runs on another, whose spread
    # from run to run in one W3 run, up to 2x, was larger than the difference judged).
    "aiobus, confirmed sends, in memory beside the durable ones": (
        lambda env, n, size, consumers: aiobus_peer.confirmed_queue_case(
            env, n, size, consumers, path=env.aiobus_durable["batch"])),
    "aiobus durable, fsync never": lambda env, n, size, consumers: (
        aiobus_peer.confirmed_queue_case(env, n, size, consumers, fsync="never")),
}
RPC_PEERS = {
    "aiobus": aiobus_peer.rpc_case,
    COMPILED: lambda env, n, size, warmup: _in_compiled(env, aiobus_peer.rpc_case(
        env, n, size, warmup, path=_compiled(env))),
    "aiobus on NATS": lambda env, n, size, warmup: aiobus_peer.rpc_case(
        env, n, size, warmup, path=_on_nats(env)),
    "NATS request": nats_peer.rpc_case,
    "ZeroMQ REQ/REP": zmq_peer.rpc_case,
    "relay (minimal uvloop)": lambda env, n, size, warmup: local_peer.rpc_case(
        "relay", env, n, size, warmup),
    "limit (bare Unix socket)": lambda env, n, size, warmup: local_peer.rpc_case(
        "limit", env, n, size, warmup),
}


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB" if size >= 1024 \
        else f"{size} B"


def run_workload(key: str, env: Any, plan: Plan, log: Callable[[str], None],
                 systems: Sequence[str] = ()) -> list[Table]:  # fmt: skip
    r = plan.repeats
    if key == "W1":
        t = Table("W1", "Topic throughput, 1 publisher -> 1 subscriber, 128 B", ["msgs/s", "lost"])
        peers = {**TOPIC_PEERS, **TOPIC_BASELINES}
        makers = {(name, ""): (lambda f=f: f(env, plan.w1, 128)) for name, f in peers.items()}
        interleave(t, makers, rate_metrics(128), r, log, systems)
        return [t]
    if key == "W2":
        t = Table("W2", "Fan-out, 1 publisher -> 4 subscribers, 128 B (deliveries/s)",
                  ["msgs/s", "lost"])  # fmt: skip
        makers = {(name, ""): (lambda f=f: f(env, plan.w2, 128, 4))
                  for name, f in TOPIC_PEERS.items()}  # fmt: skip
        interleave(t, makers, rate_metrics(128), r, log, systems)
        return [t]
    if key == "W3":
        t = Table("W3", "Queue with per-message ack, 128 B", ["msgs/s"])
        makers = {(name, f"1 -> {c}"): (lambda f=f, c=c: f(env, plan.w3, 128, c))
                  for c in (1, 4)
                  for name, f in {**QUEUE_PEERS, **W3_AWAITED_PEERS, **W3_ONLY_PEERS,
                                  **DURABLE_PEERS}.items()}
        interleave(t, makers, rate_metrics(128), plan.w3_repeats, log, systems)
        t.notes += durable_notes(t, plan.w3_repeats)
        return [t]
    if key == "W4":
        t = Table("W4", "Request/reply latency, sequential, 128 B",
                  ["p50 µs", "p99 µs", "p99.9 µs"], higher_is_better=False)  # fmt: skip
        makers = {(name, ""): (lambda f=f: f(env, plan.w4, 128, plan.w4_warmup))
                  for name, f in RPC_PEERS.items()}  # fmt: skip
        interleave(t, makers, latency_metrics, r, log, systems)
        return [t]
    if key == "W5":
        tables = []
        for part, peers in (("topic", {**TOPIC_PEERS, **TOPIC_BASELINES}),
                            ("queue", {k: v for k, v in QUEUE_PEERS.items()
                                       if k in ("aiobus, ack_nowait()",) or "aiobus" not in k})):
            t = Table(f"W5 {part}", f"Payload sweep, {part} 1 -> 1", ["msgs/s", "MB/s"])
            for size, n in plan.w5.items():
                makers = {(name, _size(size)): (lambda f=f, n=n, size=size: f(env, n, size, 1))
                          for name, f in peers.items()}  # fmt: skip
                interleave(t, makers, rate_metrics(size), r, log, systems)
            tables.append(t)
        return tables
    if key == "W6":
        q = Table("W6 queued", f"Broker memory per queued 128 B message "
                  f"({plan.w6_messages:,} queued)", ["B/msg", "RSS MiB"], higher_is_better=False)
        c = Table("W6 idle", f"Broker memory per idle connection ({plan.w6_connections:,} open)",
                  ["B/conn", "RSS MiB"], higher_is_better=False)  # fmt: skip
        j = Table("W6 journal", f"Journal bytes per queued durable 128 B message "
                  f"({plan.w6_messages:,} queued)", list(memory.JOURNAL_METRICS),
                  higher_is_better=False)  # fmt: skip
        j.notes.append("- journal B/msg: the journal's size (STATS `journal.bytes`) over the "
                       "messages it holds (`live_messages`); Sent record B: `live_bytes` / "
                       "`live_messages` (a message in a SentRun counts its bytes and 4); "
                       "encoded B: the broker's packed message (id, queue, body, ...: what a "
                       "Sent holds, docs/journal.md), of the first one queued; ÷ encoded is "
                       "the issue's measure (goal ≤ 1.3).")
        for rep in range(plan.w6_repeats):
            for name in memory.FILLERS:
                _memory(q, name, lambda n=name: memory.queued_bytes(n, plan.w6_messages), rep,
                        log, also=j)  # fmt: skip
            for name in memory.CONNECTORS:
                _memory(c, name, lambda n=name: memory.connection_bytes(n, plan.w6_connections),
                        rep, log)  # fmt: skip
        return [q, j, c]
    if key == "W7":
        t = Table("W7", "Many clients: aiobus queue, 100 producer connections (4 processes), "
                  "10 consumers (5 processes), 128 B", ["msgs/s", "p50 µs", "p99 µs", "p99.9 µs"])
        makers = {("aiobus", ""): lambda: aiobus_peer.many_clients_case(env, plan.w7_each)}
        interleave(t, makers, many_metrics, r, log, systems)
        return [t]
    raise ValueError(f"unknown workload {key!r}")


def durable_notes(t: Table, repeats: int) -> list[str]:
    """The issues' W3 targets, as ratios of this run's medians: the README's worker loop
    (issue 13) and the durable rows (issue 10)."""
    targets = [
        ("aiobus, confirmed sends, msg.process()", "Redis Streams group", "≥ 3"),
        ("aiobus, confirmed sends, msg.process()", "aiobus, confirmed sends", "≥ 0.9"),
        (f"{COMPILED}, confirmed sends, msg.process()", "Redis Streams group", "≥ 3"),
        (f"{COMPILED}, confirmed sends, msg.process()", "aiobus, confirmed sends", ""),
        ("aiobus, msg.process()", "Redis Streams group", ""),
        (f"{COMPILED}, msg.process()", "Redis Streams group", ""),
        ("aiobus, msg.process()", "aiobus, ack_nowait()", ""),
        ("aiobus, await msg.ack(confirm=True)", "Redis Streams group, XACK awaited each", ""),
        ("aiobus, await msg.ack(confirm=True)", "NATS JetStream, ack_sync()", ""),
        ("aiobus durable, fsync always", "Redis Streams, AOF fsync always", "≥ 2"),
        ("aiobus durable, fsync always", "RabbitMQ durable + confirms", "≥ 10"),
        ("aiobus durable, fsync batch", "aiobus, confirmed sends", "≥ 0.7"),
        ("aiobus durable, fsync batch", "aiobus, ack_nowait()", ""),  # (unconfirmed sends)
        ("aiobus durable, fsync batch",
         "aiobus, confirmed sends, in memory beside the durable ones", "≥ 0.7"),
        ("aiobus durable, fsync never", "aiobus, confirmed sends", ""),
        ("aiobus durable, fsync always", "aiobus, confirmed sends", ""),
        (f"{COMPILED} durable, fsync always", "Redis Streams, AOF fsync always", "≥ 2"),
        (f"{COMPILED} durable, fsync batch", f"{COMPILED}, confirmed sends", "≥ 0.7"),
    ]
    notes = [f"- {repeats} repeats per case;"
             " below, each ratio of medians, then [the median of the ratios of the two rows'"
             " runs in the same repeat, and their range]: the rows compared are run one"
             " after the other in each repeat, so a slow second on the machine tends to hit"
             " both of a pair"]
    for system, other, goal in targets:
        parts = []
        for group in ("1 -> 1", "1 -> 4"):
            a, b = t.median((system, group), "msgs/s"), t.median((other, group), "msgs/s")
            if a and b:
                ours = t.rows[system, group]["msgs/s"]
                theirs = t.rows[other, group]["msgs/s"]
                paired = ""
                if len(ours) == len(theirs) > 1:
                    ratios = [x / y for x, y in zip(ours, theirs, strict=True)]
                    paired = (f" [{statistics.median(ratios):.2f}{TIMES},"
                              f" {min(ratios):.2f}{DASH}{max(ratios):.2f}]")
                parts.append(f"{group} {a / b:.2f}{TIMES}{paired}")
        if parts:
            target = f" (target {goal})" if goal else ""
            notes.append(f"- {system} ÷ {other}: {', '.join(parts)}{target}")
    return notes


def _memory(table: Table, name: str, measure: Callable[[], dict[str, float]], rep: int,
            log: Callable[[str], None], also: Table | None = None) -> None:  # fmt: skip
    """One W6 measurement; values with the `also` table's metrics go there too."""
    row = (name, "")
    if row in table.errors:
        return
    try:
        values = measure()
    except (CaseFailed, OSError, RuntimeError, KeyError) as exc:
        table.errors[row] = str(exc).strip().splitlines()[-1][:300]
        log(f"{table.key} {name}: FAILED {table.errors[row]}")
        return
    table.add(row, values)
    if also is not None and all(m in values for m in also.metrics):
        also.add(row, values)
    log(f"{table.key} #{rep + 1} {name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in values.items()))


WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]
