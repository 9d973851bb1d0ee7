"""Name grammar and the wildcard index, checked against a naive reference matcher (as
nats-server's sublist_test.go checks its trie)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus.errors import InvalidName
from aiobus.names import MAX_NAME_LENGTH, TopicIndex, check_name, check_pattern, is_reserved

VALID_NAMES = [
    "a", "jobs", "orders.eu.created", "a.b.c.d.e.f", "rpc.add", "x-y_z", "A.B", "1.2.3",
    "$sys.client.connected", "a.$b", "jobs.dlq", "caf\u00e9.\u2603", "a" * MAX_NAME_LENGTH,
    "a#b", "a+b", "a/b", "a:b",
]

INVALID_NAMES: list[tuple[Any, str]] = [
    ("", "must not be empty"),
    (".", "empty token"),
    ("a.", "empty token"),
    (".a", "empty token"),
    ("a..b", "empty token"),
    ("a b", "whitespace"),
    ("a\tb", "whitespace"),
    ("a\nb", "whitespace"),
    ("a\x00b", "NUL"),
    (" a", "whitespace"),
    ("*", "wildcard"),
    (">", "wildcard"),
    ("a.*", "wildcard"),
    ("a.>", "wildcard"),
    ("a*", "wildcard"),
    ("a>b", "wildcard"),
    ("a" * (MAX_NAME_LENGTH + 1), "longer than 255"),
    (5, "must be a str, not int"),
    (None, "must be a str, not NoneType"),
    (b"jobs", "must be a str, not bytes"),
    (["a"], "must be a str, not list"),
]

VALID_PATTERNS = [
    "a", "a.b", "*", ">", "a.*", "a.>", "*.b", "*.*", "*.>", "a.*.c", "a.*.>",
    "$sys.>", "$sys.client.*", "*.*.*.>", "a" * MAX_NAME_LENGTH,
]

INVALID_PATTERNS: list[tuple[Any, str]] = [
    ("", "must not be empty"),
    ("a..b", "empty token"),
    ("a.", "empty token"),
    (".>", "empty token"),
    ("a.>.b", "'>' may only be the last token"),
    (">.a", "'>' may only be the last token"),
    (">.>", "'>' may only be the last token"),
    ("a*", "wildcards must be whole tokens"),
    ("a.b*", "wildcards must be whole tokens"),
    ("*a", "wildcards must be whole tokens"),
    ("a.>>", "wildcards must be whole tokens"),
    ("a.**", "wildcards must be whole tokens"),
    ("a b.*", "whitespace"),
    ("a.\x00", "NUL"),
    ("a" * (MAX_NAME_LENGTH + 1), "longer than 255"),
    (5, "must be a str"),
    (None, "must be a str"),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name
    assert check_pattern(name) == name  # every name is also a literal pattern


@pytest.mark.parametrize(("name", "message"), INVALID_NAMES)
def test_invalid_names(name: Any, message: str) -> None:
    with pytest.raises(InvalidName, match=message) as info:
        check_name(name, "queue name")
    assert str(info.value).startswith("queue name")
    assert info.value.code == "invalid-name"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert check_pattern(pattern) == pattern


@pytest.mark.parametrize(("pattern", "message"), INVALID_PATTERNS)
def test_invalid_patterns(pattern: Any, message: str) -> None:
    with pytest.raises(InvalidName, match=message) as info:
        check_pattern(pattern)
    assert "pattern" in str(info.value)


@pytest.mark.parametrize(
    ("name", "reserved"),
    [("$sys", True), ("$sys.x", True), ("$x.y.z", True), ("sys.$x", False), ("a", False),
     ("a$", False)],
)
def test_is_reserved(name: str, reserved: bool) -> None:
    assert is_reserved(name) is reserved


# -- the index -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("a", ["a"], ["b", "a.b", "$a"]),
        ("a.b", ["a.b"], ["a", "a.b.c", "a.c", "b.b"]),
        ("*", ["a", "b"], ["a.b", "$sys"]),
        (">", ["a", "a.b", "a.b.c"], ["$sys", "$sys.x"]),
        ("a.*", ["a.b", "a.c", "a.$x"], ["a", "a.b.c", "b.b"]),
        ("a.>", ["a.b", "a.b.c"], ["a", "b.a"]),
        ("*.b", ["a.b", "c.b"], ["a.c", "a.b.c", "$sys.b"]),
        ("a.*.c", ["a.x.c"], ["a.c", "a.x.y.c", "a.x.d"]),
        ("*.>", ["a.b", "a.b.c"], ["a", "$sys.x"]),
        ("$sys.>", ["$sys.client.connected", "$sys.x"], ["$sys", "sys.x", "$other.x"]),
        ("$sys.client.*", ["$sys.client.connected"], ["$sys.client", "$sys.client.a.b"]),
    ],
)
def test_match_table(pattern: str, matches: list[str], misses: list[str]) -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add(pattern, "entry")
    for topic in matches:
        assert index.match(topic) == ("entry",), topic
    for topic in misses:
        assert index.match(topic) == (), topic


def test_several_entries_on_one_pattern_and_removal() -> None:
    index: TopicIndex[int] = TopicIndex()
    index.add("a.*", 1)
    index.add("a.*", 2)
    index.add("a.>", 3)
    assert sorted(index.match("a.b")) == [1, 2, 3]
    assert len(index) == 3
    index.remove("a.*", 1)
    assert sorted(index.match("a.b")) == [2, 3]
    index.remove("a.>", 3)
    index.remove("a.*", 2)
    assert index.match("a.b") == ()
    assert len(index) == 0
    assert index._root.empty()  # pruned back to an empty trie


def test_removing_a_missing_entry_is_a_key_error() -> None:
    index: TopicIndex[int] = TopicIndex()
    index.add("a.b", 1)
    with pytest.raises(KeyError):
        index.remove("a.b", 2)
    with pytest.raises(KeyError):
        index.remove("a.c", 1)
    with pytest.raises(KeyError):
        index.remove("a.>", 1)
    assert index.match("a.b") == (1,)


def test_cache_is_invalidated_by_add_and_remove() -> None:
    index: TopicIndex[int] = TopicIndex()
    assert index.match("a.b") == ()
    index.add("a.*", 1)
    assert index.match("a.b") == (1,)
    index.remove("a.*", 1)
    assert index.match("a.b") == ()


def test_cache_is_bounded() -> None:
    index: TopicIndex[int] = TopicIndex()
    index.add(">", 1)
    for i in range(10_000):
        assert index.match(f"t.{i}") == (1,)
    assert len(index._cache) <= 4096


def reference_match(pattern: str, topic: str) -> bool:
    """The matching rules spelled out naively."""
    p, t = pattern.split("."), topic.split(".")
    if topic.startswith("$") and p[0] in ("*", ">"):
        return False
    if p[-1] == ">":
        if len(t) < len(p):
            return False
        p, t = p[:-1], t[: len(p) - 1]
    return len(p) == len(t) and all(a in ("*", b) for a, b in zip(p, t, strict=True))


TOKENS = ["a", "b", "c", "$s"]
topics = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from([*TOKENS, "*"]), min_size=0, max_size=4))
    if not tokens or draw(st.booleans()):
        tokens.append(draw(st.sampled_from(["*", ">", *TOKENS])))
    return check_pattern(".".join(tokens))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), patterns(), st.integers(0, 5)), min_size=1, max_size=25),
    st.lists(topics, min_size=1, max_size=10),
)
def test_index_agrees_with_the_reference(
    operations: list[tuple[bool, str, int]], probe: list[str]
) -> None:
    """Random add/remove sequences, matching after each step (so cached results from
    before a change are probed after it)."""
    index: TopicIndex[tuple[str, int]] = TopicIndex()
    live: set[tuple[str, int]] = set()
    all_topics = sorted({".".join(p) for p in _all_topics()})
    for add, pattern, n in operations:
        entry = (pattern, n)
        if add and entry not in live:
            index.add(pattern, entry)
            live.add(entry)
        elif not add and entry in live:
            index.remove(pattern, entry)
            live.discard(entry)
        assert len(index) == len(live)
        for topic in probe:
            expected = {e for e in live if reference_match(e[0], topic)}
            got = index.match(topic)
            assert len(got) == len(set(got))
            assert set(got) == expected, (topic, sorted(live))
    for topic in all_topics:
        assert set(index.match(topic)) == {e for e in live if reference_match(e[0], topic)}
    for entry in list(live):
        index.remove(entry[0], entry)
    assert len(index) == 0
    assert index._root.empty()
    for topic in probe:
        assert index.match(topic) == ()


def _all_topics() -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [()]
    result: list[tuple[str, ...]] = []
    for _ in range(3):
        out = [(*prefix, token) for prefix in out for token in TOKENS]
        result += out
    return result
