"""The ``dereflect`` command line.

Each command group lives in its own module exposing ``register(subparsers)``. Those modules
import nothing heavy at import time, so ``dereflect remove`` never loads torch and a command
whose extra is missing fails with the ``pip install`` line that fixes it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from . import __version__
from .errors import DereflectError

COMMAND_MODULES = (
    "dereflect.cli_runtime",
    "dereflect.cli_video",
    "dereflect.tools.evaluate",
    "dereflect.tools.bench",
    "dereflect.train.cli",
    "dereflect.train.cli_weights",
    "dereflect.export.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dereflect",
        description="Remove glass reflections from photos and video; train, export and benchmark models.",
    )
    parser.add_argument("--version", action="version", version=f"dereflect {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DereflectError as exc:
        print(f"dereflect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dereflect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
