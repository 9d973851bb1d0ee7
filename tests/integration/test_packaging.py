"""The package as a user installs it: ``python -m build`` makes an sdist and, from it, a
wheel; the wheel goes into a fresh venv, which then imports aiobus and runs the
commands. Bounded: a few seconds, and nothing is downloaded (the venv borrows the
dependencies this test run already has)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
DIST = "aiobus_ipc"  # the distribution name ("aiobus" on the public index is another project)


def clean_env() -> dict[str, str]:
    """No checkout on any path: the installed package or nothing."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (it is in the test extra:"
                    " pip install -e '.[test]')")
    where = tmp_path_factory.mktemp("build")
    # A copy of the checkout, so the build's scratch directories stay out of it (and
    # out of a concurrent test's way).
    source = where / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*_cache", ".hypothesis", "build", "dist", "*.egg-info",
        "__pycache__", "benchmarks"))
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(where / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=TIMEOUT, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = (where / "dist").glob(f"{DIST}-*.whl")
    assert len(list((where / "dist").glob(f"{DIST}-*.tar.gz"))) == 1
    return built


def test_the_wheel_carries_the_package_license_and_metadata(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "aiobus/__init__.py" in names and "aiobus/py.typed" in names
    assert {"aiobus/units/aiobus.service", "aiobus/units/aiobus.socket"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "Name: aiobus-ipc" in metadata and "License-Expression: MIT" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_the_wheel_installs_into_a_fresh_venv_and_runs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=TIMEOUT)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=TIMEOUT, cwd=tmp_path, env=clean_env())
    # The dependencies (msgpack, anyio, uvloop) from this test run's environment, after
    # the venv's own site-packages: a .pth line appends a directory to sys.path (its own
    # .pth files, such as this checkout's editable install, are not read).
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    found = subprocess.run(
        [str(python), "-c", "import aiobus, sys; print(aiobus.__file__); print(aiobus.Bus)"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(str(site / "aiobus" / "__init__.py")), found.stdout
    for command in ("aiobus", "aiobus-broker"):
        helped = subprocess.run([str(venv / "bin" / command), "--help"], cwd=tmp_path,
                                env=clean_env(), capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith(f"usage: {command}"), helped.stdout[:200]
    # The systemd unit names the venv's broker, not /usr/bin's.
    unit = subprocess.run([str(venv / "bin" / "aiobus-broker"), "--print-unit", "service"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert f"\nExecStart={venv / 'bin' / 'aiobus-broker'}\n" in unit.stdout, unit
