"""systemd integration without libsystemd: readiness notification and socket activation.

Both halves follow the documented protocols (``sd_notify(3)``, ``sd_listen_fds(3)``) and
need nothing beyond the standard library.

Notification: ``$NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket, a path or, when it
starts with ``@``, a name in the abstract namespace. :func:`notify` sends one datagram of
newline-separated ``KEY=VALUE`` assignments (``READY=1``, ``STATUS=...``, ``STOPPING=1``).

Activation: systemd passes listening sockets as fds 3, 4, ... and says so in
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process: a child that inherited the
environment must not take them) and ``LISTEN_FDNAMES`` (colon-separated names, from
``FileDescriptorName=``). :func:`listen_fds` reads them, like ``sd_listen_fds(1)`` removes
the variables so children do not see them, and marks the fds close-on-exec.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Final

from .errors import BusError

__all__ = [
    "LISTEN_FDS_START",
    "SystemdError",
    "listen_fds",
    "listen_fds_with_names",
    "notify",
]

LISTEN_FDS_START: Final = 3  # SD_LISTEN_FDS_START
_ENV: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdError(BusError):
    """systemd's environment is malformed, or talking to systemd failed."""

    code = "systemd"


def notify(state: str, *, unset_environment: bool = False) -> bool:
    """Tell the service manager about a state change, as ``sd_notify(3)`` does.

    Does not block: the datagram is sent without waiting.

    Args:
        state: newline-separated assignments, e.g. ``"READY=1"`` or
            ``"STATUS=draining\\nSTOPPING=1"``.
        unset_environment: remove ``NOTIFY_SOCKET`` afterwards, so children do not notify.

    Returns:
        ``True`` if the message was sent, ``False`` if ``$NOTIFY_SOCKET`` is not set (not
        started by systemd, or not ``Type=notify``).

    Raises:
        SystemdError: ``$NOTIFY_SOCKET`` is not a Unix socket address, or sending failed
            (the socket is gone, or its queue is full).

    Example:
        >>> notify("READY=1")  # after the listening socket is up  # doctest: +SKIP
        True
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if unset_environment:
        os.environ.pop("NOTIFY_SOCKET", None)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        raise SystemdError(f"NOTIFY_SOCKET={address!r} is neither a path nor @abstract")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            raise SystemdError(f"cannot notify systemd at {address!r}: {exc}") from exc
    return True


def listen_fds_with_names(*, unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """Take the sockets systemd passed to this process, each with its name.

    Args:
        unset_environment: remove ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``
            (also when they were meant for another process), as ``sd_listen_fds(1)``.

    Returns:
        ``(name, socket)`` pairs for fds 3, 4, ...; the name is ``"unknown"`` without
        ``LISTEN_FDNAMES``. Empty when nothing was passed, or when ``LISTEN_PID`` is not
        this process.

    Raises:
        SystemdError: the variables are malformed, or a passed fd is not a socket.

    Example:
        >>> [(name, sock.getsockname()) for name, sock in listen_fds_with_names()]
        ... # doctest: +SKIP
        [('aiobus.socket', '/run/user/1000/aiobus.sock')]
    """
    pid, count, names = (os.environ.get(name) for name in _ENV)
    if unset_environment:
        for name in _ENV:
            os.environ.pop(name, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        raise SystemdError(f"LISTEN_PID={pid!r} or LISTEN_FDS={count!r} is not a number") from None
    if n < 0:
        raise SystemdError(f"LISTEN_FDS={count!r} is negative")
    labels = names.split(":") if names else ["unknown"] * n
    if len(labels) != n:
        raise SystemdError(f"LISTEN_FDNAMES has {len(labels)} names for {n} fds")
    sockets: list[tuple[str, socket.socket]] = []
    for label, fd in zip(labels, range(LISTEN_FDS_START, LISTEN_FDS_START + n), strict=True):
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise SystemdError(f"passed fd {fd} ({label!r}) is not open: {exc}") from exc
        if not stat.S_ISSOCK(mode):
            raise SystemdError(f"passed fd {fd} ({label!r}) is not a socket")
        os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds does
        sockets.append((label, socket.socket(fileno=fd)))
    return sockets


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """Take the sockets systemd passed to this process (socket activation).

    See :func:`listen_fds_with_names`, which this calls.

    Args:
        unset_environment: remove the ``LISTEN_*`` variables afterwards.

    Returns:
        The passed sockets in fd order (fd 3 first); empty when not socket-activated.

    Raises:
        SystemdError: the variables are malformed, or a passed fd is not a socket.

    Example:
        >>> sockets = listen_fds()  # doctest: +SKIP
        >>> server = sockets[0] if sockets else bind_our_own()  # doctest: +SKIP
    """
    return [sock for _name, sock in listen_fds_with_names(unset_environment=unset_environment)]
