"""The core's one access check (issue 12), driven without sockets: fake uids and groups,
a policy parsed from text, and the frames each client sends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from aiobus.broker.policy import Policy, parse
from aiobus.errors import PermissionDenied, from_code
from aiobus.protocol import Op

from .helpers import Client, Driver

ALICE, BOB, CAROL = 1001, 1002, 1003
WORKERS = 2001

POLICY = f"""\
[[allow]]
users = [{ALICE}]
verbs = ["send", "declare"]
queues = ["jobs.>", "rpc"]

[[allow]]
users = [{BOB}]
groups = [{WORKERS}]
verbs = ["consume"]
queues = ["jobs.*", "rpc", "jobs.*.dlq"]

[[allow]]
users = [{ALICE}]
verbs = ["publish"]
topics = ["events.>"]

[[allow]]
users = [{BOB}]
verbs = ["subscribe"]
topics = ["events.*", "$sys.client.connected"]

[[allow]]
users = [{CAROL}]
verbs = ["admin"]
queues = [">"]

[[allow]]
users = [{CAROL}]
verbs = ["send"]
queues = ["sink"]
"""


def policy(text: str = POLICY) -> Policy:
    return parse(text, resolve_user=lambda n: 0, resolve_group=lambda n: 0)


class CountingPolicy(Policy):
    """Counts the questions the core asks."""

    def __init__(self, inner: Policy) -> None:
        super().__init__()
        self.inner = inner
        self.asked: list[tuple[int, str, str]] = []

    def allow(self, uid: int, gids: Iterable[int], verb: str, name: str) -> bool:
        self.asked.append((uid, verb, name))
        return self.inner.allow(uid, gids, verb, name)


@pytest.fixture
def denied() -> list[tuple[int, int, int, str, str]]:
    return []


@pytest.fixture
def d(denied: list[tuple[int, int, int, str, str]]) -> Driver:
    return Driver(policy=policy(), on_denied=lambda *args: denied.append(args))


def client(d: Driver, uid: int, gids: tuple[int, ...] = ()) -> Client:
    conn = d.open(uid=uid)
    if gids:  # reconnect with supplementary groups, as SO_PEERGROUPS reports them
        d.core.disconnect(conn, d.now)
        conn += 1000
        d.core.connect(conn, 5000 + uid, uid, uid, d.now, gids)
    d.receive(conn, [Op.HELLO, 1, {}])
    assert [f[0] for f in d.sink.take(conn)] == [Op.WELCOME]
    return Client(d, conn)


def forbidden(reply: Any, verb: str, name: str, uid: int) -> None:
    assert reply is not None and reply[:3] == [Op.ERROR, reply[1], "forbidden"], reply
    assert reply[3] == f"permission denied: {verb} {name!r} for uid {uid}"
    exc = from_code(reply[2], reply[3])
    assert isinstance(exc, PermissionDenied)
    assert (exc.operation, exc.name) == (verb, name)


def still_open(c: Client) -> None:
    assert c.closed is None
    assert c.ok(Op.PING) is None


def test_send_allowed_and_denied(d: Driver, denied: list[Any]) -> None:
    alice, bob = client(d, ALICE), client(d, BOB)
    assert alice.send("jobs.a")[0] == Op.OK
    forbidden(bob.send("jobs.a", b"secret"), "send", "jobs.a", BOB)
    forbidden(alice.send("other"), "send", "other", ALICE)
    assert "other" not in d.core.stats()["queues"]  # nothing was created or queued
    assert d.queue_stats("jobs.a")["ready"] == 1
    still_open(bob)
    assert denied == [(bob.conn, bob.conn + 3999, BOB, "send", "jobs.a"),
                      (alice.conn, alice.conn + 3999, ALICE, "send", "other")]


def test_consume_by_user_and_by_group(d: Driver) -> None:
    alice, bob, worker = client(d, ALICE), client(d, BOB), client(d, 1500, (WORKERS,))
    alice.send("jobs.a", b"x")
    forbidden(alice.call(Op.CONSUME, 1, "jobs.a", 1), "consume", "jobs.a", ALICE)
    bob.consume("jobs.a")
    assert bob.delivery().body == b"x"
    worker.consume("jobs.a")
    forbidden(worker.call(Op.CONSUME, 9, "jobs.a.b", 1), "consume", "jobs.a.b", 1500)
    still_open(alice)


def test_publish_and_subscribe(d: Driver) -> None:
    alice, bob = client(d, ALICE), client(d, BOB)
    sid = bob.subscribe("events.*")
    forbidden(bob.call(Op.SUBSCRIBE, 2, "events.>", 10, "drop-oldest"),
              "subscribe", "events.>", BOB)
    forbidden(alice.call(Op.SUBSCRIBE, 3, "events.*", 10, "drop-oldest"),
              "subscribe", "events.*", ALICE)
    alice.publish("events.x", b"e")
    assert [f[1] for f in bob.take(Op.EVENT)] == [sid]
    bob.publish("events.x")  # PUBLISH has no rid: the ERROR carries 0
    [error] = bob.take(Op.ERROR)
    forbidden(error, "publish", "events.x", BOB)
    assert bob.take(Op.EVENT) == []
    still_open(bob)


def test_presence_topics_need_a_grant_and_stay_the_brokers(d: Driver) -> None:
    bob, alice = client(d, BOB), client(d, ALICE)
    bob.subscribe("$sys.client.connected")
    forbidden(alice.call(Op.SUBSCRIBE, 1, "$sys.client.connected", 10, "drop-oldest"),
              "subscribe", "$sys.client.connected", ALICE)
    root = client(d, 0)
    root.publish("$sys.client.connected")  # root may do everything except be the broker
    [error] = root.take(Op.ERROR)
    assert error[2] == "forbidden" and "the broker's" in error[3]
    assert root.send("$sys.q")[2] == "forbidden"


def test_declare_and_admin(d: Driver) -> None:
    alice, carol = client(d, ALICE), client(d, CAROL)
    assert alice.declare("jobs.a")[0] == Op.OK
    forbidden(carol.declare("jobs.b"), "declare", "jobs.b", CAROL)
    forbidden(alice.call(Op.PURGE, "jobs.a"), "admin", "jobs.a", ALICE)
    forbidden(alice.call(Op.DELETE, "jobs.a", False), "admin", "jobs.a", ALICE)
    forbidden(alice.call(Op.STATS), "admin", ">", ALICE)
    assert carol.ok(Op.PURGE, "jobs.a") == 0
    assert "jobs.a" in carol.ok(Op.STATS)["queues"]
    assert carol.ok(Op.DELETE, "jobs.a", False) == 0


def test_an_explicit_dead_letter_needs_send_there(d: Driver) -> None:
    """Dead letters go where the declaration says: the declarer needs ``send`` on the
    target; a consumer rejecting then needs nothing more (decided in docs/PROTOCOL.md)."""
    alice, bob, carol = client(d, ALICE), client(d, BOB), client(d, CAROL)
    forbidden(alice.declare("jobs.a", dead_letter="sink"), "send", "sink", ALICE)
    assert "jobs.a" not in d.core.stats()["queues"]
    assert alice.declare("jobs.b", dead_letter="jobs.graveyard")[0] == Op.OK
    assert alice.declare("jobs.c")[0] == Op.OK  # its own jobs.c.dlq: part of the queue
    alice.send("jobs.b", b"bad")
    bob.consume("jobs.b")
    assert bob.reject(bob.delivery().tag)[0] == Op.OK  # bob may not send to the graveyard
    stats = carol.ok(Op.STATS)["queues"]
    assert stats["jobs.graveyard"]["ready"] == 1


def test_reply_needs_consume_on_the_requests_queue(d: Driver) -> None:
    alice, bob = client(d, ALICE), client(d, BOB)
    bob.consume("rpc", prefetch=2)
    alice.send("rpc", b"1", token=7)
    alice.send("rpc", b"2", token=8)
    first, second = bob.deliveries()
    assert bob.ok(Op.REPLY, first.tag, b"r", 0, None) is None
    assert alice.take() == [[Op.RESPONSE, 7, b"r", 0, None]]
    d.core.set_policy(policy(POLICY.replace('"jobs.*", "rpc", ', '"jobs.*", ')))
    forbidden(bob.call(Op.REPLY, second.tag, b"r", 0, None), "consume", "rpc", BOB)
    assert alice.take() == []  # nothing reached the requester
    still_open(bob)


def test_each_question_is_asked_once_per_connection_and_reload_drops_the_answers() -> None:
    counting = CountingPolicy(policy())
    d = Driver(policy=counting)
    alice, alice2 = client(d, ALICE), client(d, ALICE)
    for _ in range(3):
        alice.send("jobs.a")
        alice.send("nope")
        alice.publish("events.x")
    alice2.send("jobs.a")
    assert counting.asked == [(ALICE, "send", "jobs.a"), (ALICE, "send", "nope"),
                              (ALICE, "publish", "events.x"), (ALICE, "send", "jobs.a")]
    counting.asked.clear()
    d.core.set_policy(counting)
    alice.send("jobs.a")
    assert counting.asked == [(ALICE, "send", "jobs.a")]


def test_a_reload_applies_to_open_connections() -> None:
    d = Driver(policy=policy())
    alice = client(d, ALICE)
    assert alice.send("jobs.a")[0] == Op.OK
    d.core.set_policy(policy(""))
    forbidden(alice.send("jobs.a"), "send", "jobs.a", ALICE)
    d.core.set_policy(None)  # no policy: as before issue 12
    assert alice.send("jobs.a")[0] == Op.OK
    assert alice.send("anything")[0] == Op.OK


def test_without_a_policy_everything_is_allowed() -> None:
    d = Driver()
    nobody = client(d, 65534)
    assert nobody.send("x")[0] == Op.OK
    assert nobody.ok(Op.PURGE, "x") == 1
    assert "x" in nobody.ok(Op.STATS)["queues"]
    assert nobody.send("$x")[2] == "forbidden"


def test_every_verb_is_checked_by_one_of_the_access_tables() -> None:
    """receive() checks the frames in ACCESS; SEND and PUBLISH check themselves first
    thing (HOT_ACCESS): together they name every verb, and no frame is in both."""
    from aiobus.broker.core import ACCESS, HOT_ACCESS
    from aiobus.broker.policy import VERBS

    assert not ACCESS.keys() & HOT_ACCESS.keys()
    verbs = {verb for verb, _ in ACCESS.values()} | {verb for verb, _ in HOT_ACCESS.values()}
    assert verbs == set(VERBS)
