"""`avprune train` / `avprune eval`: help, config validation, a short run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from avprune.cli import main
from avprune.config.base import load_config
from avprune.config.train import TrainConfig
from tests.conftest import write_tiny_coco

EXAMPLE = Path(__file__).parents[1] / "avprune" / "config" / "examples" / "train_default.yaml"


def _config(tmp_path: Path, **edits) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["data"]["root"] = str(tmp_path / "coco")
    cfg["model"]["image_size"] = [96, 96]
    cfg["train"].update(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=2, time_limit_minutes=None)
    cfg["out"] = str(tmp_path / "run")
    for section, values in edits.items():
        cfg[section].update(values)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_example_config_is_valid_and_matches_library_defaults() -> None:
    from perception.train import DEFAULT_DETECTOR, default_train_settings

    cfg = load_config(EXAMPLE, TrainConfig)
    for key, value in DEFAULT_DETECTOR.items():
        assert getattr(cfg.model, key) == value, key
    recipe = default_train_settings(8)
    for field in ("batch_size", "optimizer", "lr", "weight_decay", "min_lr_ratio", "augment"):
        assert getattr(cfg.settings(), field) == getattr(recipe, field), field


def test_help_explains(capsys) -> None:
    for cmd in ("train", "eval"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["train"]["learning_rate"] = 0.1
    cfg["model"]["name"] = "yolo"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: unknown key" in err and "model.name: must be one of" in err
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_train_then_eval(tmp_path: Path, capsys) -> None:
    write_tiny_coco(tmp_path / "coco", "train", n=6)
    write_tiny_coco(tmp_path / "coco", "val", n=4, seed=5)
    assert main(["train", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "per class" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps_done"] == 3 and metrics["val"]["num_images"] == 4
    # --steps extends the same run: it resumes from last.pt at step 3
    assert main(["train", str(_config(tmp_path)), "--steps", "4"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps_done"] == 4
    capsys.readouterr()
    report = tmp_path / "val.json"
    code = main(["eval", str(tmp_path / "run" / "model.pt"), "--data", str(tmp_path / "coco"),
                 "--max-images", "3", "--json", str(report)])
    assert code == 0 and "AP50" in capsys.readouterr().out
    scored = json.loads(report.read_text())
    assert scored["num_images"] == 3 and 0.0 <= scored["map"] <= 1.0
