"""``aiobus``: the client command line."""

from __future__ import annotations

import argparse
import sys

from .. import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiobus", description="Talk to an aiobus broker.")
    parser.add_argument("--version", action="version", version=f"aiobus {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
