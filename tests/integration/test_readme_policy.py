"""The README's policy example, as written, against the real broker: each row of the table
under it ("what alice and bob can do") is checked with clients running as two other uids.

The policy is taken from the README's ```toml block; only the principals are swapped for
ones this machine has: ``alice`` is the test user (``aiobus-test``), ``bob`` a bare
numeric uid, and the groups ``workers`` and ``ops`` are gids neither client holds (so
the rules for those groups grant them nothing, as the table says).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from .test_policy import NUMERIC_UID, results, run_client
from .test_socket_safety import other_user

README = Path(__file__).resolve().parents[2] / "README.md"
WORKERS_GID, OPS_GID = 4260, 4261  # held by neither client


def readme_policy() -> str:
    blocks = re.findall(r"```toml\n(# /etc/aiobus/policy\.toml\n.*?)```", README.read_text(),
                        re.S)
    assert len(blocks) == 1, "the README's policy example is gone or doubled"
    policy: str = blocks[0]
    return policy


def test_the_readme_policy_grants_what_its_table_says(short_tmp: Path,
                                                      broker_factory: Any) -> None:
    user = other_user()
    policy = readme_policy()
    for name, replacement in (('"alice"', f'"{user.pw_name}"'), ('"bob"', str(NUMERIC_UID)),
                              ('"workers"', str(WORKERS_GID)), ('"ops"', str(OPS_GID))):
        assert name in policy, f"the README's policy no longer names {name}"
        policy = policy.replace(name, replacement)
    short_tmp.chmod(0o755)
    path = short_tmp / "policy.toml"
    path.write_text(policy)
    broker = broker_factory("--policy", str(path), "--socket-mode", "0660",
                            "--socket-group", str(user.pw_gid))
    alice = run_client(broker.path, user.pw_uid, user.pw_gid, [], """\
await attempt("declare", bus.declare_queue("jobs.resize", dead_letter="jobs.failed"))
await attempt("send", bus.send("jobs.resize", "work"))
await attempt("consume", consume_one(bus, "jobs.resize"))
await attempt("publish", bus.publish("jobs.events.done", "done"))
await attempt("listen", bus.subscribe("jobs.events.*").start())
await attempt("purge", bus.purge_queue("jobs.resize"))
await attempt("stat", bus.stats())
await attempt("send-other", bus.send("other", "x"))
""")
    got = results(alice)
    for what in ("declare", "send", "publish"):
        assert got[what].get("ok"), got[what]
    assert got["consume"]["denied"] == ["consume", "jobs.resize"]
    assert got["listen"]["denied"] == ["subscribe", "jobs.events.*"]
    assert got["purge"]["denied"] == ["admin", "jobs.resize"]
    assert got["stat"]["denied"] == ["admin", ">"]
    assert got["send-other"]["denied"] == ["send", "other"]
    bob = run_client(broker.path, NUMERIC_UID, user.pw_gid, [], """\
await attempt("send", bus.send("jobs.resize", "forged"))
await attempt("consume", consume_one(bus, "jobs.resize"))
await attempt("consume-dlq", bus.consume("jobs.resize.dlq", prefetch=1).start())
await bus.publish("jobs.events.done", "x")  # no answer: refused with ERROR rid 0
await bus.ping()  # which has arrived by the time this PING's OK has
emit(what="publish", async_errors=bus.async_errors)
await attempt("listen", bus.subscribe("jobs.events.*").start())
await attempt("presence", bus.subscribe("$sys.client.connected").start())
await attempt("declare", bus.declare_queue("jobs.resize", dead_letter="jobs.failed"))
await attempt("purge", bus.purge_queue("jobs.resize"))
await attempt("stat", bus.stats())
await attempt("send-other", bus.send("other", "x"))
""")
    got = results(bob)
    assert got["send"]["denied"] == ["send", "jobs.resize"]
    assert got["send"]["code"] == "forbidden"
    assert got["consume"] == {"what": "consume", "ok": True, "result": "work"}
    for what in ("consume-dlq", "listen", "presence"):
        assert got[what].get("ok"), got[what]
    assert got["publish"]["async_errors"] == 1
    assert got["declare"]["denied"] == ["declare", "jobs.resize"]
    assert got["purge"]["denied"] == ["admin", "jobs.resize"]
    assert got["stat"]["denied"] == ["admin", ">"]
    assert got["send-other"]["denied"] == ["send", "other"]


@pytest.mark.asyncio
async def test_dlq_commands_need_consume_not_admin(short_tmp: Path,
                                                   broker_factory: Any) -> None:
    """`aiobus dlq list|show|requeue` under a policy that grants the dead-letter queue's
    `consume` (and `send` to the original) but no `admin`: STATS is refused, so the
    default dead-letter queue is taken, and PEEK counts and shows it."""
    import aiobus

    from .test_cli import run

    path = short_tmp / "policy.toml"
    path.write_text('[[allow]]\nusers = ["root"]\nverbs = ["send", "consume"]\n'
                    'queues = ["jobs.>"]\n')
    broker = broker_factory("--policy", str(path))
    async with aiobus.connect(broker.path) as bus:
        with pytest.raises(aiobus.PermissionDenied):
            await bus.stats()
        await bus.send("jobs.x", "poison")
        async with bus.consume("jobs.x", prefetch=1) as consumer:
            msg = await asyncio.wait_for(anext(consumer), 10)
            await msg.reject("bad input", confirm=True)
        listed = await run("--socket", broker.path, "dlq", "list", "jobs.x")
        assert listed.code == 0, listed.err
        assert "rejected" in listed.out and "bad input" in listed.out
        requeued = await run("--socket", broker.path, "dlq", "requeue", "jobs.x")
        assert (requeued.code, requeued.lines) == (0, ["requeued 1 dead letter from jobs.x.dlq"])
        async with bus.consume("jobs.x", prefetch=1) as consumer:
            back = await asyncio.wait_for(anext(consumer), 10)
            assert back.body == "poison"
            await back.ack(confirm=True)
