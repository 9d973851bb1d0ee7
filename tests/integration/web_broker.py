"""A broker process with its HTTP side on a free loopback port (port 0: the broker
picks one and logs it), shared by the web and browser tests."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conftest import READY_TIMEOUT, BrokerProcess

_URL = re.compile(r"dashboard at (http://[^ ,]+/)")


@dataclass
class WebBroker:
    broker: BrokerProcess
    url: str  # ends with "/"
    token_path: Path

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()


def start_web_broker(broker_factory: Any, *extra: str) -> WebBroker:
    broker: BrokerProcess = broker_factory("--http", "127.0.0.1:0", *extra)
    deadline = time.monotonic() + READY_TIMEOUT
    while (found := _URL.search(broker.log())) is None:
        if broker.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no HTTP listener announced; log:\n{broker.log()}")
        time.sleep(0.02)
    return WebBroker(broker, found.group(1), Path(broker.path + ".token"))
