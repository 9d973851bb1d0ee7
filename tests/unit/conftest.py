"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from aiobus.client.connection import ClientConnection


@pytest.fixture(params=["whole", "bytewise"])
def feed(request: pytest.FixtureRequest) -> Callable[[ClientConnection, bytes], None]:
    """Feed a client connection its input whole, and (a second run) byte by byte: it must
    behave the same however reads split frames (h11/tests/test_io.py)."""
    def whole(conn: ClientConnection, data: bytes) -> None:
        conn.receive_data(data)

    def bytewise(conn: ClientConnection, data: bytes) -> None:
        for i in range(len(data)):
            conn.receive_data(data[i:i + 1])

    return whole if request.param == "whole" else bytewise
