"""The broker's HTTP side: ``/metrics`` for Prometheus and a live web dashboard.

Optional: it needs the extra ``aiobus-ipc[web]`` (aiohttp). This module imports nothing
from it, so that the daemon can check ``--http`` and name the missing extra before it
binds anything; :func:`require` returns the server once aiohttp is importable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from ..errors import BusError

__all__ = ["EXTRA", "TOKEN_HEADER", "is_loopback", "parse_address", "require"]

EXTRA = "aiobus-ipc[web]"
TOKEN_HEADER = "X-Aiobus-Token"  # admin requests carry the token in this header


def require() -> Callable[..., Any]:
    """The HTTP server (``aiobus.web.server.serve_http``), or a clear error.

    Raises:
        BusError: aiohttp is not installed: naming the extra to install.
    """
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        raise BusError(f"--http needs the optional dependency aiohttp: pip install"
                       f" '{EXTRA}' (or '.[web]' in a checkout)") from exc
    from .server import serve_http

    return serve_http


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[V6]:PORT"`` or ``"PORT"`` (then on 127.0.0.1) as (host, port).
    Port 0 picks a free one (the broker logs which).

    Raises:
        ValueError: naming what is wrong.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{text!r}: give an address, as 127.0.0.1:9180 (only an"
                         " explicit address is served beyond loopback)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
