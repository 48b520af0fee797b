"""The demo's shipped detector: present (not a partial clone or an LFS pointer), loadable, the default architecture."""

from __future__ import annotations

import torch

from avprune import demo
from perception.models import load_detector
from perception.train import DEFAULT_DETECTOR


def test_the_shipped_checkpoint_is_the_default_detector_and_detects() -> None:
    assert demo.SHIPPED_CHECKPOINT.is_file() and demo.SHIPPED_CHECKPOINT.stat().st_size > 5_000_000
    model = load_detector(demo.SHIPPED_CHECKPOINT).eval()
    meta = model.avprune_meta
    assert meta["name"] == DEFAULT_DETECTOR["name"] and meta["num_classes"] == DEFAULT_DETECTOR["num_classes"]
    with torch.no_grad():
        out = model([torch.rand(3, 384, 640)])[0]
    assert set(out) >= {"boxes", "scores", "labels"}
    # trained weights, not an initialisation: the classification head is far from its init
    assert any(float(p.detach().abs().max()) > 1.0 for n, p in model.named_parameters() if "classification_head" in n)


def test_the_demo_scores_the_checkpoint_on_images_it_did_not_train_on() -> None:
    # the checkpoint trained on seed 0's synthetic images; the demo's seed must be another
    assert demo.DATA_SEED != 0


def test_a_demo_stage_is_done_only_when_its_outputs_are_newer_than_its_inputs(tmp_path):
    """A re-run prune job must rebuild the engines after it (they were validated stale before)."""
    import os

    from avprune.demo import _fresh

    ckpt, engine, report = tmp_path / "pruned.pt", tmp_path / "pruned.onnx.json", tmp_path / "report.json"
    assert not _fresh([engine], [ckpt])  # nothing built yet
    ckpt.write_text("model v1")
    engine.write_text("built from v1")
    os.utime(ckpt, (1000, 1000))
    os.utime(engine, (2000, 2000))
    assert _fresh([engine], [ckpt]) and _fresh([engine], [ckpt, tmp_path / "absent.pt"])
    os.utime(ckpt, (3000, 3000))  # the prune job ran again: its model is newer than the engine
    assert not _fresh([engine], [ckpt])
    assert not _fresh([engine, report], [])  # one output missing
    assert _fresh([engine], [])  # no inputs: existing is enough
