"""Each benchmark owns one section of benchmarks/RESULTS.md, replaced atomically in place."""

from __future__ import annotations

import fcntl
import os
import platform
import re
from pathlib import Path

from perception.io import atomic_write_text

#: Set by ``benchmarks.run_all`` (to ``runs/bench-quick``): smoke runs write their RESULTS.md and
#: results/ there, so they never replace the numbers of a real run.
OUT_ENV = "AVPRUNE_BENCH_OUT"
_HERE = Path(os.environ[OUT_ENV]) if os.environ.get(OUT_ENV) else Path(__file__).parent
RESULTS = _HERE / "RESULTS.md"
ASSETS = _HERE / "results"  # PNGs and raw JSON linked from RESULTS.md

_HEADER = (
    "# avprune benchmark results\n\n"
    "Each section is written by the script it names (`python -m benchmarks.NAME`); figures on a\n"
    "shared 2-core machine move 30-50% between runs, so every comparison is measured side by side\n"
    "in one run and reported as a ratio.\n"
)

SECTION_ORDER = (
    "train_default",
    "pruner_overhead",
    "latency_model",
    "prune_job",
    "engine",
    "gpu_check",
    "validate_overhead",
    "validate_repro",
    "compare",
    "allocation",
    "allocation_latency",
    "oneshot_recovery",
    "cut_path",
    "stage_multiple",
    "depth",
    "reliability",
)


def machine_line() -> str:
    """One line naming the machine the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}"


#: Below this line a section holds notes written by people (dated findings, caveats): a benchmark
#: that regenerates the section keeps them.
NOTES_MARK = "<!-- notes: kept when the benchmark rewrites this section -->"


def _notes(section: str, end: str) -> str:
    """The hand-written notes of an existing section (below :data:`NOTES_MARK`), or ''."""
    if NOTES_MARK not in section:
        return ""
    return section.split(NOTES_MARK, 1)[1].rsplit(end, 1)[0].strip()


def write_section(name: str, markdown: str) -> Path:
    """Replace (or add) the section ``name`` of RESULTS.md, keeping the others and the section's own
    notes below :data:`NOTES_MARK`."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    lock = RESULTS.with_suffix(".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        text = RESULTS.read_text() if RESULTS.exists() else _HEADER
        pattern = r"<!-- BEGIN (\S+) -->\n.*?\n<!-- END \1 -->"
        sections = {m.group(1): m.group(0) for m in re.finditer(pattern, text, flags=re.S)}
        notes = _notes(sections.get(name, ""), end)
        sections[name] = block if not notes else f"{begin}\n{markdown.strip()}\n\n{NOTES_MARK}\n{notes}\n{end}"
        order = [s for s in SECTION_ORDER if s in sections] + sorted(s for s in sections if s not in SECTION_ORDER)
        atomic_write_text(RESULTS, _HEADER + "\n" + "\n\n".join(sections[s] for s in order) + "\n")
    return RESULTS


def check_tag(tag: str) -> str:
    """A results name usable as a file stem and a section name; one-line refusal otherwise."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise SystemExit(f"--tag {tag!r}: use letters, digits, '_', '-' or '.'")
    return tag


def publish(name: str, markdown: str, *, quick: bool) -> None:
    """Print a benchmark's section and, unless it is a smoke run, write it to RESULTS.md (a smoke
    run is not a measurement: RESULTS.md keeps the real run)."""
    if not quick:
        write_section(name, markdown)
    print(markdown)
