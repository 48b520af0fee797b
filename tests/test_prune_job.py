"""The prune job: stage records and resume (stand-in stages), then real tiny jobs through Ray.

Real jobs use SSDlite at 128x128 on a hand-made 24-image COCO folder with an untrained dense
checkpoint: they test plumbing (Ray, Tune, fault tolerance, artifacts), not accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.errors import InfeasibleBudgetError
from avprune.prune_job.progress import JobProgress
from avprune.prune_job.runner import run_stages
from avprune.prune_job.select import Point, choose, pareto_front
from avprune.prune_job.state import StageStore

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------------- fixtures


def _write_coco(root: Path, n_train: int = 16, n_val: int = 8, seed: int = 0) -> Path:
    """A tiny COCO folder: coloured boxes on noise, 96x96 PNGs, categories 1..7."""
    from PIL import Image

    from perception.classes import DRIVE_CLASSES

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(DRIVE_CLASSES)]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = rng.integers(0, 60, size=(96, 96, 3), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                x, y = rng.integers(0, 56, size=2)
                w, h = rng.integers(16, 40, size=2)
                c = int(rng.integers(1, 8))
                img[y : y + h, x : x + w] = np.array([c * 30 % 255, 200, 255 - c * 30], np.uint8)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [int(x), int(y), int(w), int(h)],
                             "area": int(w * h), "iscrowd": 0})
            Image.fromarray(img).save(root / split / f"{i:04d}.png")
            images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": 96, "height": 96})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The COCO folder and an untrained dense SSDlite checkpoint at 128x128, shared by the module."""
    from perception.models import build_detector, save_checkpoint

    base = tmp_path_factory.mktemp("assets")
    coco = _write_coco(base / "coco")
    ckpt = base / "dense.pt"
    import torch

    torch.manual_seed(0)
    save_checkpoint(ckpt, build_detector("ssdlite320_mobilenet_v3_large", image_size=128))
    return {"coco": coco, "ckpt": ckpt, "base": base}


def tiny_job(assets: dict[str, Path], out: Path, **changes) -> dict:
    """The tiny example job pointed at the module's assets, with dotted-key changes."""
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(assets["ckpt"])
    data["data"] = {"source": "coco", "root": str(assets["coco"]), "val_images": 6}
    data["output_dir"] = str(out)
    data["cache_dir"] = str(assets["base"] / "cache")
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return data


# ----------------------------------------------------------------------------- stage records


def _cfg(tmp_path: Path) -> PruneJobConfig:
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    return PruneJobConfig.model_validate(data)


def test_run_stages_records_each_stage_and_resume_skips_them(tmp_path):
    cfg, out = _cfg(tmp_path), tmp_path / "out"
    calls: list[str] = []

    def stage(name, fail=False):
        def fn(ctx):
            calls.append(name)
            if fail:
                raise RuntimeError(f"{name} broke")
            return {"value": len(ctx.results), "seen": sorted(ctx.results)}

        return name, fn

    store = StageStore(out)
    store.open(fingerprint=cfg.fingerprint(), config={}, resume=False)
    with pytest.raises(RuntimeError, match="b broke"):
        run_stages([stage("a"), stage("b", fail=True), stage("c")], config=cfg, out_dir=out, store=store,
                   progress=JobProgress(False))
    assert store.finished() == ["a"] and not (out / "stages" / "b.json").exists()
    assert not list((out / "stages").glob(".*tmp"))  # no half-written record left behind

    with pytest.raises(ValueError, match="--resume"):  # a finished stage without --resume: refused
        StageStore(out).open(fingerprint=cfg.fingerprint(), config={}, resume=False)
    with pytest.raises(ValueError, match="different job config"):
        StageStore(out).open(fingerprint="other", config={}, resume=True)

    calls.clear()
    store = StageStore(out)
    store.open(fingerprint=cfg.fingerprint(), config={}, resume=True)
    results = run_stages([stage("a"), stage("b"), stage("c")], config=cfg, out_dir=out, store=store,
                         progress=JobProgress(False))
    assert calls == ["b", "c"]  # "a" was loaded from its record
    assert results["a"] == {"value": 0, "seen": []}
    assert results["c"] == {"value": 2, "seen": ["a", "b"]}
    assert store.finished() == ["a", "b", "c"]


def test_choose_highest_map_within_budget_with_deterministic_ties():
    cands = [
        Point(9.0, 0.50, 0.8, "c0", 0),
        Point(4.0, 0.48, 0.7, "c1", 1),
        Point(4.5, 0.48, 0.7, "c2", 2),  # same mAP and AP50 as c1: the lower index wins, not latency
        Point(3.0, 0.30, 0.6, "c3", 3),  # under the floor
    ]
    assert choose(cands, budget_ms=5.0, floor=0.4).source == "c1"
    assert choose(list(reversed(cands)), budget_ms=5.0, floor=0.4).source == "c1"


def test_choose_infeasible_reports_best_tradeoff_and_nearest_budget():
    cands = [Point(6.0, 0.45, source="c0", index=0), Point(4.0, 0.30, source="c1", index=1)]
    dense = Point(10.0, 0.50, source="dense")
    with pytest.raises(InfeasibleBudgetError) as e:
        choose(cands, budget_ms=5.0, floor=0.4, others=[dense])
    err = e.value
    assert err.nearest_latency_ms == pytest.approx(6.0)  # fastest point that keeps the floor
    assert err.nearest_map_floor == pytest.approx(0.30)  # best mAP within the budget
    assert (err.best_latency_ms, err.best_map) in {(6.0, 0.45), (4.0, 0.30)}
    assert "latency_ms >= 6.00" in str(err) and "map_floor <= 0.300" in str(err)


def test_pareto_front_drops_dominated_points():
    pts = [Point(5, 0.4), Point(3, 0.2), Point(4, 0.5), Point(6, 0.45), Point(2, 0.1)]
    assert [(p.latency_ms, p.map) for p in pareto_front(pts)] == [(2, 0.1), (3, 0.2), (4, 0.5)]
