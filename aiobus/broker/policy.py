"""Who may do what: the broker's access policy, parsed from TOML and matched. No I/O.

Theory of operation. A policy file is a list of ``[[allow]]`` rules; each grants
``verbs`` on queue name patterns (``queues``) or topic patterns (``topics``) to ``users``
and ``groups``, each given by name or numeric id::

    [[allow]]
    users = ["alice", 1001]
    groups = ["workers"]
    verbs = ["send", "consume"]
    queues = ["jobs.>"]

Nothing is denied by a rule: what no rule grants is refused (default deny, as
dbus-broker's policy). The broker asks :meth:`Policy.allow` once per (connection, verb,
name) and caches the answer on the connection (``_check_access``, broker/core_state.py),
so matching here is off the hot path; it still uses one :class:`~aiobus.names.TopicIndex`
per verb, the trie the topic router uses, so a policy of hundreds of rules answers in a
few dict lookups.

* ``send``, ``consume``, ``declare``, ``admin`` take queue names; ``publish`` and
  ``subscribe`` take topics. ``subscribe`` is asked with the subscription's pattern, and
  is granted when a rule's pattern covers it: every topic the subscription can match, the
  rule's pattern matches too (``a.>`` covers ``a.*.c``; ``a.*`` does not cover ``a.>``).
* ``admin`` is asked for ``purge`` and ``delete`` of one queue, and with the name ``>``
  for ``stats`` (every queue and connection): only a rule whose pattern is ``>`` grants
  that.
* Root (uid 0) may do everything unless a rule names it (``users = ["root"]`` or
  ``[0]``): root can read the broker's memory anyway, and an operator locked out of their
  own broker by a typo is worse than no rule for root. A policy that names root means
  to hold it to its rules, so then root gets what it is granted, like anyone else.
* ``$...`` names are the broker's whatever the policy says (core_state.py's
  ``_check_access`` checks them before asking); a rule may grant ``subscribe`` on
  ``$sys.`` topics, spelled out (a leading wildcard does not match them, as in
  subscriptions), and nothing else there.

Names of users and groups are resolved to ids when the file is parsed (``resolve_user``
and ``resolve_group`` come from the launcher, which reads the system's databases), so an
unknown name refuses the file instead of silently granting nothing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BusError, InvalidName
from ..names import TAIL_WILDCARD, TopicIndex, check_pattern

__all__ = ["ALL_QUEUES", "QUEUE_VERBS", "TOPIC_VERBS", "VERBS", "Policy", "PolicyError",
           "covers", "parse"]

QUEUE_VERBS = frozenset({"send", "consume", "declare", "admin"})
TOPIC_VERBS = frozenset({"publish", "subscribe"})
VERBS = QUEUE_VERBS | TOPIC_VERBS
ALL_QUEUES = TAIL_WILDCARD  # the name admin is asked with for stats of every queue
_RULE_KEYS = frozenset({"users", "groups", "verbs", "queues", "topics"})


class PolicyError(BusError, ValueError):
    """A policy file that cannot be used, with the ``line`` (1-based, or None) at fault."""

    code = "bad-policy"

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = reason
        self.line = line


@dataclass(frozen=True, slots=True)
class Grant:
    """One rule's grantees (rule numbers keep equal grantees of two rules apart)."""

    rule: int
    uids: frozenset[int]
    gids: frozenset[int]


class Policy:
    """Parsed rules, indexed per verb. Build with :func:`parse`."""

    def __init__(self, rules: Iterable[tuple[frozenset[str], list[str], Grant]] = ()) -> None:
        self._index: dict[str, TopicIndex[Grant]] = {verb: TopicIndex() for verb in VERBS}
        self._patterns: dict[str, list[tuple[str, Grant]]] = {verb: [] for verb in VERBS}
        self.rules = 0
        self._root_is_ruled = False  # some rule names uid 0: no blanket pass for root
        for verbs, patterns, grant in rules:
            self.rules += 1
            self._root_is_ruled |= 0 in grant.uids
            for verb in verbs:
                for pattern in patterns:
                    self._index[verb].add(pattern, grant)
                    self._patterns[verb].append((pattern, grant))

    def allow(self, uid: int, gids: Iterable[int], verb: str, name: str) -> bool:
        """May the client ``uid`` in groups ``gids`` do ``verb`` on ``name``?

        ``name`` is a checked queue name or topic, or for ``subscribe`` a checked pattern.
        """
        if uid == 0 and not self._root_is_ruled:
            return True
        if verb == "subscribe" or name == ALL_QUEUES:
            grants = [grant for pattern, grant in self._patterns[verb]
                      if covers(pattern, name)]
        else:
            grants = list(self._index[verb].match(name))
        return any(uid in grant.uids or not grant.gids.isdisjoint(gids) for grant in grants)


def covers(granted: str, asked: str) -> bool:
    """True if every name pattern ``asked`` matches is matched by pattern ``granted``
    (a plain name is a pattern that matches itself)."""
    have, want = granted.split("."), asked.split(".")
    if have[0].startswith("$") or want[0].startswith("$"):  # wildcards stop at '$'
        if have[0] != want[0]:
            return False
    for i, token in enumerate(have):
        if token == TAIL_WILDCARD:
            return len(want) > i  # '>' takes one or more tokens, '>' among them
        if i >= len(want) or want[i] == TAIL_WILDCARD:
            return False
        if token != "*" and token != want[i]:
            return False
    return len(want) == len(have)


def _line_of(text: str, rule: int, key: str | None = None) -> int | None:
    """The line of rule number ``rule``'s ``key`` (or its ``[[allow]]`` header): tomllib
    gives positions for syntax errors only, so meaning errors are located here."""
    seen = -1
    header = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            if header is not None and seen == rule:
                break  # past the rule without finding the key
            if stripped.replace(" ", "").startswith("[[allow]]"):
                seen += 1
                if seen == rule:
                    header = number
            continue
        if header is not None and key is not None:
            name = stripped.split("=", 1)[0].strip().strip('"')
            if "=" in stripped and name == key:
                return number
    return header


def parse(text: str, *, resolve_user: Callable[[str], int],
          resolve_group: Callable[[str], int]) -> Policy:
    """Parse a policy file's text into a :class:`Policy`.

    Args:
        text: the TOML document.
        resolve_user: a user name to its uid; raises KeyError for an unknown name.
        resolve_group: a group name to its gid; raises KeyError for an unknown name.

    Returns:
        The policy.

    Raises:
        PolicyError: with the line and the reason.

    Example::

        policy = parse('[[allow]]\\nusers = [1000]\\nverbs = ["send"]\\nqueues = ["a"]',
                       resolve_user=pwd_uid, resolve_group=grp_gid)
        assert policy.allow(1000, (), "send", "a")
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # "... (at line 3, column 7)"
        message = str(exc)
        line = None
        if "(at line " in message:
            message, _, where = message.rpartition(" (at line ")
            line = int(where.split(",")[0])
        raise PolicyError(message, line) from exc
    extra = sorted(set(document) - {"allow"})
    if extra:
        raise PolicyError(f"unknown table or key {extra[0]!r}: a policy has only [[allow]]"
                          " rules", _first_line_with(text, extra[0]))
    rules = document.get("allow", [])
    if type(rules) is not list:
        raise PolicyError("'allow' must be an array of tables: write [[allow]]",
                          _first_line_with(text, "allow"))
    return Policy(_rule(text, i, rule, resolve_user, resolve_group)
                  for i, rule in enumerate(rules))


def _first_line_with(text: str, word: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if word in line:
            return number
    return None


def _rule(text: str, i: int, rule: dict[str, Any], resolve_user: Callable[[str], int],
          resolve_group: Callable[[str], int]) -> tuple[frozenset[str], list[str], Grant]:
    def fail(key: str | None, reason: str) -> PolicyError:
        return PolicyError(reason, _line_of(text, i, key))

    for key in rule:
        if key not in _RULE_KEYS:
            raise fail(key, f"unknown key {key!r}; a rule has {', '.join(sorted(_RULE_KEYS))}")
    lists = {}
    for key in _RULE_KEYS:
        value = rule.get(key, [])
        if type(value) is not list:
            raise fail(key, f"{key!r} must be a list")
        lists[key] = value
    verbs = lists["verbs"]
    if not verbs:
        raise fail(None, "this rule grants no 'verbs'")
    for verb in verbs:
        if verb not in VERBS:
            raise fail("verbs", f"unknown verb {verb!r}; verbs are {', '.join(sorted(VERBS))}")
    verb_set = frozenset(verbs)
    uids = frozenset(_ids(lists["users"], resolve_user, "user", lambda r: fail("users", r)))
    gids = frozenset(_ids(lists["groups"], resolve_group, "group",
                          lambda r: fail("groups", r)))
    if not uids and not gids:
        raise fail(None, "this rule grants nothing to nobody: give 'users' or 'groups'")
    queue_verbs, topic_verbs = verb_set & QUEUE_VERBS, verb_set & TOPIC_VERBS
    if queue_verbs and topic_verbs:
        raise fail("verbs", "a rule grants either queue verbs (send, consume, declare,"
                            " admin) or topic verbs (publish, subscribe): split it in two")
    key = "queues" if queue_verbs else "topics"
    other = "topics" if queue_verbs else "queues"
    if lists[other]:
        raise fail(other, f"{'/'.join(sorted(verb_set))} take {key}, not {other}")
    patterns = lists[key]
    if not patterns:
        raise fail(None, f"this rule grants {'/'.join(sorted(verb_set))} but lists no {key}")
    for pattern in patterns:
        try:
            check_pattern(pattern)
        except InvalidName as exc:
            raise fail(key, str(exc)) from None
        if pattern.startswith("$") and not (verb_set == {"subscribe"}
                                            and pattern.split(".")[0] == "$sys"):
            raise fail(key, f"pattern {pattern!r}: '$' names are the broker's; only"
                            " 'subscribe' to '$sys.' topics may be granted")
    return verb_set, patterns, Grant(i, uids, gids)


def _ids(values: list[Any], resolve: Callable[[str], int], what: str,
         fail: Callable[[str], PolicyError]) -> Iterable[int]:
    for value in values:
        if type(value) is int:
            if not 0 <= value < 2**32:
                raise fail(f"{what} id {value} is out of range")
            yield value
        elif type(value) is str:
            try:
                yield resolve(value)
            except KeyError:
                raise fail(f"no {what} named {value!r} on this system") from None
        else:
            raise fail(f"a {what} is a name or a numeric id, not {value!r}")
