"""broker/policy.py: parsing a policy file (good and bad, with the line at fault) and
matching, the trie against a naive reference (nats sublist_test.go style)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus.broker.policy import Policy, PolicyError, covers, parse

USERS = {"alice": 1001, "bob": 1002}
GROUPS = {"workers": 2001, "ops": 2002}


def load(text: str) -> Policy:
    return parse(text, resolve_user=USERS.__getitem__, resolve_group=GROUPS.__getitem__)


TWO_USERS = """\
# alice produces jobs; bob works on them and watches events
[[allow]]
users = ["alice"]
verbs = ["send", "declare"]
queues = ["jobs.>"]

[[allow]]
users = [1002]
groups = ["workers"]
verbs = ["consume"]
queues = ["jobs.*", "jobs.*.dlq"]

[[allow]]
groups = ["ops"]
verbs = ["admin"]
queues = [">"]

[[allow]]
users = ["bob"]
verbs = ["subscribe", "publish"]
topics = ["events.>"]

[[allow]]
users = ["bob"]
verbs = ["subscribe"]
topics = ["$sys.client.*"]
"""


@pytest.mark.parametrize(("uid", "gids", "verb", "name", "allowed"), [
    (1001, (), "send", "jobs.a", True),
    (1001, (), "send", "jobs.a.b", True),
    (1001, (), "send", "jobs", False),  # '>' takes at least one token
    (1001, (), "declare", "jobs.x", True),
    (1001, (), "consume", "jobs.a", False),  # not granted: default deny
    (1002, (), "consume", "jobs.a", True),
    (1002, (), "consume", "jobs.a.b", False),
    (1002, (), "consume", "jobs.a.dlq", True),
    (1003, (2001,), "consume", "jobs.a", True),  # by group
    (1003, (9,), "consume", "jobs.a", False),
    (1002, (), "send", "jobs.a", False),
    (1003, (2002,), "admin", "anything.at.all", True),
    (1003, (2002,), "admin", ">", True),  # stats of every queue
    (1001, (), "admin", ">", False),
    (1002, (), "subscribe", "events.>", True),
    (1002, (), "subscribe", "events.a.*", True),
    (1002, (), "subscribe", ">", False),  # wider than the grant
    (1002, (), "subscribe", "$sys.client.connected", True),
    (1002, (), "subscribe", "$sys.>", False),
    (1001, (), "subscribe", "events.>", False),
    (1002, (), "publish", "events.x", True),
    (0, (), "purge-anything", "x", True),  # root may do everything
])
def test_two_users(uid: int, gids: tuple[int, ...], verb: str, name: str,
                   allowed: bool) -> None:
    assert load(TWO_USERS).allow(uid, gids, verb, name) is allowed


def test_root_named_in_a_rule_gets_only_what_it_is_granted() -> None:
    policy = load('[[allow]]\nusers = [0]\nverbs = ["send"]\nqueues = ["a"]\n')
    assert policy.allow(0, (), "send", "a")
    assert not policy.allow(0, (), "send", "b")
    assert not policy.allow(0, (), "admin", ">")


def test_an_empty_policy_denies_everyone_but_root() -> None:
    policy = load("")
    assert policy.rules == 0
    assert not policy.allow(1001, (2001,), "send", "a")
    assert policy.allow(0, (), "send", "a")


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("[[allow]\nusers = [1]", 1, "Expected ']]'"),  # tomllib's own line
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\nqueues = ["a"]\nfoo = 1\n', 5,
     "unknown key 'foo'"),
    ('[[allow]]\nusers = [1]\nverbs = ["sned"]\nqueues = ["a"]\n', 3, "unknown verb 'sned'"),
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\nqueues = ["a"]\n\n[[allow]]\n'
     'users = ["carol"]\nverbs = ["send"]\nqueues = ["a"]\n', 7, "no user named 'carol'"),
    ('[[allow]]\ngroups = ["nope"]\nverbs = ["send"]\nqueues = ["a"]\n', 2,
     "no group named 'nope'"),
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\nqueues = ["a.*b"]\n', 4, "wildcards must"),
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\nqueues = ["a.>.b"]\n', 4, "'>' may only"),
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\ntopics = ["a"]\n', 4, "take queues, not"),
    ('[[allow]]\nusers = [1]\nverbs = ["send", "publish"]\nqueues = ["a"]\n', 3,
     "either queue verbs"),
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\n', 1, "lists no queues"),
    ('[[allow]]\nverbs = ["send"]\nqueues = ["a"]\n', 1, "give 'users' or 'groups'"),
    ('[[allow]]\nusers = [1]\nverbs = ["publish"]\ntopics = ["$sys.x"]\n', 4,
     "'$' names are the broker's"),
    ('[[allow]]\nusers = [1]\nverbs = ["send"]\nqueues = ["$q"]\n', 4, "broker's"),
    ('[[allow]]\nusers = [-1]\nverbs = ["send"]\nqueues = ["a"]\n', 2, "out of range"),
    ('[[allow]]\nusers = [1.5]\nverbs = ["send"]\nqueues = ["a"]\n', 2, "name or a numeric"),
    ('[[allow]]\nusers = 1\nverbs = ["send"]\nqueues = ["a"]\n', 2, "must be a list"),
    ('[deny]\nusers = [1]\n', 1, "unknown table or key 'deny'"),
    ('allow = 3\n', 1, "array of tables"),
])
def test_a_bad_file_names_the_line_and_the_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(PolicyError) as bad:
        load(text)
    assert bad.value.line == line, bad.value
    assert reason in bad.value.reason
    assert str(bad.value).startswith(f"line {line}: ")


@pytest.mark.parametrize(("granted", "asked", "expected"), [
    ("a.>", "a.b", True), ("a.>", "a.*.c", True), ("a.>", "a.>", True), ("a.>", "a", False),
    ("a.*", "a.*", True), ("a.*", "a.b", True), ("a.*", "a.>", False), ("a.*", "a.b.c", False),
    ("a.b", "a.*", False), (">", "a.>", True), (">", ">", True), ("*", ">", False),
    (">", "$sys.x", False), ("$sys.>", "$sys.x.y", True), ("*.x", "$sys.x", False),
    ("$sys.*", "$sys.>", False),
])
def test_covers(granted: str, asked: str, expected: bool) -> None:
    assert covers(granted, asked) is expected


# -- the trie against a naive reference ------------------------------------------------

def naive_match(pattern: str, name: str) -> bool:
    """A regex per pattern: the obvious reading of the grammar."""
    if name.startswith("$") and not pattern.startswith("$"):
        return False
    parts = [r"[^.]+" if t == "*" else r"[^.]+(\.[^.]+)*" if t == ">" else re.escape(t)
             for t in pattern.split(".")]
    return re.fullmatch(r"\.".join(parts), name) is not None


tokens = st.sampled_from(["a", "b", "c"])
names = st.lists(tokens, min_size=1, max_size=4).map(".".join)
patterns = st.lists(st.sampled_from(["a", "b", "*"]), min_size=0, max_size=3).flatmap(
    lambda head: st.sampled_from(["a", "b", "*", ">"]).map(lambda last: [*head, last])
).map(".".join)
rules = st.lists(st.tuples(st.sets(st.integers(1, 3), max_size=2),
                           st.sets(st.integers(10, 12), max_size=2),
                           st.sampled_from(["send", "consume"]),
                           st.lists(patterns, min_size=1, max_size=3)),
                 max_size=6)


def policy_text(spec: list[tuple[set[int], set[int], str, list[str]]]) -> str:
    out = []
    for uids, gids, verb, pats in spec:
        if not uids and not gids:
            gids = {10}
        out.append(f"[[allow]]\nusers = {sorted(uids)}\ngroups = {sorted(gids)}\n"
                   f'verbs = ["{verb}"]\nqueues = {pats!r}\n'.replace("'", '"'))
    return "\n".join(out)


@settings(max_examples=150, deadline=None)
@given(rules, st.integers(1, 4), st.sets(st.integers(10, 13), max_size=2),
       st.sampled_from(["send", "consume"]), names)
def test_the_trie_agrees_with_the_naive_matcher(
        spec: list[tuple[set[int], set[int], str, list[str]]], uid: int, gids: set[int],
        verb: str, name: str) -> None:
    policy = load(policy_text(spec))
    expected = any(
        (uid in uids or bool(gids & (grantee_gids or ({10} if not uids else set()))))
        and verb == rule_verb and any(naive_match(p, name) for p in pats)
        for uids, grantee_gids, rule_verb, pats in spec
    )
    assert policy.allow(uid, gids, verb, name) is expected


@settings(max_examples=150, deadline=None)
@given(patterns, patterns, names)
def test_covered_patterns_match_a_subset(granted: str, asked: str, name: str) -> None:
    """If ``granted`` covers ``asked``, no name matches ``asked`` but not ``granted``."""
    if covers(granted, asked) and naive_match(asked, name):
        assert naive_match(granted, name)
