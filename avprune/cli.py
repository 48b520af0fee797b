"""The ``avprune`` command line: one sub-command module per user action.

Each module in ``avprune.commands`` exposes ``register(subparsers)`` which adds its parser and
sets ``func`` (returns 0, or 1 when a gate failed). Exceptions are mapped to exit codes here, in
one place, by :func:`avprune.errors.exit_code_for` (the table is in ``avprune.errors`` and at the
end of every command's ``--help``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from avprune import __version__
from avprune.errors import EXIT_CODES_HELP, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, exit_code_for, message

COMMAND_MODULES = (
    "avprune.commands.data",
    "avprune.commands.train",
    "avprune.commands.eval",
    "avprune.commands.prune",
    "avprune.commands.build_engine",
    "avprune.commands.validate",
)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avprune",
        description=(
            "Fit a camera detector into a frame budget.\n\n"
            "  avprune data synth      generate the synthetic drive data set (no downloads)\n"
            "  avprune train           train / fine-tune a torchvision detector\n"
            "  avprune eval            COCO mAP of a checkpoint or engine\n"
            "  avprune prune JOB.yaml  Ray prune job against an mAP floor and a latency budget\n"
            "  avprune build-engine    verified ONNX -> TensorRT (or ONNX Runtime) engine\n"
            "  avprune validate        real-time latency validation on recorded drives"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"avprune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).register(sub)
    parser.epilog = EXIT_CODES_HELP
    for command in _leaf_parsers(sub):
        _add_exit_codes(command)
    return parser


def _leaf_parsers(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every command's parser, nested ones (``data synth``) included."""
    found = []
    for p in dict.fromkeys(sub.choices.values()):  # aliases map to the same parser
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        found.append(p)
        for n in nested:
            found += _leaf_parsers(n)
    return found


def _add_exit_codes(p: argparse.ArgumentParser) -> None:
    """Append the exit-code table to a command's epilog, keeping its line breaks."""
    p.epilog = f"{p.epilog.rstrip()}\n\n{EXIT_CODES_HELP}" if p.epilog else EXIT_CODES_HELP
    if p.formatter_class is argparse.HelpFormatter:  # the default would re-flow the table
        p.formatter_class = argparse.RawDescriptionHelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("avprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure ends with one message and a code from the one table
        if args.verbose >= 2:
            raise
        code = exit_code_for(e)
        kind = "internal error" if code == EXIT_INTERNAL_ERROR else "error"
        hint = f" ({type(e).__name__}; run with -vv for the traceback)" if code == EXIT_INTERNAL_ERROR else ""
        print(f"avprune {args.command}: {kind}: {message(e)}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
