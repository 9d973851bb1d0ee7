"""Options anywhere on the command line, and "did you mean" for a mistyped command.

argparse matches positionals greedily: in ``aiobus send demo --json '{"a": 1}'`` the
queue and the (optional) body are matched together when ``demo`` is seen, the body
comes out empty, and ``{"a": 1}`` is left over ("unrecognized arguments"). Its
``parse_intermixed_args`` parses options first and positionals after, but refuses a
parser with subcommands. So :func:`parse` parses once as usual and, if arguments are
left over, parses again the innermost subcommand's own arguments, intermixed, into the
same namespace: options may then come before, between or after its positionals, and an
error shows that subcommand's usage instead of the top-level one.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

__all__ = ["parse"]


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _suggest(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Before argparse refuses an unknown command, say which one was probably meant
    (for nested commands too: ``aiobus queue lsit``)."""
    commands = _subcommands(parser)
    if commands is None:
        return
    for i, token in enumerate(argv):
        if token.startswith("-") or (i and argv[i - 1] == "--socket"):
            continue
        if token in commands.choices:
            _suggest(commands.choices[token], argv[i + 1:])
            return
        close = difflib.get_close_matches(token, list(commands.choices), n=1)
        if close:
            parser.error(f"unknown command {token!r}; did you mean {close[0]!r}?")
        return


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with each subcommand's options allowed anywhere."""
    _suggest(parser, argv)
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    # The innermost subcommand chosen, and where its own arguments start.
    leaf, start = parser, 0
    while (commands := _subcommands(leaf)) is not None:
        name = getattr(args, commands.dest, None)
        if name is None or name not in argv[start:]:
            break
        start = argv.index(name, start) + 1
        leaf = commands.choices[name]
    if leaf is parser:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return leaf.parse_intermixed_args(argv[start:], namespace=args)
