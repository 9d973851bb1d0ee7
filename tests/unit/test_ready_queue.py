"""A queue's READY messages (deque, tail and sealed runs): the same order as a plain deque
under any mix of operations, while runs of small stateless messages take one object each."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus.broker.queue_state import RUN, SMALL, Item, QMsg, Queue, Run
from aiobus.broker.settings import QueueSettings

SMALL_BODY = b"s" * 100
LARGE_BODY = b"L" * (SMALL + 1)


def new_queue() -> Queue:
    return Queue("q", QueueSettings(), explicit=True)


# Each step repeats one operation up to 600 times, so runs of RUN small appends (which
# seal) and long stretches of pops (which take runs apart) both happen.
steps = st.lists(st.tuples(st.sampled_from(["small", "large", "qmsg", "front", "pop"]),
                           st.integers(1, 600)), max_size=12)


@settings(max_examples=80, deadline=None)
@given(steps)
def test_order_matches_a_deque(plan: list[tuple[str, int]]) -> None:
    script = [op for op, times in plan for _ in range(times)]
    queue, model = new_queue(), deque[Item]()
    for n, op in enumerate(script):
        if op == "pop":
            assert bool(queue.ready or queue.tail) == bool(model)
            if model:
                got, want = queue.take_ready(), model.popleft()
                assert got == want if type(want) is bytes else got is want
            continue
        item: Item = {"small": SMALL_BODY + str(n).encode(), "large": LARGE_BODY + str(n).encode(),
                      "qmsg": QMsg(b"q"), "front": b"f" + str(n).encode()}[op]
        if op == "front":  # what _requeue does
            queue.ready.appendleft(item)
            model.appendleft(item)
        else:
            queue.append_ready(item)
            model.append(item)
    while model:
        got, want = queue.take_ready(), model.popleft()
        assert got == want if type(want) is bytes else got is want
    assert not queue.ready and not queue.tail


def test_small_stateless_messages_are_sealed_into_runs() -> None:
    queue = new_queue()
    messages = [SMALL_BODY + n.to_bytes(4, "big") for n in range(10 * RUN + 3)]
    for message in messages:
        queue.append_ready(message)
    # 10 sealed runs and 3 messages in the tail, not 2,563 objects.
    assert len(queue.ready) == 10 and all(type(e) is Run for e in queue.ready)
    assert len(queue.tail) == 3
    assert [queue.take_ready() for _ in messages] == messages
    assert not queue.ready and not queue.tail
