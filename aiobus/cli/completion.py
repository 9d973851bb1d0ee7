"""``aiobus completion bash|zsh``: a shell completion script for ``aiobus`` and
``aiobus-broker``, printed on stdout.

The script is generated from the argparse parsers themselves, so it completes exactly
the commands, options and option choices that parse: per command path (``aiobus``,
``aiobus queue``, ``aiobus queue purge``, ``aiobus-broker``) it holds the subcommands,
the options, which options take a value, their choices, and where a file name goes
(``--socket PATH``, ``fifo-in PATH``); a positional's choices (``completion SHELL``)
count as the words that may come next, as subcommands do. Nothing runs Python at TAB
time: a shell function looks these tables up, which is instant (calling back into
``aiobus`` would cost an interpreter start, ~100 ms, per TAB).

zsh runs the same function through its ``bashcompinit`` layer (0-based arrays,
``compgen``), which zsh ships for this.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterator
from typing import Final

from .options import HelpFormatter
from .parsing import _subcommands

__all__ = ["register", "script"]

SHELLS: Final = ("bash", "zsh")
# Metavars whose values are file names.
_FILE_METAVARS: Final = frozenset({"PATH", "FILE", "DIR"})

_FUNCTION = r"""
_aiobus_offer() {  # the lines of $1 that start with $cur (zsh's compgen does not filter)
    local IFS=$'\n' word
    for word in $1; do
        [[ -n $word && $word == "$cur"* ]] && COMPREPLY+=("$word")
    done
    return 0
}

_aiobus() {
    [[ -n ${ZSH_VERSION-} ]] && setopt localoptions ksharrays shwordsplit
    local cur=${COMP_WORDS[COMP_CWORD]} prev= key=${COMP_WORDS[0]##*/} word i lookup
    local nl=$'\n'
    (( COMP_CWORD > 0 )) && prev=${COMP_WORDS[COMP_CWORD-1]}
    # The command path: the words naming subcommands, skipping options and their values.
    for (( i = 1; i < COMP_CWORD; i++ )); do
        word=${COMP_WORDS[i]}
        [[ $word == -* ]] && continue
        [[ " ${_aiobus_valued[$key]-} " == *" ${COMP_WORDS[i-1]} "* ]] && continue
        [[ " ${_aiobus_subs[$key]-} " == *" $word "* ]] && key="$key $word"
    done
    COMPREPLY=()
    if [[ $prev == -* && " ${_aiobus_valued[$key]-} " == *" $prev "* ]]; then
        lookup="$key $prev"
        if [[ -n ${_aiobus_choices[$lookup]-} ]]; then
            _aiobus_offer "${_aiobus_choices[$lookup]// /$nl}"
        elif [[ -n ${_aiobus_files[$lookup]-} ]]; then
            _aiobus_offer "$(compgen -f -- "$cur")"
        fi
    elif [[ $cur == -* ]]; then
        _aiobus_offer "${_aiobus_opts[$key]// /$nl}"
    elif [[ -n ${_aiobus_subs[$key]-} ]]; then
        _aiobus_offer "${_aiobus_subs[$key]// /$nl}"
    elif [[ -n ${_aiobus_files[$key]-} ]]; then
        _aiobus_offer "$(compgen -f -- "$cur")"
    fi
    return 0
}
complete -F _aiobus aiobus aiobus-broker
"""

_HEADERS = {
    "bash": """\
# bash completion for aiobus and aiobus-broker, written by `aiobus completion bash`.
# Install (then open a new shell):
#   mkdir -p ~/.local/share/bash-completion/completions
#   aiobus completion bash > ~/.local/share/bash-completion/completions/aiobus
#   ln -sf aiobus ~/.local/share/bash-completion/completions/aiobus-broker
# or add to ~/.bashrc:  source <(aiobus completion bash)
""",
    "zsh": """\
# zsh completion for aiobus and aiobus-broker, written by `aiobus completion zsh`.
# Install: add to ~/.zshrc, after compinit:  source <(aiobus completion zsh)
autoload -U +X bashcompinit && bashcompinit
""",
}


def _tree(parser: argparse.ArgumentParser, key: str
          ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield key, parser
    commands = _subcommands(parser)
    if commands is not None:
        for name, child in commands.choices.items():
            yield from _tree(child, f"{key} {name}")


def _tables(parsers: dict[str, argparse.ArgumentParser]) -> dict[str, dict[str, str]]:
    tables: dict[str, dict[str, str]] = {
        "subs": {}, "opts": {}, "valued": {}, "choices": {}, "files": {}}
    for program, root in parsers.items():
        for key, parser in _tree(root, program):
            commands = _subcommands(parser)
            if commands is not None:
                tables["subs"][key] = " ".join(commands.choices)
            options: list[str] = []
            valued: list[str] = []
            for action in parser._actions:
                if not action.option_strings:
                    if commands is not None:
                        continue  # the subcommands themselves
                    if action.choices is not None:  # offered as the next words
                        tables["subs"][key] = " ".join(str(c) for c in action.choices)
                    elif action.metavar in _FILE_METAVARS:
                        tables["files"][key] = "1"
                    continue
                options += action.option_strings
                if action.nargs == 0:
                    continue  # a flag
                valued += action.option_strings
                for option in action.option_strings:
                    if action.choices is not None:
                        tables["choices"][f"{key} {option}"] = " ".join(
                            str(choice) for choice in action.choices)
                    elif action.metavar in _FILE_METAVARS:
                        tables["files"][f"{key} {option}"] = "1"
            tables["opts"][key] = " ".join(options)
            if valued:
                tables["valued"][key] = " ".join(valued)
    return tables


def script(shell: str, parsers: dict[str, argparse.ArgumentParser]) -> str:
    """The completion script for ``shell`` ("bash" or "zsh") covering ``parsers``
    (program name to its parser)."""
    lines = [_HEADERS[shell]]
    for name, table in _tables(parsers).items():
        lines.append(f"declare -gA _aiobus_{name}=(")
        lines += [f"    [{shlex.quote(key)}]={shlex.quote(value)}"
                  for key, value in sorted(table.items())]
        lines.append(")")
    return "\n".join(lines) + _FUNCTION


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             root: Callable[[], dict[str, argparse.ArgumentParser]]) -> None:
    """Add ``completion``; ``root()`` gives the parsers to complete, by program name."""
    p = subparsers.add_parser(
        "completion", help="print a shell completion script (bash or zsh)",
        description="Print a completion script for aiobus and aiobus-broker: commands,"
                    " options and their choices complete with TAB. It needs no broker.\n"
                    "bash: aiobus completion bash >"
                    " ~/.local/share/bash-completion/completions/aiobus (and a symlink"
                    " aiobus-broker -> aiobus there), or in ~/.bashrc:"
                    " source <(aiobus completion bash)\n"
                    "zsh: in ~/.zshrc, after compinit: source <(aiobus completion zsh)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("shell", choices=SHELLS)

    def offline(args: argparse.Namespace) -> int:
        print(script(args.shell, root()), end="")
        return 0

    p.set_defaults(offline=offline)
