"""Access policy against the real broker (issue 12): clients under other uids, each allow
and deny, a SIGHUP reload (and a bad file that keeps the old policy), the socket's group
and mode, dead-letter and REPLY routes.

The broker runs as root (the test's uid) with ``--socket-mode 0660 --socket-group``
the test user's group. Clients run as uid ``aiobus-test`` (named in the policy) and as a
bare numeric uid with a supplementary group (granted by gid: SO_PEERGROUPS), importing
aiobus as root before dropping privileges, as test_socket_safety.py does; ``nobody``, not
in the group, cannot open the socket at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import REAP_TIMEOUT, BrokerProcess
from .test_socket_safety import other_user

NUMERIC_UID = 4243  # no passwd entry: granted by id
EXTRA_GID = 4242  # a supplementary group of NUMERIC_UID's client, granted by id
WAIT = 15.0

RUN_AS = """\
import asyncio, json, os, sys
import aiobus, uvloop
uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def attempt(what, coro):
    try:
        result = await coro
    except aiobus.PermissionDenied as exc:
        emit(what=what, denied=[exc.operation, exc.name], code=exc.code)
    except Exception as exc:
        emit(what=what, error=type(exc).__name__, message=str(exc))
    else:
        emit(what=what, ok=True, result=result if isinstance(result, (int, str)) else None)

async def consume_one(bus, queue):
    async with bus.consume(queue, prefetch=1) as consumer:
        async for msg in consumer:
            await msg.ack()
            return msg.body

async def wait_line():
    return await asyncio.to_thread(sys.stdin.readline)

async def main(path):
    async with aiobus.connect(path) as bus:
{body}

asyncio.run(asyncio.wait_for(main(sys.argv[4]), 30))
"""


def run_client(path: str, uid: int, gid: int, groups: list[int], body: str
               ) -> subprocess.Popen[str]:
    code = RUN_AS.format(body="\n".join("        " + line for line in body.splitlines()))
    return subprocess.Popen([sys.executable, "-c", code, str(uid), str(gid),
                             json.dumps(groups), path], text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def results(proc: subprocess.Popen[str]) -> dict[str, dict[str, Any]]:
    """Run the client to its end; its emitted lines by ``what``."""
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=REAP_TIMEOUT)
        raise
    assert proc.returncode == 0, err
    return {line["what"]: line for line in map(json.loads, out.splitlines())}


def read_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the client's own wait_for bounds this
    assert line, proc.stderr.read() if proc.stderr else ""
    result: dict[str, Any] = json.loads(line)
    return result


def wait_for_log(broker: BrokerProcess, text: str) -> str:
    deadline = time.monotonic() + WAIT
    while text not in broker.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in the broker's log:\n{broker.log()}")
        time.sleep(0.02)
    return broker.log()


POLICY = f"""\
# {{user}} produces jobs and replies to nobody; uid {NUMERIC_UID} (by group) works
[[allow]]
users = ["{{user}}"]
verbs = ["send", "declare"]
queues = ["jobs.>", "rpc"]

[[allow]]
groups = [{EXTRA_GID}]
verbs = ["consume"]
queues = ["jobs.*", "rpc"]

[[allow]]
users = ["{{user}}"]
verbs = ["publish"]
topics = ["events.>"]

[[allow]]
users = [{NUMERIC_UID}]
verbs = ["subscribe"]
topics = ["events.*"]
"""


@pytest.fixture
def policy_broker(short_tmp: Path, broker_factory: Any) -> tuple[BrokerProcess, Path, Any]:
    user = other_user()
    short_tmp.chmod(0o755)  # the socket's directory: others may look in
    policy = short_tmp / "policy.toml"
    policy.write_text(POLICY.format(user=user.pw_name))
    broker = broker_factory("--policy", str(policy), "--socket-mode", "0660",
                            "--socket-group", str(user.pw_gid))
    return broker, policy, user


def test_each_user_gets_what_the_policy_grants(
        policy_broker: tuple[BrokerProcess, Path, Any]) -> None:
    broker, _, user = policy_broker
    producer = run_client(broker.path, user.pw_uid, user.pw_gid, [], """\
await attempt("send", bus.send("jobs.a", "work"))
await attempt("declare", bus.declare_queue("jobs.b"))
await attempt("consume", consume_one(bus, "jobs.a"))
await attempt("send-elsewhere", bus.send("private", "x"))
await attempt("purge", bus.purge_queue("jobs.a"))
await attempt("stats", bus.stats())
await attempt("dead-letter", bus.declare_queue("jobs.c", dead_letter="private"))
await attempt("ping", bus.ping())
""")
    got = results(producer)
    assert got["send"]["ok"] and got["declare"]["ok"] and got["ping"]["ok"]
    assert got["consume"]["denied"] == ["consume", "jobs.a"]
    assert got["consume"]["code"] == "forbidden"
    assert got["send-elsewhere"]["denied"] == ["send", "private"]
    assert got["purge"]["denied"] == ["admin", "jobs.a"]
    assert got["stats"]["denied"] == ["admin", ">"]
    assert got["dead-letter"]["denied"] == ["send", "private"]
    worker = run_client(broker.path, NUMERIC_UID, user.pw_gid, [EXTRA_GID], """\
await attempt("consume", consume_one(bus, "jobs.a"))
await attempt("send", bus.send("jobs.a", "forged"))
await attempt("consume-other", consume_one(bus, "private"))
""")
    got = results(worker)
    assert got["consume"] == {"what": "consume", "ok": True, "result": "work"}
    assert got["send"]["denied"] == ["send", "jobs.a"]
    assert got["consume-other"]["denied"] == ["consume", "private"]
    log = broker.log()
    assert f"uid {user.pw_uid}): permission denied: consume 'jobs.a'" in log
    assert f"uid {NUMERIC_UID}): permission denied: send 'jobs.a'" in log
    assert "(pid " in log


def test_publish_and_subscribe(policy_broker: tuple[BrokerProcess, Path, Any]) -> None:
    broker, _, user = policy_broker
    listener = run_client(broker.path, NUMERIC_UID, user.pw_gid, [], """\
async def first(pattern):
    async with bus.subscribe(pattern) as sub:
        await bus.ping()
        emit(what="ready")
        async for msg in sub:
            return msg.body
await attempt("subscribe-wide", first("events.>"))
await attempt("event", first("events.*"))
""")
    try:
        first = read_line(listener)
        assert first["what"] == "subscribe-wide" and first["denied"] == ["subscribe",
                                                                         "events.>"]
        assert read_line(listener)["what"] == "ready"
        publisher = run_client(broker.path, user.pw_uid, user.pw_gid, [], """\
await bus.publish("events.x", "hello")
await bus.ping()
""")
        results(publisher)
        rest = results(listener)
        assert rest["event"] == {"what": "event", "ok": True, "result": "hello"}
        forger = run_client(broker.path, NUMERIC_UID, user.pw_gid, [], """\
await bus.publish("events.x", "forged")
await bus.ping()
emit(what="errors", count=bus.async_errors)
""")
        assert results(forger)["errors"]["count"] == 1
        assert f"uid {NUMERIC_UID}): permission denied: publish 'events.x'" in broker.log()
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate(timeout=REAP_TIMEOUT)


def test_reply_goes_back_to_the_requester(
        policy_broker: tuple[BrokerProcess, Path, Any]) -> None:
    broker, _, user = policy_broker
    server = run_client(broker.path, NUMERIC_UID, user.pw_gid, [EXTRA_GID], """\
async with bus.consume("rpc", prefetch=1) as consumer:
    emit(what="ready")
    async for msg in consumer:
        await attempt("reply", msg.reply(msg.body * 2))
        break
""")
    try:
        assert read_line(server)["what"] == "ready"
        requester = run_client(broker.path, user.pw_uid, user.pw_gid, [], """\
await attempt("request", bus.request("rpc", 21))
""")
        assert results(requester)["request"] == {"what": "request", "ok": True, "result": 42}
        assert results(server)["reply"]["ok"]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=REAP_TIMEOUT)


def test_sighup_reloads_and_a_bad_file_keeps_the_old_policy(
        policy_broker: tuple[BrokerProcess, Path, Any]) -> None:
    broker, policy, user = policy_broker
    client = run_client(broker.path, user.pw_uid, user.pw_gid, [], """\
await attempt("before", bus.send("late", "x"))
await wait_line()
await attempt("reloaded", bus.send("late", "x"))
await wait_line()
await attempt("after-bad-file", bus.send("late", "x"))
await attempt("old-grant-gone", bus.send("jobs.a", "x"))
""")
    assert client.stdin is not None
    try:
        assert read_line(client)["denied"] == ["send", "late"]
        policy.write_text(f'[[allow]]\nusers = ["{user.pw_name}"]\nverbs = ["send"]\n'
                          'queues = ["late"]\n')
        os.kill(broker.pid, signal.SIGHUP)
        wait_for_log(broker, "policy reloaded from")
        client.stdin.write("go\n")
        client.stdin.flush()
        assert read_line(client)["ok"]  # the same connection: its cached answer dropped
        policy.write_text('[[allow]]\nusers = ["nobody"]\nverbs = ["sned"]\n'
                          'queues = ["late"]\n')
        os.kill(broker.pid, signal.SIGHUP)
        log = wait_for_log(broker, "policy not reloaded")
        assert f"{policy}: line 3: unknown verb 'sned'" in log
        client.stdin.write("go\n")
        client.stdin.flush()
        got = results(client)
        assert got["after-bad-file"]["ok"]
        assert got["old-grant-gone"]["denied"] == ["send", "jobs.a"]
        assert broker.proc.poll() is None
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate(timeout=REAP_TIMEOUT)


def test_a_bad_file_at_start_is_refused_with_line_and_reason(
        short_tmp: Path, broker_factory: Any) -> None:
    policy = short_tmp / "bad.toml"
    policy.write_text('[[allow]]\nusers = [1]\nverbs = ["send"]\nqueues = ["a.*b"]\n')
    done = subprocess.run([sys.executable, "-m", "aiobus.cli.broker", "--socket",
                           str(short_tmp / "x.sock"), "--data-dir", str(short_tmp / "d"),
                           "--policy", str(policy)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 1
    assert f"{policy}: line 4: pattern 'a.*b'" in done.stderr


def test_the_socket_mode_keeps_others_out(
        policy_broker: tuple[BrokerProcess, Path, Any]) -> None:
    broker, _, _ = policy_broker
    st = os.stat(broker.path)
    assert oct(st.st_mode & 0o777) == "0o660"
    nobody = run_client(broker.path, 65534, 65534, [], "pass")
    _, err = nobody.communicate(timeout=WAIT)
    assert nobody.returncode != 0
    assert "BrokerUnavailable" in err and "permission denied" in err
