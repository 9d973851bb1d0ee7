"""``aiobus completion bash|zsh``: the script, sourced in a real shell, completes
commands, options and option values, as the shell's TAB would (the completion function
is called with COMP_WORDS/COMP_CWORD set, and COMPREPLY read back)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 30

# (command line, the word being completed last) -> what TAB offers.
CASES: list[tuple[list[str], set[str]]] = [
    (["aiobus", "s"], {"send", "stat", "signal-out"}),
    (["aiobus", "comp"], {"completion"}),
    (["aiobus", "queue", ""], {"list", "purge", "delete"}),
    (["aiobus", "--socket", "/x/b.sock", "queue", "p"], {"purge"}),
    (["aiobus", "queue", "list", "--j"], {"--json"}),
    (["aiobus", "consume", "jobs", "--c"], {"--create", "--count"}),
    (["aiobus", "send", "q", "--socket", "/tmp/x", "--j"], {"--json"}),
    (["aiobus", "fifo-in", "--framing", ""], {"lines", "netstring", "length-prefixed",
                                               "msgpack"}),
    (["aiobus", "fifo-in", "--framing", "l"], {"lines", "length-prefixed"}),
    (["aiobus", "--socket", "b"], {"b.sock"}),  # a file name, from the current directory
    (["aiobus", "fifo-out", "b"], {"b.sock"}),  # PATH
    (["aiobus", "consume", ""], set()),  # a queue name: nothing to offer
    (["aiobus", "completion", ""], {"bash", "zsh"}),
    (["aiobus-broker", "--fsync", ""], {"always", "batch", "never"}),
    (["aiobus-broker", "--log-f"], {"--log-format"}),
]


def generated(shell: str) -> str:
    result = subprocess.run([sys.executable, "-m", "aiobus", "completion", shell],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and not result.stderr, result
    return result.stdout


def run_cases(shell: list[str], prelude: str, tmp_path: Path) -> list[set[str]]:
    """Call the completion function for each case in one shell; returns the offers."""
    (tmp_path / "b.sock").touch()
    lines = [prelude]
    for words, _ in CASES:
        quoted = " ".join(shlex.quote(w) for w in words)
        lines.append(f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=()")
        lines.append('_aiobus; printf "%s\\n" "${COMPREPLY[@]}"; echo "--end--"')
    result = subprocess.run([*shell, "\n".join(lines)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and not result.stderr, result
    blocks = result.stdout.split("--end--\n")[:-1]
    assert len(blocks) == len(CASES), result.stdout
    return [set(block.split()) for block in blocks]


def test_bash_completes_commands_options_and_values(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None, "bash is part of every system this runs on"
    (tmp_path / "aiobus.bash").write_text(generated("bash"))
    got = run_cases([bash, "--norc", "--noprofile", "-c"],
                    "set -e; source aiobus.bash; complete -p aiobus aiobus-broker >/dev/null",
                    tmp_path)
    assert got == [expected for _, expected in CASES]


def test_zsh_completes_through_bashcompinit(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (apt-get install zsh)")
    (tmp_path / "aiobus.zsh").write_text(generated("zsh"))
    got = run_cases([zsh, "-f", "-c"],
                    "set -e; autoload -U compinit; compinit -u; source ./aiobus.zsh", tmp_path)
    assert got == [expected for _, expected in CASES]


def test_unknown_shell_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "aiobus", "completion", "fish"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2 and "invalid choice: 'fish'" in result.stderr
