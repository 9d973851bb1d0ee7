"""Type checking as a user of the package does it: mypy run on a file outside the
checkout, against the package ``make`` installed (an editable install type checkers can
follow), and the option strings typed as ``Literal`` so a misspelt one is caught before
the broker refuses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # a cold mypy run over the package takes a few seconds

USER_FILE = '''\
import aiobus


async def main(bus: aiobus.Bus) -> None:
    await bus.declare_queue("jobs", overflow="reject", max_length=10)
    async for msg in bus.consume("jobs", prefetch=4, create=False):
        await msg.ack()
    bus.consume(7)
'''

MISSPELT = '''\
import aiobus
from aiobus.bridges import fifo_to_bus


async def main(bus: aiobus.Bus) -> None:
    await bus.declare_queue("jobs", overflow="blok")
    bus.subscribe("a.>", policy="drop-oldst")
    await fifo_to_bus(bus, "/tmp/x", queue="q", framing="line")
    await bus.declare_queue("ok", overflow="dead-letter")
    bus.subscribe("a.>", policy="disconnect")
    await fifo_to_bus(bus, "/tmp/x", queue="q", framing="netstring")
'''


def editable_mode() -> str:
    """The editable mode the Makefile installs with (``make`` runs ``pip install -e``)."""
    found = re.search(r"^EDITABLE\s*:?=.*editable_mode=(\w+)", (ROOT / "Makefile").read_text(),
                      re.MULTILINE)
    assert found, "the Makefile does not choose an editable mode type checkers can follow"
    return found.group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding this checkout as ``make`` installs it (editable, in the
    Makefile's mode); returns its python. No dependencies: mypy needs none of them to
    resolve ``aiobus``, and nothing is downloaded."""
    where = tmp_path_factory.mktemp("installed")
    # The editable wheel, from the PEP 660 hook pip would call (setuptools from the
    # test extra; pip would fetch the same into an isolated build environment).
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b;"
         " b.build_editable(sys.argv[1], {'editable_mode': sys.argv[2]})",
         str(where / "dist"), editable_mode()],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert build.returncode == 0, build.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")],
                   check=True, timeout=TIMEOUT)
    python = where / "venv" / "bin" / "python"
    (wheel,) = (where / "dist").glob("*.whl")
    # Without this checkout on the path (PYTHONPATH, the current directory): pip would
    # take an aiobus_ipc.egg-info left there by a build for an installed aiobus-ipc.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=TIMEOUT, cwd=where, env=clean_env())
    (site,) = (python.parent.parent / "lib").glob("python3*/site-packages")
    assert list(site.glob("*.pth")), "the editable install wrote no .pth file"
    return python


def clean_env() -> dict[str, str]:
    """The environment without this checkout on any path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}


def mypy(cwd: Path, python: Path, *args: str) -> tuple[int, list[str]]:
    """Run mypy as a user would: from ``cwd``, for the environment of ``python``,
    without this checkout on any path."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary",
         "--python-executable", str(python), *args],
        cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    return result.returncode, result.stdout.splitlines()


def test_a_user_file_outside_the_checkout_checks_against_the_installed_package(
        tmp_path: Path, installed: Path) -> None:
    (tmp_path / "user.py").write_text(USER_FILE)
    code, lines = mypy(tmp_path, installed, "user.py")
    # Only the deliberate mistake: aiobus was found and its signatures were used (an
    # editable install through an import hook gives import-not-found instead).
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("user.py:8: error:"), lines
    assert '"consume" of "Bus" has incompatible type "int"' in lines[0]


def test_misspelt_option_strings_are_type_errors(tmp_path: Path, installed: Path) -> None:
    (tmp_path / "user.py").write_text(MISSPELT)
    code, lines = mypy(tmp_path, installed, "user.py")
    assert code == 1
    assert [line.split(": error:")[0] for line in lines] == [
        "user.py:6", "user.py:7", "user.py:8"], lines
    assert "\"Literal['blok']\"; expected \"Literal['block', 'reject', 'dead-letter']" in lines[0]
    assert "expected \"Literal['drop-oldest', 'drop-newest', 'disconnect']\"" in lines[1]
    assert "expected \"Literal['lines', 'netstring', 'length-prefixed', 'msgpack']\"" in lines[2]
