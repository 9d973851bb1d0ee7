"""What every example does the same way (not an example itself: imported by them)."""

from __future__ import annotations

import sys

import aiobus


async def report_connection(bus: aiobus.Bus) -> None:
    """Say on stderr when the broker goes away and when it is back. The client reconnects
    by itself (``aiobus.connect(reconnect=True)``, the default); consumers and
    subscriptions carry on where they were."""
    async for change in bus.state_changes():
        if change.state is aiobus.ConnectionState.DISCONNECTED:
            print(f"connection to {bus.path} lost ({change.error}); reconnecting",
                  file=sys.stderr)
        elif change.state is aiobus.ConnectionState.RECONNECTED:
            print(f"reconnected to {bus.path}", file=sys.stderr)
