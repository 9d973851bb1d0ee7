"""The optional compiled build: mypyc compiles the broker's hot modules when asked.

Everything about the package is in pyproject.toml; this file only adds extension modules,
and only when ``AIOBUS_COMPILE=1`` is set (``make compiled``, docs/performance.md,
"A compiled build"). Without it, or when mypyc or a C compiler is missing or fails, the
pure-Python package is built as before: the compiled modules are an optional speed-up,
never a requirement. Build it out of tree (``make compiled`` copies the sources to a
temporary directory): an extension module next to its ``.py`` is what Python imports, so a
stale one in a working tree would silently run old code.

mypyc needs mypy importable in the building interpreter, so build without isolation:
``AIOBUS_COMPILE=1 pip wheel --no-build-isolation --no-deps .``
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The per-message paths: the broker's sans-IO core and codec, the journal's records
# (records.py, decode.py), replay and store (store.py and its layers appending.py,
# segments.py and compaction.py; every durable message, and recovery's loop over every
# record), and the asyncio shell that feeds them (server.py and the modules its Broker
# and connections are made of: connection.py, output.py, durable.py, shutdown.py,
# logs.py; a compiled class's bases must be compiled too); the client's connection
# (connection.py, dispatch.py) and session (sans-IO), its streams and messages, the
# Unix-socket backend (unix.py, unix_link.py, deadlines.py) and the Bus (bus.py,
# admin.py; compiled, a tenth to a third less client CPU per message,
# docs/performance.md). Left out: aiobus/broker/policy.py (asked once per connection and
# name, and tests subclass Policy, which a compiled class forbids), the journal's
# files.py (one write per loop turn; and compiled, its loop over a memoryview,
# ``view = view[os.write(handle, view):]``, wrote the data twice) and repair.py (run
# once, by hand), errors.py (exceptions get attributes added at run time), the NATS
# backend (nats-py's time, not ours) and the CLI.
COMPILED = [
    "aiobus/_frame_scan.py",
    "aiobus/names.py",
    "aiobus/protocol.py",
    "aiobus/broker/connection.py",
    "aiobus/broker/core.py",
    "aiobus/broker/core_state.py",
    "aiobus/broker/dedup.py",
    "aiobus/broker/durable.py",
    "aiobus/broker/handlers.py",
    "aiobus/broker/journal/appending.py",
    "aiobus/broker/journal/compaction.py",
    "aiobus/broker/journal/decode.py",
    "aiobus/broker/journal/records.py",
    "aiobus/broker/journal/recovery.py",
    "aiobus/broker/journal/replay.py",
    "aiobus/broker/journal/segments.py",
    "aiobus/broker/journal/store.py",
    "aiobus/broker/logs.py",
    "aiobus/broker/output.py",
    "aiobus/broker/queue_delivery.py",
    "aiobus/broker/queue_failures.py",
    "aiobus/broker/queue_producing.py",
    "aiobus/broker/queue_state.py",
    "aiobus/broker/queue_table.py",
    "aiobus/broker/queues.py",
    "aiobus/broker/server.py",
    "aiobus/broker/settings.py",
    "aiobus/broker/shutdown.py",
    "aiobus/broker/timers.py",
    "aiobus/broker/topics.py",
    "aiobus/client/admin.py",
    "aiobus/client/bus.py",
    "aiobus/client/connection.py",
    "aiobus/client/deadlines.py",
    "aiobus/client/dispatch.py",
    "aiobus/client/message.py",
    "aiobus/client/session.py",
    "aiobus/client/streams.py",
    "aiobus/client/unix.py",
    "aiobus/client/unix_link.py",
]


def _warn(message: str) -> None:
    print(f"aiobus: {message}; building pure Python", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to no extensions at all if any of them fails to build
    (mypyc's modules share one library: a partial set would not import)."""

    def run(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        if (self.inplace or self.editable_mode) and os.path.exists(os.path.join(here, ".git")):
            # An editable install or --inplace in a checkout would put the .so files next
            # to the sources they would then shadow, edited or not.
            _warn("not compiling into a git checkout (build from a copy: make compiled)")
            self.extensions = []
            return
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a missing compiler or header
            _warn(f"compiling failed ({type(exc).__name__}: {exc})")
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


def _ext_modules() -> list[Any]:
    if os.environ.get("AIOBUS_COMPILE") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        _warn(f"mypyc is not importable ({exc})")
        return []
    try:
        return list(mypycify(COMPILED, opt_level="3"))
    except (Exception, SystemExit) as exc:  # mypy reports type errors with SystemExit
        _warn(f"mypyc refused the sources ({type(exc).__name__}: {exc})")
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
