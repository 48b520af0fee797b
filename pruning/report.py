"""Write the pruning trail as JSON and matplotlib PNGs (threshold/sparsity trajectories, final bars)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from pruning._atomic import atomic_write_bytes, atomic_write_json
from pruning.records import UpdateRecord

MAX_LINES = 40  # more per-layer lines than this is unreadable; the JSON keeps everything


def _save(fig: object, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buf.getvalue())


def _trajectories(history: Sequence[UpdateRecord], field: str, out: Path, ylabel: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    steps = [r.step for r in history]
    units = list(history[-1].layers)[:MAX_LINES]
    for u in units:
        ax.plot(steps, [getattr(r.layers[u], field) if u in r.layers else float("nan") for r in history],
                lw=1, label=u)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if len(units) <= 12:
        ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def write_report(
    history: Sequence[UpdateRecord],
    out_dir: str | Path,
    *,
    sensitivity: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> dict[str, Path]:
    """Write ``history.json`` plus ``thresholds.png``, ``sparsity.png``, ``final_sparsity.png`` (and
    ``sensitivity.png`` given a profile) into ``out_dir``; returns the paths by kind."""
    if not history:
        raise ValueError("write_report needs at least one UpdateRecord (run pruner.step() first)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths: dict[str, Path] = {}
    payload = {"updates": [r.to_dict() for r in history]}
    if sensitivity is not None:
        payload["sensitivity"] = {k: [list(p) for p in v] for k, v in sensitivity.items()}
    paths["json"] = atomic_write_json(out / "history.json", payload)
    paths["thresholds"] = _trajectories(history, "threshold", out / "thresholds.png", "threshold (normalised importance)")
    paths["sparsity"] = _trajectories(history, "sparsity", out / "sparsity.png", "sparsity")

    final = history[-1].layers
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(final)), 4.5))
    ax.bar(range(len(final)), [r.sparsity for r in final.values()])
    ax.set_xticks(range(len(final)), list(final), rotation=90, fontsize=5)
    ax.set_ylabel("final sparsity")
    ax.set_ylim(0, 1)
    paths["final_sparsity"] = _save(fig, out / "final_sparsity.png")

    if sensitivity:
        fig, ax = plt.subplots(figsize=(8, 5))
        for layer, curve in list(sensitivity.items())[:MAX_LINES]:
            xs = [s for s, _ in sorted(curve)]
            ys = [v for _, v in sorted(curve)]
            ax.plot(xs, ys, marker="o", ms=2, lw=1, label=layer)
        ax.set_xlabel("sparsity of one layer")
        ax.set_ylabel("metric")
        if len(sensitivity) <= 12:
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        paths["sensitivity"] = _save(fig, out / "sensitivity.png")
    return paths
