"""Detector factory: every detector builds and runs; checkpoints round-trip, pruned ones too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from perception.models import (
    build_detector,
    count_parameters,
    list_detectors,
    load_detector,
    save_checkpoint,
)

ALL = [
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
]


def test_registry_lists_every_detector() -> None:
    assert sorted(ALL) == list_detectors()


@pytest.mark.parametrize("name", ALL)
def test_builds_and_runs_in_eval_and_train_mode(name: str) -> None:
    torch.manual_seed(0)
    model = build_detector(name, num_classes=8, image_size=128)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 40.0, 120.0, 90.0]]), "labels": torch.tensor([1, 7])},
    ]
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
    assert out[1]["boxes"].shape[1] == 4
    assert all(((o["labels"] >= 1) & (o["labels"] < 8)).all() for o in out)
    losses = model.train()(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.requires_grad


def test_bad_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names: .*ssdlite320_mobilenet_v3_large"):
        build_detector("yolo")
    with pytest.raises(ValueError, match="sampling applies to Faster R-CNN only"):
        from perception.models import FasterRCNNSampling

        build_detector("ssdlite320_mobilenet_v3_large", sampling=FasterRCNNSampling())


def test_faster_rcnn_sampling_is_set() -> None:
    m = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    assert m.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert m.rpn.fg_bg_sampler.batch_size_per_image == 128


def _same_output(a: nn.Module, b: nn.Module) -> None:
    x = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        oa, ob = a.eval()(x)[0], b.eval()(x)[0]
    torch.testing.assert_close(oa["scores"], ob["scores"])
    torch.testing.assert_close(oa["boxes"], ob["boxes"])


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_detector("ssdlite320_mobilenet_v3_large", image_size=96)
    save_checkpoint(tmp_path / "m.pt", model)
    again = load_detector(tmp_path / "m.pt")
    assert again.avprune_meta == model.avprune_meta
    _same_output(model, again)
    # A torchvision-format state dict loads into a model built for it.
    torch.save(model.state_dict(), tmp_path / "tv.pt")
    tv = build_detector("ssdlite320_mobilenet_v3_large", image_size=96, checkpoint=tmp_path / "tv.pt")
    _same_output(model, tv)


def test_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path: Path) -> None:
    model = build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=96)
    torch.save(model.state_dict(), tmp_path / "tv4.pt")
    with pytest.raises(ValueError, match=r"head\.classification_head.*checkpoint \(\d+, .*\) vs model"):
        build_detector("ssdlite320_mobilenet_v3_large", num_classes=8, image_size=96, checkpoint=tmp_path / "tv4.pt")
    save_checkpoint(tmp_path / "ours4.pt", model)
    with pytest.raises(ValueError, match="num_classes=4 but the model has num_classes=8"):
        build_detector("ssdlite320_mobilenet_v3_large", image_size=96, checkpoint=tmp_path / "ours4.pt")
    frcnn = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    torch.save(frcnn.state_dict(), tmp_path / "frcnn.pt")
    with pytest.raises(ValueError, match="(?s)missing keys .*unexpected keys"):
        build_detector("ssdlite320_mobilenet_v3_large", checkpoint=tmp_path / "frcnn.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"not a PyTorch checkpoint \(or damaged\)"):
        load_detector(tmp_path / "junk.pt")


def test_width_pruned_checkpoint_reloads(tmp_path: Path) -> None:
    """Physically drop channels with Torch-Pruning, save, and rebuild through load_detector."""
    import torch_pruning as tp

    from pruning.filters import DetectorCore

    torch.manual_seed(2)
    model = build_detector("ssdlite320_mobilenet_v3_large", image_size=96).eval()
    dense = count_parameters(model)
    # The heads' last 1x1 convs emit anchors x (4 | num_classes) channels: never pruned.
    heads = [seq[-1] for h in (model.head.classification_head, model.head.regression_head) for seq in h.module_list]
    pruner = tp.pruner.MetaPruner(
        DetectorCore(model),  # backbone + heads: Torch-Pruning traces tensors, not detection outputs
        torch.rand(1, 3, 96, 96),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.25,
        ignored_layers=heads,
        round_to=8,
    )
    pruner.step()
    assert count_parameters(model) < dense
    save_checkpoint(tmp_path / "pruned.pt", model)
    again = load_detector(tmp_path / "pruned.pt")
    assert count_parameters(again) == count_parameters(model)
    _same_output(model, again)


def test_set_score_threshold():
    from perception.models import set_score_threshold

    ssd = build_detector("ssdlite320_mobilenet_v3_large", num_classes=3)
    assert set_score_threshold(ssd, 0.01).score_thresh == 0.01
    frcnn = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert set_score_threshold(frcnn, 0.3).roi_heads.score_thresh == 0.3
    with pytest.raises(ValueError, match="must be in"):
        set_score_threshold(ssd, 1.5)
    with pytest.raises(TypeError, match="no score_thresh"):
        set_score_threshold(torch.nn.Linear(2, 2), 0.1)
