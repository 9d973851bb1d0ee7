"""Every number of seconds a client gives has one documented upper bound (1e9, below
which a deadline is still a usable timer), and a retry schedule at most 64 steps, as
PROTOCOL.md says (issue 12: the broker accepted 1e300 and 65,536 steps)."""

from __future__ import annotations

import pytest

from aiobus.broker.settings import MAX_RETRY_DELAYS, MAX_SECONDS
from aiobus.protocol import Op

from .helpers import Driver

TOO_LONG = [MAX_SECONDS, 1e300, float("inf"), float("nan")]


@pytest.mark.parametrize("option", ["ack_timeout", "ttl"])
@pytest.mark.parametrize("value", TOO_LONG)
def test_queue_durations_are_bounded(option: str, value: float) -> None:
    code, message = Driver().client("p").error(Op.DECLARE, "jobs", {option: value})
    assert code == "bad-option" and option in message and "1e9" in message


def test_the_largest_queue_durations_are_accepted() -> None:
    settings = Driver().client("p").ok(Op.DECLARE, "jobs", {
        "ack_timeout": MAX_SECONDS / 2, "ttl": MAX_SECONDS / 2,
        "retry_delays": [0] + [MAX_SECONDS / 2] * (MAX_RETRY_DELAYS - 1)})
    assert len(settings["retry_delays"]) == MAX_RETRY_DELAYS


def test_a_retry_schedule_has_at_most_64_steps() -> None:
    code, message = Driver().client("p").error(
        Op.DECLARE, "jobs", {"retry_delays": [1] * (MAX_RETRY_DELAYS + 1)})
    assert code == "bad-option" and "at most 64" in message


@pytest.mark.parametrize("value", TOO_LONG)
def test_a_retry_delay_is_bounded(value: float) -> None:
    code, message = Driver().client("p").error(Op.DECLARE, "jobs", {"retry_delays": [value]})
    assert code == "bad-option" and "1e9" in message


@pytest.mark.parametrize("value", TOO_LONG)
def test_nack_and_extend_are_bounded_and_leave_the_lease_held(value: float) -> None:
    d = Driver()
    p, c = d.client("p"), d.client("c")
    c.consume("jobs")
    p.send("jobs")
    tag = c.delivery().tag
    for op, fields in ((Op.NACK, (tag, value, None)), (Op.EXTEND, (tag, value))):
        code, message = c.error(op, *fields)
        assert code == "bad-option" and "1e9" in message
    assert d.queue_stats("jobs")["unacked"] == 1
    assert c.ack(tag)[0] == Op.OK
