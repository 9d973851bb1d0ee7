"""The optional compiled build (setup.py with ``AIOBUS_COMPILE=1``): built out of tree, its
hot modules import as extension modules, and the unit suite and a sample of the broker
process tests pass against it, so both builds run the same tests.

Marked ``compiled`` and deselected by default: compiling takes one to three minutes on
two cores (``make compiled-test`` runs it). It skips, naming what is missing, only where
a compiled build cannot be made: no C compiler, no Python headers, or no mypyc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.compiled, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
# What runs against the compiled modules: every unit test, the broker process tests of
# the queue and topic paths (whose broker imports the compiled server and core, and
# whose test process the compiled client), and the client's sessions: confirmations,
# resends, reconnects and failures.
SUITE = [
    "tests/unit",
    "tests/integration/test_queues.py",
    "tests/integration/test_topics.py",
    "tests/integration/test_model_broker.py",
    "tests/integration/test_confirms.py",
    "tests/integration/test_dedup.py",
    "tests/integration/test_reconnect.py",
    "tests/integration/test_failures.py",
]
BUILD_TIMEOUT = 900  # seconds: mypyc and gcc on a loaded 2-core machine take 1.5-2.5 min
SUITE_TIMEOUT = 900


def _missing() -> str | None:
    """What a compiled build lacks here, or None."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"C compiler ({compiler})"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "Python headers (Python.h)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc (it ships with mypy: pip install -e '.[test]')"
    return None


def test_the_compiled_build_passes_the_suite(tmp_path: Path) -> None:
    missing = _missing()
    if missing is not None:
        pytest.skip(f"cannot build the compiled modules here: no {missing}")
    # A copy of the checkout (the tests read its docs and examples too), never built in.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*_cache", ".hypothesis", "build", "dist", "*.egg-info",
        "__pycache__", "*.so"))
    env = {**os.environ, "AIOBUS_COMPILE": "1", "PYTHONPATH": str(tree)}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=tree, env=env, capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    assert "building pure Python" not in build.stderr, build.stderr[-4000:]

    probe = subprocess.run(
        [sys.executable, "-c", "import aiobus.broker.core, aiobus.broker.server, aiobus.protocol,"
         " aiobus.client.connection, aiobus.client.unix;"
         "print(aiobus.broker.core.__file__, aiobus.broker.server.__file__,"
         " aiobus.protocol.__file__, aiobus.client.connection.__file__,"
         " aiobus.client.unix.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    files = probe.stdout.split()
    assert len(files) == 5 and all(f.endswith(".so") for f in files), probe.stdout
    assert all(f.startswith(str(tree)) for f in files), probe.stdout

    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITE],
        cwd=tree, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT)
    assert suite.returncode == 0, suite.stdout[-6000:] + suite.stderr[-2000:]
