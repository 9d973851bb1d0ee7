"""The broker's rate-limited warning log: bursts pass, floods are summarised."""

from __future__ import annotations

import logging

import pytest

from aiobus.broker.server import _RateLimitedLog


def test_burst_then_suppressed_then_summary(caplog: pytest.LogCaptureFixture) -> None:
    limiter = _RateLimitedLog(burst=3, period=10.0)
    with caplog.at_level(logging.WARNING, logger="aiobus.broker.server"):
        for i in range(50):
            limiter.warning(100.0 + i * 0.01, "bad client %d", i)
        assert [r.getMessage() for r in caplog.records] == [
            "bad client 0", "bad client 1", "bad client 2"]
        limiter.warning(111.0, "bad client %d", 99)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "47 similar messages suppressed in the last 10 s", "bad client 99"]
