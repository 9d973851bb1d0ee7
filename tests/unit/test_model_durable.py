"""Model-based test of durable queues across restarts (README "Durability", PROTOCOL.md §8
DECLARE option ``durable``).

:class:`DurableQueueMachine` is :class:`QueueMachine` (tests/unit/test_model_queues.py)
with every queue declared durable, a core that journals to the crash-capable in-memory
files of tests/unit/crashfs.py, and one more rule, :meth:`restart`: the broker is killed
and a new core is built from what the journal recovered.

Theory of operation. As the shell does at the end of each loop turn, every event the
machine hands the core (a frame, a lost connection, a tick) is followed by
``journal.write(); journal.sync(); journal.compact()``; so a restart is exactly "killed
right after the last turn was written", and nothing confirmed may be lost. Two more
rules: :meth:`lose_a_sync` makes the next turn's sync fail and lose what it covered for
good (crashfs.py, fsyncgate), after which turns only write, until :meth:`rebuild` writes
the journal afresh from the core's memory, as the shell does (no restart in between:
a crash before the rebuild is what it exists to avoid). Compaction's
copies are buffered at that moment and die with the process, as they would. A tiny
segment size makes segments roll, get compacted and deleted during a run.

A new process has a new monotonic clock (each core's starts at another value) and a new
message id prefix; the wall clock goes on, ``after`` seconds later. The model keeps its
own clock in wall time (``now``), so expiry times, due times and ``x-dead-time`` compare
across restarts. What the documents promise after a restart, and the model applies:

* the queues exist with their settings (a DECLARE with the same options is OK);
* every connection is gone, with its consumers, leases and zombies;
* a message leased at the crash counts one more failed attempt and is ready again, or
  is dead-lettered (``max-deliveries``, reason text ``broker-restart``) if that reached
  ``max_deliveries``; acked ones do not come back;
* delayed ones keep their due time (ready at once if it passed while the broker was
  down); TTLs keep counting in wall time (one that passed while down expires at the
  restart); dead letters stay with their headers; message ids are unchanged;
* each queue's deduplication window is kept (journaled), in wall time: a resend of an id
  accepted less than ``dedup_window`` seconds before, by the wall clock, is still a
  duplicate after the restart, acked or not;
* a message's last failure still names its reason and consumer (§8 "Dead letters":
  ``x-reason-text`` "the reason of the last failure", ``x-consumer-pid`` "absent if it
  never failed"); the crash itself is a failure with reason ``broker-restart`` and no
  consumer (journaled with each failure; the two tests at the end show it in a few
  frames, which failed before the journal kept it).

The queues come back in journal sequence order, the order messages entered them. Only
SENDs enter "qa" and "qb", one per step, so that is the order the model created them in
and it is checked exactly; dead letters can enter "qa.dlq" several at once in an order
the model does not know, so there any order passes (one batch). STATS counters are the
new process's: the restored messages count as ``sent`` (so STATS' conservation still
holds) and everything else starts from zero.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from aiobus.broker.core import BrokerCore
from aiobus.broker.journal import Journal, JournalError
from aiobus.broker.snapshot import durable_snapshot
from aiobus.protocol import Op

from .crashfs import CrashFS
from .helpers import Driver
from .test_core_durable import Durable
from .test_model_queues import QUEUES, LoggingSink, QueueMachine, index

DURABLE = {name: {**options, "durable": True} for name, options in QUEUES.items()}
WALL = 1_000_000.0  # the wall clock at the first start; multiples of 0.5 stay exact
SEGMENT_SIZE = 1024  # bytes: a few dozen records, so segments roll and get compacted

consumers = st.lists(
    st.tuples(index, st.sampled_from(["qa", "qa", "qb", "qa.dlq"]), st.integers(1, 3)),
    max_size=3)
downtime = st.sampled_from([0.0, 0.0, 0.5, 2.0, 10.0])  # seconds the broker is down


class DurableQueueMachine(QueueMachine):
    queue_options = DURABLE

    # -- talking to the broker ----------------------------------------------------------

    def _start(self) -> None:
        self.files = CrashFS()
        self.restarts = 0
        self.losses = 0
        self.lose_next = False  # the next turn's sync fails and loses its writes
        self.damaged = False  # since then, until the rebuild
        self._new_process(WALL)

    def _new_process(self, wall: float) -> list[str]:
        """A broker process starting at wall time ``wall``: replay the journal, restore."""
        journal, recovered = Journal.open(self.files, segment_size=SEGMENT_SIZE)
        self.journal = journal
        start = 100.0 * self.restarts  # another monotonic clock
        self.wall_offset = wall - start
        options = {"id_prefix": f"p{self.restarts}", "wall_offset": self.wall_offset,
                   "journal": journal, "dedup_window": self.dedup_window,
                   "dedup_size": self.dedup_size}
        self.d = Driver()
        self.d.sink = self.sink = LoggingSink()
        self.d.core = BrokerCore(self.sink, **options)
        self.d.now = start
        self.d.core.restore(recovered, start)
        self._end_turn()
        return list(recovered.queues)

    def _end_turn(self) -> None:
        """What the shell does after each loop turn (broker/output.py _write_journal).
        While the journal is damaged (a sync failed) its syncs would prove nothing: the
        shell only writes, refusing durable sends (here the model goes on sending: those
        must survive the rebuild as well)."""
        journal = self.journal
        journal.write()
        if self.damaged:
            return
        if self.lose_next and journal.unsynced:
            self.lose_next = False
            self.losses += 1
            self.files.fail_sync = True
            self.files.lose_on_failed_sync = random.Random(self.losses)
            try:
                journal.sync()
            except JournalError:
                self.damaged = True
            finally:
                self.files.fail_sync = False
            assert self.damaged and journal.damaged
            return
        journal.sync()
        journal.compact()

    @property
    def now(self) -> float:
        return self.d.now + self.wall_offset

    def _advance_to(self, t: float) -> None:
        self.d.advance_to(t - self.wall_offset)
        self._end_turn()

    def _exchange(self, conn: int, frame: list[Any]) -> list[tuple[int, list[Any]]]:
        entries = super()._exchange(conn, frame)
        self._end_turn()
        return entries

    def _lose(self, conn: int) -> list[tuple[int, list[Any]]]:
        start = len(self.sink.log)
        self.d.core.disconnect(conn, self.d.now)
        self._end_turn()
        return self.sink.log[start:]

    # -- the restart --------------------------------------------------------------------

    def _busy(self) -> bool:
        return any(m.state in ("leased", "delayed") for m in self.msgs.values())

    @precondition(lambda self: self._busy() and not self.damaged)
    @rule(after=downtime, consumers=consumers)
    def crash_while_busy(self, after: float, consumers: list[tuple[int, str, int]]) -> None:
        """A restart while messages are leased or delayed: the cases with most to check,
        which plain :meth:`restart` rarely meets."""
        self.restart(after, consumers)

    @precondition(lambda self: not self.damaged and not self.lose_next)
    @rule()
    def lose_a_sync(self) -> None:
        """The next sync fails (EIO) and the writes it covered are lost for good, as
        after Linux marked the pages clean (PostgreSQL's fsyncgate): crashfs.py."""
        self.lose_next = True

    @precondition(lambda self: self.damaged)
    @rule()
    def rebuild(self) -> None:
        """The shell's retry: the journal written afresh from the core's memory."""
        self.journal.rebuild(durable_snapshot(self.d.core.queues))
        self.damaged = False
        self.journal.compact()

    @precondition(lambda self: not self.damaged)
    @rule(after=downtime, consumers=consumers)
    def restart(self, after: float, consumers: list[tuple[int, str, int]]) -> None:
        """kill -9 after a loop turn; a new broker starts ``after`` seconds later, and
        clients connect and consume again."""
        # Each turn synced what it wrote, files and directory entries alike: a power cut
        # now loses nothing (so the crash's random choices do not matter).
        assert not any(f.pending for f in self.files.dir.values())
        assert self.files.dir.keys() == self.files.durable_dir.keys()
        self.files = self.files.crash(random.Random(self.restarts))
        self.restarts += 1
        held = [lease.msg for _, lease in sorted(self.leases.items()) if not lease.zombie]
        recovered = self._new_process(self.now + after)
        assert sorted(recovered) == sorted(self.queues), recovered

        # The model's side: connections, consumers and leases are gone.
        self.conns.clear()
        self.sids.clear()
        self.consumers.clear()
        self.leases.clear()
        self.old_tags.clear()  # tags of the old process: a new one may reuse them
        self.seen_tags.clear()
        for msg in held:  # §8 Attempts: the crash is a failed attempt
            msg.failures += 1
            msg.last_reason = "broker-restart"
            msg.state = "ready"
        live = [m for m in self.msgs.values() if m.state != "gone"]
        for queue in self.queues.values():
            queue.ready = []
            queue.counters = dict.fromkeys(queue.counters, 0)
        for msg in live:  # journal sequence order within each queue
            queue = self.queues[msg.queue]
            queue.counters["sent"] += 1
            limit = queue.spec.max_deliveries
            if msg.state == "ready" and limit is not None and msg.failures >= limit:
                self._dead_letter(msg, "max-deliveries", "broker-restart")
            elif msg.state == "ready" or msg.delay_end <= self.now:
                msg.state = "ready"
                queue.ready.append((msg, None))
        # The first timer run of the new process: TTLs that passed while it was down.
        self._advance_to(self.now)
        expired = [m for m in self.msgs.values() if m.state in ("ready", "delayed")
                   and m.expires is not None and m.expires <= self.now]
        for msg in expired:
            if msg.state == "ready":
                self.queues[msg.queue].remove_ready(msg)
            self._expire(msg)
        self._flush()
        dlq = self.queues["qa.dlq"]
        batch = next(self.batches)
        dlq.ready = [(m, batch) for m, _ in dlq.ready]
        self._deliveries([])  # no connection: the core wrote nothing

        # The queues exist with their settings: declaring them again is OK.
        admin = self._open()
        for name, options in self.queue_options.items():
            rid = next(self.rids)
            entries = self._exchange(admin, [Op.DECLARE, rid, name, options])
            self._answer(entries, admin, rid, None)
        for c, queue, prefetch in consumers:
            self.consume(c, queue, prefetch)


DurableQueueMachine.TestCase.settings = settings(
    settings.default,
    max_examples=max(10, settings.default.max_examples // 2),
    stateful_step_count=settings.default.stateful_step_count,
)
TestDurableQueueModel = DurableQueueMachine.TestCase


# -- the documented behaviour the machine found broken, as short scenarios ---------------


def test_a_dead_letter_names_its_last_failure_after_a_restart() -> None:
    """PROTOCOL.md §8 "Dead letters": ``x-reason-text`` is "the reason of the last
    failure" and ``x-consumer-pid`` "the last consumer that failed or rejected it ...
    Absent if it never failed". Without the restart both are there; after it (the
    journal keeps only the count of failures) neither is."""
    b = Durable()
    d = b.driver
    p, c = d.client("p"), d.client("c", pid=4321)
    p.ok(Op.DECLARE, "jobs", {"durable": True, "ttl": 5.0})
    p.send("jobs", b"x")
    c.consume("jobs")
    c.nack(c.delivery().tag, delay=10.0, reason="why")  # failed by pid 4321, delayed
    d = b.restart()
    d.advance(5.0)  # the TTL passes while it waits out the delay: expired
    c2 = d.client("c2")
    c2.consume("jobs.dlq")
    headers = c2.delivery().headers or {}
    assert headers["x-attempts"] == "1"
    assert {k: headers.get(k) for k in ("x-reason-text", "x-consumer-pid")} == {
        "x-reason-text": "why", "x-consumer-pid": "4321"}


def test_the_crash_stays_the_last_failure_after_a_restart() -> None:
    """A message leased at the crash counts it as a failed attempt, with reason text
    ``broker-restart`` when that dead-letters it at the restart; when it is dead-lettered
    later without failing again (here its TTL), that is still its last failure (§8:
    ``x-reason-text`` is "the reason of the last failure")."""
    b = Durable()
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "ttl": 5.0})
    p.send("jobs", b"x")
    c.consume("jobs")
    c.delivery()  # leased when the broker dies
    d = b.restart()
    d.advance(5.0)
    c2 = d.client("c2")
    c2.consume("jobs.dlq")
    headers = c2.delivery().headers or {}
    assert (headers["x-dead-reason"], headers["x-attempts"]) == ("expired", "1")
    assert headers.get("x-reason-text") == "broker-restart"
