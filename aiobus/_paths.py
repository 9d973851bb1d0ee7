"""Where the broker's socket lives by default; shared by the broker and the client."""

from __future__ import annotations

import os

__all__ = ["default_socket_path", "resolve_socket_path"]

ENV_SOCKET = "AIOBUS_SOCKET"


def default_socket_path() -> str:
    """``$AIOBUS_SOCKET``, else ``$XDG_RUNTIME_DIR/aiobus.sock``, else
    ``/tmp/aiobus-<uid>.sock``."""
    explicit = os.environ.get(ENV_SOCKET)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "aiobus.sock")
    return f"/tmp/aiobus-{os.getuid()}.sock"


def resolve_socket_path(path: str | os.PathLike[str] | None) -> str:
    """``path`` if given, else :func:`default_socket_path`."""
    return os.fspath(path) if path is not None else default_socket_path()
