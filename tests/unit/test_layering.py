"""The sans-IO core imports nothing that does I/O or reads a clock (trio's ``_core`` rule,
docs/source/design.rst): its modules are parsed, not imported, so a lazy import inside a
function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aiobus

PACKAGE = Path(aiobus.__file__).parent

CORE_MODULES = [
    "broker/core.py",
    "broker/core_state.py",
    "broker/handlers.py",
    "broker/queues.py",
    "broker/queue_table.py",
    "broker/queue_failures.py",
    "broker/queue_delivery.py",
    "broker/queue_producing.py",
    "broker/queue_state.py",
    "broker/snapshot.py",
    "broker/topics.py",
    "broker/timers.py",
    "broker/dedup.py",
    "broker/browse.py",
    "broker/settings.py",
    "broker/policy.py",
    "broker/journal/records.py",
    "broker/journal/decode.py",
    "broker/journal/replay.py",
    "client/connection.py",
    "client/dispatch.py",
    "client/session.py",
    "client/nats_map.py",
    "client/nats_topics.py",
    "protocol.py",
    "stats.py",
    "metrics.py",
    "_frame_scan.py",
    "names.py",
    "errors.py",
]

FORBIDDEN = {
    "asyncio", "anyio", "socket", "time", "uvloop", "os", "selectors", "threading",
    "select", "signal", "subprocess", "trio", "datetime",
}
# Inside aiobus, the core may import only itself: not the server, client or bridges.
CORE_NAMES = {
    "aiobus." + m.removesuffix(".py").replace("/", ".") for m in CORE_MODULES
} | {"aiobus", "aiobus.broker"}


def imports_of(relpath: str, root: Path = PACKAGE) -> set[str]:
    """Absolute dotted names of every module ``relpath`` imports, anywhere in its body."""
    path = root / relpath
    package = "aiobus." + relpath.removesuffix(".py").replace("/", ".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level)[0] if node.level else ""
            if node.module is None:  # "from . import x": x is a module
                found.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                found.add(f"{base}.{node.module}" if base else node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            found.add("__import__")
    return found


@pytest.mark.parametrize("relpath", CORE_MODULES)
def test_core_module_does_no_io_and_reads_no_clock(relpath: str) -> None:
    imported = imports_of(relpath)
    assert imported, f"{relpath}: no imports found; is the parser broken?"
    bad = sorted(name for name in imported if name.split(".")[0] in FORBIDDEN)
    assert not bad, f"aiobus/{relpath} imports {bad}; the sans-IO core must not"
    assert "__import__" not in imported
    assert "importlib" not in {name.split(".")[0] for name in imported}


@pytest.mark.parametrize("relpath", CORE_MODULES)
def test_core_module_imports_only_the_core(relpath: str) -> None:
    outside = sorted(
        name for name in imports_of(relpath)
        if name.split(".")[0] == "aiobus" and name not in CORE_NAMES
    )
    assert not outside, f"aiobus/{relpath} imports {outside} from above the core"


def test_the_parser_sees_relative_imports() -> None:
    assert {"aiobus.errors", "aiobus.names", "aiobus.protocol", "aiobus.broker.queues",
            "aiobus.broker.timers", "msgpack"} <= imports_of("broker/core_state.py")


def test_the_parser_would_catch_an_io_import(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker" / "core.py").write_text(
        "from __future__ import annotations\n"
        "def later():\n    import time.monotonic as m\n    from os import path\n"
        "from ..client import bus\n"
        "from .. import client\n"
        "from . import server\n"
    )
    found = imports_of("broker/core.py", tmp_path)
    assert {"time.monotonic", "os", "aiobus.client", "aiobus.broker.server"} <= found
