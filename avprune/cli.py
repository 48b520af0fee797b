"""The ``avprune`` command line: one sub-command module per user action.

Each module in ``avprune.commands`` exposes ``register(subparsers)`` which adds its parser and
sets ``func`` (returns an exit code) and ``error_exit_code`` (the code for a failure; ``validate``
uses 2 for errors because 1 means "budget violated").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from avprune import __version__

COMMAND_MODULES = (
    "avprune.commands.data",
    "avprune.commands.train",
    "avprune.commands.eval",
    "avprune.commands.prune",
    "avprune.commands.build_engine",
    "avprune.commands.validate",
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    error_code = getattr(args, "error_exit_code", EXIT_ERROR)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("avprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as e:
        if args.verbose >= 2:
            raise
        print(f"avprune {args.command}: error: {e}", file=sys.stderr)
        return error_code


if __name__ == "__main__":
    sys.exit(main())
