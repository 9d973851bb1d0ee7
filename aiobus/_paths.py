"""Where the broker's socket and data live by default; shared by the broker and the
client."""

from __future__ import annotations

import os
import stat

__all__ = [
    "check_private_directory",
    "default_data_dir",
    "default_socket_path",
    "is_explicit",
    "resolve_socket_path",
]

ENV_SOCKET = "AIOBUS_SOCKET"


def default_socket_path() -> str:
    """``$AIOBUS_SOCKET``, else ``$XDG_RUNTIME_DIR/aiobus.sock``, else
    ``/tmp/aiobus-<uid>/aiobus.sock``.

    The last is in a directory of its own, not directly in /tmp: anybody may create a file
    in /tmp, so another user could bind ``/tmp/aiobus-<uid>.sock`` first and receive this
    user's messages. A private directory (0700, owned by the user, checked by
    :func:`check_private_directory`) is what tmux does for the same reason
    (``/tmp/tmux-<uid>``)."""
    explicit = os.environ.get(ENV_SOCKET)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "aiobus.sock")
    return os.path.join(f"/tmp/aiobus-{os.getuid()}", "aiobus.sock")


def is_explicit(path: str | os.PathLike[str] | None) -> bool:
    """Whether the user chose the socket (``path``, or ``$AIOBUS_SOCKET``): then it is
    trusted as given; a default one is checked (``check_private_directory``, the
    broker's uid)."""
    return path is not None or bool(os.environ.get(ENV_SOCKET))


def check_private_directory(directory: str, *, create: bool) -> None:
    """Make sure ``directory`` (a default socket's) is this user's: a real directory
    (not a link), owned by this uid (or root), writable by nobody else, who could replace
    the socket (tmux's rule for ``/tmp/tmux-<uid>``). With ``create``, make it (0700) if
    missing.

    Raises:
        PermissionError: naming the directory, its owner and its mode.
    """
    if create:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(directory)
    uid = os.getuid()
    # Root's directories are trusted as root's files are; write access for group or
    # others would let someone else replace the socket file.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (uid, 0) or st.st_mode & 0o022:
        raise PermissionError(
            f"{directory} is not private to uid {uid} (owner uid {st.st_uid}, mode"
            f" {stat.filemode(st.st_mode)}): another user could take over the socket there;"
            " remove it, or pass a socket path explicitly (--socket / $AIOBUS_SOCKET)")


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
