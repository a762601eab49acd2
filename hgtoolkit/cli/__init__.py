"""Command line: ``python -m hgtoolkit <command> --help``.

Each sub-module registers its commands with ``register(subparsers)``; every command writes
JSON (+ PNG where there is something to see) under ``--out`` (default ``results/<command>``).
Shared arguments (the problem, ``--out``, ``--progress``) are in :mod:`hgtoolkit.cli.args`;
run settings' flags are generated from :mod:`hgtoolkit.settings`.
"""
from __future__ import annotations

import argparse
import sys

from . import analyse, exact, online, reproduce, sweep, towers  # each imports the library lazily

# the modules whose register(subparsers) adds their commands, in --help order
_MODULES = (exact, online, analyse, towers, reproduce, sweep)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m hgtoolkit",
                     description="Learning-rate schedules through hypergradients.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for module in _MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad input: one line, status 2
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
