"""``aiobus-broker --print-unit``: the systemd units written for the installation at hand
pass ``systemd-analyze verify`` (the shipped ``ExecStart=/usr/bin/aiobus-broker`` did
not after a pip install into a virtualenv), and contrib/systemd/ holds the same units
for /usr/bin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aiobus.units import unit_file

ROOT = Path(__file__).resolve().parents[2]
BROKER = shutil.which("aiobus-broker", path=os.path.dirname(sys.executable))
TIMEOUT = 60


def print_unit(unit: str, *command: str) -> str:
    result = subprocess.run([*command, "--print-unit", unit], capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and not result.stderr, result
    return result.stdout


def exec_start(text: str) -> str:
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def test_the_unit_names_the_broker_that_printed_it() -> None:
    assert BROKER is not None, "the aiobus-broker console script is not beside python"
    assert exec_start(print_unit("service", BROKER)) == BROKER
    # Run as a module, it names the script beside the interpreter, which exists here.
    by_module = print_unit("service", sys.executable, "-m", "aiobus.cli.broker")
    assert exec_start(by_module) == BROKER
    assert print_unit("socket", BROKER) == unit_file("socket")


def test_printed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    assert BROKER is not None
    for unit in ("service", "socket"):
        (tmp_path / f"aiobus.{unit}").write_text(print_unit(unit, BROKER))
    # System mode: --user needs a user manager's runtime directory, which a test (or a
    # CI container) may not have; the checks of the unit files are the same.
    result = subprocess.run([analyze, "verify", "aiobus.service", "aiobus.socket"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stderr) == (0, ""), result


def test_contrib_holds_the_units_for_usr_bin() -> None:
    for unit in ("service", "socket"):
        shipped = (ROOT / "contrib" / "systemd" / f"aiobus.{unit}").read_text()
        assert shipped == unit_file(unit, "/usr/bin/aiobus-broker")
