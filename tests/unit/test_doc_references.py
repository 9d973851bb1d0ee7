"""Paths that docstrings, comments and docs point readers to must exist: a pointer to a
file that was renamed or never written (``core.py`` once named a test file that did not
exist) sends a reader nowhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A repository path: one of the top-level directories, then path characters, ending in a
# file name with an extension (``*`` allowed, as in ``tests/unit/test_core_*.py``).
REFERENCE = re.compile(
    r"(?<![\w./-])((?:aiobus|tests|docs|examples|benchmarks|contrib)/[\w./*-]*\.[a-z]+)")
SOURCES = ["aiobus/**/*.py", "tests/**/*.py", "examples/**/*.py", "benchmarks/**/*.py",
           "*.md", "docs/*.md", "examples/*.md", "benchmarks/*.md", "contrib/**/*.md"]
# Not paths in this repository: a file a command writes, and one in a project cited.
ELSEWHERE = {
    "benchmarks/results/latest.md",  # written by benchmarks/run.py, ignored by git
    "docs/source/design.rst",  # trio's, cited for the layering rule
}


def references() -> list[tuple[str, str]]:
    found = []
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            if ".venv" in path.parts:
                continue
            for match in REFERENCE.finditer(path.read_text(encoding="utf-8")):
                found.append((str(path.relative_to(ROOT)), match.group(1).rstrip(".")))
    return found


def test_referenced_paths_exist() -> None:
    found = references()
    assert len(found) > 50  # the pattern still finds the references there are
    missing = [(where, ref) for where, ref in found
               if ref not in ELSEWHERE and not any(ROOT.glob(ref))]
    assert missing == []
