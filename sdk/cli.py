"""The ``dereflect`` command line.

Each command group lives in its own module exposing ``register(subparsers)``. Those modules
import nothing heavy at import time, so ``dereflect remove`` never loads torch and a command
whose extra is missing fails with the ``pip install`` line that fixes it.

Every command shares one help formatter (each option's help ends with its default) and one
set of exit codes (:data:`EXIT_OK`, :data:`EXIT_SOME_FAILED`, :data:`EXIT_USAGE`, and a stopping
signal's :func:`~dereflect.stop_signals.exit_status`), explained in the top-level help (:data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterator, List, Optional

from . import __version__
from .errors import DereflectError
from .stop_signals import exit_status

COMMAND_MODULES = (
    "dereflect.cli_runtime",
    "dereflect.cli_video",
    "dereflect.tools.evaluate",
    "dereflect.tools.bench",
    "dereflect.train.cli",
    "dereflect.train.cli_weights",
    "dereflect.export.cli",
)


#: Exit status of every command.
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EPILOG = f"""exit status (every command):
  {EXIT_OK:<4} everything asked was done (and every check or verification passed), or nothing was left to do
       (remove run again on a folder or several files: every output exists already)
  {EXIT_SOME_FAILED:<4} some items failed (files, frames, sizes) or a check / verification failed; the rest was done
  {EXIT_USAGE:<4} usage error or nothing done: bad options, model or input not found, missing extra
  {exit_status("SIGINT")}  interrupted (Ctrl+C; {exit_status("SIGTERM")} for SIGTERM, {exit_status("SIGHUP")} for \
SIGHUP); what was finished is kept (video: the output file
       holds every frame processed so far; --max-frames or q in --show end a camera recording with {EXIT_OK};
       train: last.safetensors at the last finished step; eval: the report of the images scored;
       export engine: the engines built, the one in progress cancelled where TensorRT allows)

environment:
  DEREFLECT_CACHE  folder for downloaded or converted weights (train, weights) and the TensorRT timing
                   cache (export engine); default ~/.cache/dereflect
"""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends each option's help with its default, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Flags (nargs 0), required options, positionals and sub-command lists have no default worth showing.
        positional = not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if (positional or action.nargs == 0 or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class TopLevelHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the epilog's line breaks (the exit-status table)."""


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from iter_parsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dereflect",
        description="Remove glass reflections from photos and video; train, export and benchmark models.",
        epilog=EPILOG,
        formatter_class=TopLevelHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dereflect {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for child in iter_parsers(parser):
        if child is not parser:
            # A command whose description or epilog is laid out line by line keeps its line breaks.
            raw = issubclass(child.formatter_class, argparse.RawDescriptionHelpFormatter)
            child.formatter_class = TopLevelHelpFormatter if raw else DefaultsHelpFormatter
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except DereflectError as exc:
        print(f"dereflect: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dereflect: interrupted", file=sys.stderr)
        return exit_status("SIGINT")


if __name__ == "__main__":
    sys.exit(main())
