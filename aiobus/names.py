"""Name grammar and the wildcard subscription index.

Queue names and topics are dot-separated, non-empty tokens (``orders.eu.created``), at
most 255 characters, with no whitespace and no wildcard characters. Subscription
patterns may use ``*`` as a whole token (exactly one token) and ``>`` as the last token
(one or more trailing tokens), as NATS subjects do.

Names whose first token starts with ``$`` are reserved for the broker (``$sys.…``):
clients may subscribe to them but not publish to them or use them as queues. As MQTT
does for ``$SYS`` (MQTT 3.1.1 §4.7.2), a pattern starting with a wildcard does not match
a ``$`` topic, so ``>`` is not flooded with presence events.

Theory of operation of :class:`TopicIndex`: a token trie whose nodes hold the entries
subscribed with a pattern ending there, plus a ``*`` child and the entries of a trailing
``>``. Matching walks the trie with the topic's tokens, following both the literal child
and the ``*`` child, so its cost depends on the depth of the topic and the number of
wildcard branches, never on the number of subscriptions. Results are cached per topic
(as nats-server's sublist cache); any change to the index clears the cache.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from .errors import InvalidName, shown

__all__ = [
    "MAX_NAME_LENGTH",
    "TopicIndex",
    "check_name",
    "check_pattern",
    "is_reserved",
    "matches",
]

MAX_NAME_LENGTH = 255
SINGLE_WILDCARD = "*"
TAIL_WILDCARD = ">"
_FORBIDDEN_CHARS = frozenset(" \t\r\n\v\f\x00*>")
_CACHE_LIMIT = 4096

T = TypeVar("T", bound=Hashable)


def _tokens(name: object, what: str) -> list[str]:
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidName(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} {shown(name)} is longer than {MAX_NAME_LENGTH} characters")
    tokens = name.split(".")
    if "" in tokens:
        raise InvalidName(
            f"{what} {shown(name)} has an empty token: use dot-separated non-empty tokens"
            " like 'orders.eu'"
        )
    return tokens


def check_name(name: object, what: str = "name") -> str:
    """Check a queue name or topic (no wildcards) and return it.

    Raises:
        InvalidName: naming what is wrong with it.
    """
    tokens = _tokens(name, what)
    for token in tokens:
        if not _FORBIDDEN_CHARS.isdisjoint(token):
            raise InvalidName(
                f"{what} {shown(name)} contains whitespace, NUL or a wildcard ('*', '>');"
                " wildcards are only allowed in subscription patterns"
            )
    assert isinstance(name, str)
    return name


def check_pattern(pattern: object) -> str:
    """Check a subscription pattern and return it.

    Raises:
        InvalidName: naming what is wrong with it.
    """
    tokens = _tokens(pattern, "pattern")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token == SINGLE_WILDCARD:
            continue
        if token == TAIL_WILDCARD:
            if i != last:
                raise InvalidName(f"pattern {shown(pattern)}: '>' may only be the last token")
            continue
        if not _FORBIDDEN_CHARS.isdisjoint(token):
            raise InvalidName(
                f"pattern {shown(pattern)}: wildcards must be whole tokens ('a.*.c', 'a.>');"
                " whitespace and NUL are not allowed"
            )
    assert isinstance(pattern, str)
    return pattern


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` (a checked pattern: ``*`` one token, a last
    ``>`` one or more), as a subscription would; for filtering a list of names."""
    want, have = pattern.split("."), name.split(".")
    for i, token in enumerate(want):
        if token == TAIL_WILDCARD:
            return len(have) > i
        if i >= len(have) or (token != SINGLE_WILDCARD and token != have[i]):
            return False
    return len(have) == len(want)


def is_reserved(name: str) -> bool:
    """True for names reserved to the broker (first token starts with ``$``)."""
    return name.startswith("$")


class _Node(Generic[T]):
    __slots__ = ("children", "entries", "single", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.single: _Node[T] | None = None
        self.entries: set[T] = set()  # patterns ending exactly here
        self.tail: set[T] = set()  # patterns ending here with a trailing '>'

    def empty(self) -> bool:
        return not (self.children or self.single or self.entries or self.tail)


class TopicIndex(Generic[T]):
    """Maps subscription patterns to entries; ``match(topic)`` finds all entries whose
    pattern matches. Entries are any hashable values (the broker uses subscriptions)."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._cache: dict[str, tuple[T, ...]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, entry: T) -> None:
        """Add ``entry`` under an already checked ``pattern``."""
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = self._child(node, token)
        last = tokens[-1]
        if last == TAIL_WILDCARD:
            node.tail.add(entry)
        else:
            self._child(node, last).entries.add(entry)
        self._count += 1
        self._cache.clear()

    def remove(self, pattern: str, entry: T) -> None:
        """Remove ``entry`` from ``pattern``; pruning emptied nodes. Missing is a KeyError."""
        tokens = pattern.split(".")
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for token in tokens[:-1]:
            path.append((node, token))
            node = self._step(node, token)
        last = tokens[-1]
        if last == TAIL_WILDCARD:
            node.tail.remove(entry)
        else:
            path.append((node, last))
            node = self._step(node, last)
            node.entries.remove(entry)
        self._count -= 1
        self._cache.clear()
        for parent, token in reversed(path):
            child = self._step(parent, token)
            if not child.empty():
                break
            if token == SINGLE_WILDCARD:
                parent.single = None
            else:
                del parent.children[token]

    def match(self, topic: str) -> tuple[T, ...]:
        """All entries whose pattern matches the (checked) ``topic``."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        found: set[T] = set()
        tokens = topic.split(".")
        self._walk(self._root, tokens, 0, found, topic.startswith("$"))
        result = tuple(found)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(
        self, node: _Node[T], tokens: list[str], i: int, found: set[T], reserved: bool
    ) -> None:
        # A wildcard in first position does not match a reserved ($...) topic.
        wild_ok = not (reserved and i == 0)
        if i == len(tokens):
            found.update(node.entries)
            return
        if wild_ok and node.tail:  # '>' needs at least one more token: here there is one
            found.update(node.tail)
        child = node.children.get(tokens[i])
        if child is not None:
            self._walk(child, tokens, i + 1, found, reserved)
        if wild_ok and node.single is not None:
            self._walk(node.single, tokens, i + 1, found, reserved)

    @staticmethod
    def _child(node: _Node[T], token: str) -> _Node[T]:
        if token == SINGLE_WILDCARD:
            if node.single is None:
                node.single = _Node()
            return node.single
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node()
        return child

    @staticmethod
    def _step(node: _Node[T], token: str) -> _Node[T]:
        nxt = node.single if token == SINGLE_WILDCARD else node.children.get(token)
        if nxt is None:
            raise KeyError(token)
        return nxt
