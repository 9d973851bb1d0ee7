"""The deduplication window (broker/dedup.py) against a reference model: the plain
id -> accepted-at window it replaced, kept here as the definition of what the window
holds (hypothesis state machine). The window stores runs of consecutive seqs; the
model stores every id. Whatever the order of seqs, clients, resends, loop turns and
trims, both must hold the same ids, at the same times, in the same order."""

from __future__ import annotations

import math
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aiobus.broker.dedup import DedupWindow, split_id


class ReferenceWindow:
    """Every id in a dict, and the same ids in acceptance order in a deque."""

    def __init__(self, span: float, size: int) -> None:
        self.span, self.size = span, size
        self.ids: dict[str, float] = {}
        self.order: deque[str] = deque()

    def trim(self, now: float) -> None:
        while self.order and self.ids[self.order[0]] <= now - self.span:
            del self.ids[self.order.popleft()]

    def seen(self, mid: str, now: float) -> bool:
        self.trim(now)
        return mid in self.ids

    def add(self, mid: str, now: float) -> None:
        if mid in self.ids:
            return
        self.ids[mid] = now
        self.order.append(mid)
        if len(self.order) > self.size:
            del self.ids[self.order.popleft()]

    def entries(self) -> list[tuple[str, float]]:
        return [(mid, self.ids[mid]) for mid in self.order]


CLIENTS = ("a-", "b-", "app.v2-x-")  # a client id may itself contain "-"


class WindowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.window: DedupWindow | None = None
        self.model: ReferenceWindow | None = None
        self.next: dict[str, int] = dict.fromkeys(CLIENTS, 1)

    @precondition(lambda self: self.window is None)
    @rule(span=st.sampled_from([0.5, 2.0, 1e6]), size=st.integers(1, 12))
    def start(self, span: float, size: int) -> None:
        self.window = DedupWindow(span, size)
        self.model = ReferenceWindow(span, size)

    def _send(self, prefix: str, seq: int) -> None:
        assert self.window is not None and self.model is not None
        mid = prefix + str(seq)
        seen = self.window.seen_seq(prefix, seq, self.now)
        assert seen == self.model.seen(mid, self.now), mid
        if not seen:  # as the broker does: accepted, then it enters the window
            self.window.add_seq(prefix, seq, self.now)
            self.model.add(mid, self.now)

    @precondition(lambda self: self.window is not None)
    @rule(prefix=st.sampled_from(CLIENTS), count=st.integers(1, 5))
    def send_in_order(self, prefix: str, count: int) -> None:
        for _ in range(count):
            self._send(prefix, self.next[prefix])
            self.next[prefix] += 1

    @precondition(lambda self: self.window is not None)
    @rule(prefix=st.sampled_from(CLIENTS), back=st.integers(0, 15))
    def resend_or_out_of_order(self, prefix: str, back: int) -> None:
        self._send(prefix, max(1, self.next[prefix] - back))

    @precondition(lambda self: self.window is not None)
    @rule(prefix=st.sampled_from(CLIENTS), ahead=st.integers(1, 6))
    def skip_ahead(self, prefix: str, ahead: int) -> None:
        """A seq ahead of the next one (another connection's sends, or a refused one)."""
        self._send(prefix, self.next[prefix] + ahead)

    @precondition(lambda self: self.window is not None)
    @rule(prefix=st.sampled_from(CLIENTS), back=st.integers(0, 15), count=st.integers(1, 3))
    def add_again(self, prefix: str, back: int, count: int) -> None:
        """add without a seen first: an id already there keeps its place."""
        assert self.window is not None and self.model is not None
        first = max(1, self.next[prefix] - back)
        for seq in range(first, first + count):
            self.window.add_seq(prefix, seq, self.now)
            self.model.add(prefix + str(seq), self.now)

    @precondition(lambda self: self.window is not None)
    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]))
    def turn(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.window is not None)
    @rule()
    def trim(self) -> None:
        assert self.window is not None and self.model is not None
        self.window.trim(self.now)
        self.model.trim(self.now)

    @precondition(lambda self: self.window is not None)
    @rule()
    def reload(self) -> None:
        """A restart: the window rebuilt from its entries (the journal's DedupIds)."""
        assert self.window is not None and self.model is not None
        entries = self.window.entries()
        self.window = DedupWindow(self.window.span, self.window.size)
        self.window.load(entries, self.now)
        self.model.trim(self.now)

    @invariant()
    def same_ids_same_order(self) -> None:
        if self.window is not None and self.model is not None:
            assert self.window.entries() == self.model.entries()
            assert len(self.window) == len(self.model.ids)


TestWindowAgainstModel = WindowMachine.TestCase
TestWindowAgainstModel.settings = settings(max_examples=300, stateful_step_count=40,
                                           deadline=None)


@pytest.mark.parametrize(("mid", "parts"), [
    ("c-1", ("c-", 1)), ("app.v2-x-17", ("app.v2-x-", 17)),
    (f"c-{2**63 - 1}", ("c-", 2**63 - 1)),
    ("c-0", None), ("c-01", None), ("c-", None), ("-5", None), ("c5", None),
    ("c-\u0661", None), (f"c-{2**63}", None), ("c--1", ("c--", 1)),
])
def test_split_id(mid: str, parts: tuple[str, int] | None) -> None:
    assert split_id(mid) == parts


def test_in_order_sends_of_one_turn_share_one_run() -> None:
    window = DedupWindow(math.inf, 100_000)
    for seq in range(1, 1001):
        window.add_seq("c-", seq, 5.0)
    window.add_seq("c-", 1001, 6.0)  # the next turn: a new run
    assert len(window) == 1001 and len(window.runs) == 2
    assert window.seen_seq("c-", 500, 7.0) and not window.seen_seq("c-", 1002, 7.0)


def test_a_full_window_drops_a_clients_oldest_runs_without_shifting_them() -> None:
    """Each id in a run of its own (one per loop turn), many more than the window holds:
    drops move the client's head and cut its dead prefix now and then; what is left is
    exactly the newest ids, as the reference window keeps them."""
    window, model = DedupWindow(1e9, 50), ReferenceWindow(1e9, 50)
    for seq in range(1, 2001):
        now = float(seq)
        window.add_seq("c-", seq, now)
        model.add(f"c-{seq}", now)
        if seq % 7 == 0:  # an out-of-order resend of an old, dropped seq: a new run
            window.add_seq("c-", seq - 60, now)
            model.add(f"c-{seq - 60}", now)
    assert window.entries() == model.entries()
    client = window.clients["c-"]
    assert len(client.runs) - client.head == 50 and len(client.runs) < 200
    for seq in range(1, 2001):
        assert window.seen_seq("c-", seq, 2001.0) == (f"c-{seq}" in model.ids), seq
