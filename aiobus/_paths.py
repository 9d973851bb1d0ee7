"""Where the broker's socket and data live by default; shared by the broker and the
client."""

from __future__ import annotations

import os

__all__ = ["default_data_dir", "default_socket_path", "resolve_socket_path"]

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


def default_data_dir() -> str:
    """``$XDG_STATE_HOME/aiobus``, else ``~/.local/state/aiobus`` (the XDG base directory
    spec's place for state that should survive a restart)."""
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        return os.path.join(state, "aiobus")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "aiobus")
