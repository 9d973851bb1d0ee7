"""The systemd units for the broker (``aiobus.socket``, ``aiobus.service``), shipped in
the package so that ``aiobus-broker --print-unit`` can write them for the installation
at hand: ``ExecStart=`` must name the ``aiobus-broker`` actually installed, by absolute
path (systemd does not search ``$PATH``), and after ``pip install`` into a virtualenv
that is not ``/usr/bin``. contrib/systemd/ holds the same files rendered for
``/usr/bin/aiobus-broker`` (a test keeps them equal).
"""

from __future__ import annotations

import os
import shlex
import sys
from importlib import resources
from typing import Final

__all__ = ["UNITS", "broker_command", "unit_file"]

UNITS: Final = ("service", "socket")
_PLACEHOLDER: Final = "@BROKER@"


def broker_command() -> str:
    """The command line that starts this installation's broker, absolute.

    The ``aiobus-broker`` script being run, if that is what runs; else the one beside
    this interpreter (a virtualenv's ``bin``); else this interpreter with ``-m``.
    """
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "aiobus-broker" and os.access(script, os.X_OK):
        return shlex.quote(script)
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "aiobus-broker")
    if os.access(beside, os.X_OK):
        return shlex.quote(beside)
    return f"{shlex.quote(os.path.abspath(sys.executable))} -m aiobus.cli.broker"


def unit_file(unit: str, command: str | None = None) -> str:
    """The text of ``aiobus.<unit>`` (``unit`` is "service" or "socket"), the service's
    ``ExecStart=`` running ``command`` (default: :func:`broker_command`)."""
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; expected one of: {', '.join(UNITS)}")
    text = resources.files(__name__).joinpath(f"aiobus.{unit}").read_text(encoding="utf-8")
    return text.replace(_PLACEHOLDER, broker_command() if command is None else command)
