"""Hypothesis profiles for the whole suite, chosen by ``AIOBUS_HYPOTHESIS_PROFILE``.

* ``default`` (what ``make test`` runs): few examples, so each model-based state machine
  (tests/unit/test_model_*.py, tests/integration/test_model_broker.py) takes a few
  seconds. Property tests that name their own ``max_examples`` keep it.
* ``fuzz`` (what ``make fuzz`` runs, over and over): many more and longer runs.

Neither derandomizes: every run explores new examples, a failing one is saved in
``.hypothesis/`` and replayed first next time, and hypothesis prints how to reproduce it
(``print_blob``). No deadline: the machines' steps vary in cost, and a slow step is not a
bug here (pytest-timeout still bounds each test).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=600,
    stateful_step_count=80,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("AIOBUS_HYPOTHESIS_PROFILE", "default"))


class _NeverRetrieved(logging.Handler):
    """Collects asyncio's "exception was never retrieved" reports: a future that failed
    and that nobody awaited is a bug (an error lost), not noise."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "never retrieved" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_lost_exceptions() -> Iterator[None]:
    """Fail a test during which asyncio reported a future's or task's exception as never
    retrieved (reported when the future is freed, so usually within the test)."""
    handler = _NeverRetrieved()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.messages:
        pytest.fail("asyncio: " + "\n".join(handler.messages), pytrace=False)
