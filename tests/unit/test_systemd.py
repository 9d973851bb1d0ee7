"""aiobus.systemd, with the test playing systemd: a notify socket to receive on, and a
listening socket handed to a child process as fd 3."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiobus.systemd import SystemdError, listen_fds, listen_fds_with_names, notify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths cap at 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="aiobus-") as name:
        yield Path(name)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_without_socket_returns_false(clean_env: pytest.MonkeyPatch) -> None:
    assert notify("READY=1") is False


def test_notify_sends_to_path(clean_env: pytest.MonkeyPatch, short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with receiver(path) as sock:
        clean_env.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"
        assert notify("STATUS=draining\nSTOPPING=1", unset_environment=True) is True
        assert sock.recv(4096) == b"STATUS=draining\nSTOPPING=1"
    assert "NOTIFY_SOCKET" not in os.environ
    assert notify("READY=1") is False


def test_notify_abstract_namespace(clean_env: pytest.MonkeyPatch) -> None:
    name = f"aiobus-test-{secrets.token_hex(8)}"
    with receiver("\0" + name) as sock:
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_errors_are_typed(clean_env: pytest.MonkeyPatch, short_dir: Path) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    with pytest.raises(SystemdError, match="cannot notify"):
        notify("READY=1")
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with pytest.raises(SystemdError, match="neither a path"):
        notify("READY=1")


def test_listen_fds_without_activation(clean_env: pytest.MonkeyPatch) -> None:
    assert listen_fds() == []


def test_listen_fds_for_another_pid_is_ignored_and_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_FDNAMES", "bus")
    assert listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


@pytest.mark.parametrize(
    ("fds", "names", "fragment"),
    [("two", None, "not a number"), ("-1", None, "negative"), ("2", "a", "1 names for 2 fds")],
)
def test_listen_fds_malformed(
    clean_env: pytest.MonkeyPatch, fds: str, names: str | None, fragment: str
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDS", fds)
    if names is not None:
        clean_env.setenv("LISTEN_FDNAMES", names)
    with pytest.raises(SystemdError, match=fragment):
        listen_fds_with_names()


CHILD = textwrap.dedent(
    """
    import os, sys
    from aiobus.systemd import listen_fds_with_names
    [(name, server)] = listen_fds_with_names()
    leaked = sorted(set(os.environ) & {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"})
    server.settimeout(10)
    conn, _ = server.accept()
    with conn:
        conn.sendall(f"{name} fd={server.fileno()} inheritable={os.get_inheritable(3)} "
                     f"leaked={leaked}".encode())
    """
)


# Plays systemd between fork and exec: moves the socket to fd 3 and sets LISTEN_PID to the
# pid the service will have (exec keeps it). A shell cannot do it: dash's `3<&N` only takes
# single-digit fds.
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    os.dup2(int(sys.argv[1]), 3)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
    """
)


def run_activated_child(server: socket.socket, **env: str) -> subprocess.Popen[bytes]:
    fd = server.fileno()
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(fd), CHILD],
        pass_fds=[fd],
        env={**os.environ, "PYTHONPATH": str(REPO), "LISTEN_FDS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(("env", "name"), [({}, "unknown"), ({"LISTEN_FDNAMES": "bus"}, "bus")])
def test_listen_fds_in_activated_child(
    clean_env: pytest.MonkeyPatch, short_dir: Path, env: dict[str, str], name: str
) -> None:
    path = str(short_dir / "bus.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        child = run_activated_child(server, **env)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(path)  # the child's socket now: ours is closed
            reply = client.makefile("rb").read()
    finally:
        try:
            _out, err = child.communicate(timeout=10)  # reaps the child, closes the pipes
        except subprocess.TimeoutExpired:
            child.kill()
            _out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err.decode()
    assert reply.decode() == f"{name} fd=3 inheritable=False leaked=[]"
