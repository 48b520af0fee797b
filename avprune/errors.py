"""One exit-code table for every ``avprune`` command, and the exception -> code mapping.

The table (also printed at the end of every command's ``--help`` and in the README):

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     done: the command did what was asked (validate: the candidate meets the budget)
1     a gate failed, the budget is not met: validate's ``--fail-on`` rules, prune's infeasible
      budget (the best trade-off is still written), build-engine's export/engine verification
2     input or usage error: a bad option, a missing / damaged / mismatched file, an unreadable
      stream, an unwritable output path. Nothing expensive ran and no output was written
3     internal error: a failure that is not the input's fault (a bug, a library crash); run with
      ``-vv`` for the traceback
130   interrupted (Ctrl-C)
====  ==========================================================================================

2 is also what ``argparse`` returns for a malformed command line, so "the user must change
something in the command" has one code. Libraries raise ValueError/TypeError/OSError for bad
input (their messages name the value and the fix) and the CLI maps them here; commands return
0 or 1 themselves.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes (all avprune commands):
  0    done (validate: the candidate meets the budget)
  1    gate failed / budget not met: validate --fail-on, prune infeasible budget,
       build-engine verification
  2    input or usage error (bad option, missing/damaged/mismatched file, unreadable
       stream, unwritable output); checked before any export, fine-tune or replay
  3    internal error (run with -vv for the traceback)
  130  interrupted
"""


class GateFailedError(RuntimeError):
    """A result exists but misses the bound it was held to (exit code 1)."""


def _gate_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "gate failed" (they live in heavy modules: never imported here)."""
    types: list[type[BaseException]] = [GateFailedError]
    for mod, name in (("avprune.prune_job.errors", "InfeasibleBudgetError"), ("deploy.verify", "ExportMismatchError")):
        module = sys.modules.get(mod)  # a module that was never imported cannot have raised
        if module is not None and hasattr(module, name):
            types.append(getattr(module, name))
    return tuple(types)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception that ended a command (the one place codes are decided)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, _gate_types()):
        return EXIT_GATE_FAILED
    if isinstance(exc, (ValueError, TypeError, OSError)):  # StreamError, ConfigError, pydantic, missing files
        return EXIT_INPUT_ERROR
    return EXIT_INTERNAL_ERROR


def message(exc: BaseException) -> str:
    """The exception's message as a CLI user reads it (the type when it has none)."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = text.strip("'")
    return text or type(exc).__name__
