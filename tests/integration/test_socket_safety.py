"""The default socket cannot be taken over by another local user (issue 11): a broker
run by another uid at a client's default path is refused, a broker refuses a default path
in a directory others can write to, and a socket this user may not open is a
``BrokerUnavailable`` naming its owner and mode, not a bare PermissionError.

Other users are real: the test creates a system user (root is needed; skipped, saying
so, where the test cannot switch uid) and runs brokers and clients as that user and as
``nobody`` in child processes that import aiobus as root, then drop to the user with
``os.setgid``/``os.setuid`` (the interpreter itself may live where others cannot read).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiobus
from aiobus.bridges import ForeignFifoError, ensure_fifo

from .conftest import REAP_TIMEOUT, BrokerProcess, wait_for_socket

OTHER = "aiobus-test"

RUN_AS = """\
import asyncio, os, sys
# Everything imported while still root: the interpreter's own files may be unreadable
# to the user this drops to (here: under /root).
import aiobus, aiobus.cli.broker, uvloop
import anyio._backends._asyncio  # anyio imports its backend when the broker's task group starts
import argparse, gettext, logging, shutil, socket, fcntl, secrets, struct, traceback
argparse.ArgumentParser(prog="warm-up").format_help()  # argparse's lazy imports
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
exec(sys.argv[3])
"""


def other_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("switching to another uid needs root")
    try:
        return pwd.getpwnam(OTHER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", OTHER], capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot create a second user here: {done.stderr.strip()}")
        return pwd.getpwnam(OTHER)


def run_as(user: pwd.struct_passwd, code: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RUN_AS, str(user.pw_uid),
                             str(user.pw_gid), code], text=True, **kwargs)


@pytest.fixture
def shared_dir(short_tmp: Path) -> Path:
    """short_tmp, open for other users to look into (mkdtemp makes it 0700)."""
    short_tmp.chmod(0o755)
    return short_tmp


@pytest.fixture
def foreign_broker(shared_dir: Path) -> Iterator[tuple[str, Path]]:
    """A broker run by the other user, on ``evil/aiobus.sock`` in a world-writable
    directory that user owns: what someone would set up to catch another's messages."""
    user = other_user()
    evil = shared_dir / "evil"
    evil.mkdir()
    os.chown(evil, user.pw_uid, user.pw_gid)
    evil.chmod(0o777)
    path = str(evil / "aiobus.sock")
    code = (f"sys.exit(aiobus.cli.broker.main(['--socket', {path!r}, '--data-dir',"
            f" {str(evil / 'data')!r}]))")
    log = open(shared_dir / "foreign.log", "w")  # closed in finally
    proc = run_as(user, code, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(path, None)
        yield path, evil
    finally:
        proc.terminate()
        try:
            proc.wait(REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(REAP_TIMEOUT)
        log.close()


@pytest.mark.asyncio
async def test_a_client_refuses_another_users_broker_at_its_default_path(
        foreign_broker: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path, evil = foreign_broker
    monkeypatch.delenv("AIOBUS_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(evil))  # the default path is the trap
    with pytest.raises(aiobus.BrokerUnavailable) as refused:
        async with aiobus.connect():
            pass
    uid = pwd.getpwnam(OTHER).pw_uid
    assert f"runs as uid {uid}" in str(refused.value)
    assert "pass the path explicitly" in str(refused.value)
    async with aiobus.connect(path) as bus:  # named explicitly: trusted as given
        await bus.ping()


def test_a_broker_refuses_a_default_path_others_can_write_to(
        foreign_broker: tuple[str, Path]) -> None:
    _, evil = foreign_broker
    env = {k: v for k, v in os.environ.items() if k != "AIOBUS_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(evil)
    done = subprocess.run([sys.executable, "-m", "aiobus.cli.broker", "--data-dir",
                           str(evil.parent / "root-data")], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert f"{evil} is not private" in done.stderr and "--socket" in done.stderr


def test_the_default_fallback_directory_is_private(short_tmp: Path) -> None:
    from aiobus._paths import check_private_directory

    mine = short_tmp / "mine"
    check_private_directory(str(mine), create=True)
    assert (mine.stat().st_mode & 0o777) == 0o700
    mine.chmod(0o777)
    with pytest.raises(PermissionError, match="not private"):
        check_private_directory(str(mine), create=True)


def test_permission_denied_is_broker_unavailable_naming_owner_and_mode(
        foreign_broker: tuple[str, Path]) -> None:
    path, _ = foreign_broker  # the other user's socket, mode 0600
    nobody = pwd.getpwnam("nobody")
    code = f"""
async def main():
    try:
        async with aiobus.connect({path!r}):
            print("connected")
    except aiobus.BrokerUnavailable as exc:
        print("unavailable:", exc)
asyncio.run(main())
"""
    proc = run_as(nobody, code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("unavailable: permission denied connecting to"), out
    assert f"owner {OTHER}" in out and "mode srwx" not in out and "srw-------" in out


def test_fifo_bridges_refuse_another_users_fifo(shared_dir: Path) -> None:
    # Another user pre-created out.fifo with mode 0666 and read root's queue messages.
    user = other_user()
    shared_dir.chmod(0o1777)  # /tmp-like: anyone may create files in it
    fifo = shared_dir / "out.fifo"
    child = run_as(user, f"os.umask(0); os.mkfifo({str(fifo)!r}, 0o666)")
    assert child.wait(REAP_TIMEOUT) == 0
    with pytest.raises(ForeignFifoError, match=f"uid {user.pw_uid}"):
        ensure_fifo(fifo)
    assert ensure_fifo(fifo, allow_foreign=True) == fifo
    os.chown(fifo, 0, 0)  # ours now, but still open to everyone
    with pytest.raises(ForeignFifoError, match="read and write"):
        ensure_fifo(fifo)
    os.chmod(fifo, 0o600)
    assert ensure_fifo(fifo) == fifo


@pytest.mark.asyncio
async def test_fifo_out_exits_naming_a_foreign_fifo(shared_dir: Path,
                                                    broker: BrokerProcess) -> None:
    from .test_cli import run

    user = other_user()
    shared_dir.chmod(0o1777)  # /tmp-like: anyone may create files in it
    fifo = shared_dir / "out.fifo"
    child = run_as(user, f"os.umask(0); os.mkfifo({str(fifo)!r}, 0o666)")
    assert child.wait(REAP_TIMEOUT) == 0
    result = await asyncio.wait_for(
        run("fifo-out", str(fifo), "--queue", "secrets", "--socket", broker.path), 20)
    assert result.code != 0
    assert f"belongs to uid {user.pw_uid}" in result.err
