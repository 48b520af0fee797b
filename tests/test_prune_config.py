"""The prune job file: examples validate; bad files fail with the field named and write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from avprune.cli import main
from avprune.config.base import ConfigError
from avprune.config.prune import PruneJobConfig, load_prune_config

EXAMPLES = Path(__file__).resolve().parents[1] / "avprune" / "config" / "examples"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    p = tmp_path / "dense.pt"
    p.write_bytes(b"not read by validation")  # validation checks existence only
    return p


def _job(tmp_path: Path, ckpt: Path, **changes) -> dict:
    data = yaml.safe_load((EXAMPLES / "prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    data["output_dir"] = str(tmp_path / "out")
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


_DELETE = object()


def _write(tmp_path: Path, data: dict | str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("name", ["prune_default.yaml", "prune_tiny.yaml"])
def test_examples_validate(tmp_path, ckpt, name):
    data = yaml.safe_load((EXAMPLES / name).read_text())
    data["model"]["checkpoint"] = str(ckpt)
    cfg = PruneJobConfig.model_validate(data)
    assert cfg.budget.runtime == "onnxruntime" and cfg.search.candidates >= 1


def test_budget_applies_to_the_graph_by_default(tmp_path, ckpt):
    """`budget.end_to_end` defaults to false, as the README says: the budget is on the model graph
    (what pruning changes); pre-processing and decoding/NMS are timed only when asked for."""
    data = _job(tmp_path, ckpt)
    assert "end_to_end" not in data["budget"]
    assert PruneJobConfig.model_validate(data).budget.end_to_end is False
    assert "`budget.end_to_end: false`" in (EXAMPLES.parents[2] / "README.md").read_text()
    on = PruneJobConfig.model_validate(_job(tmp_path, ckpt, **{"budget.end_to_end": True}))
    assert on.budget.end_to_end is True


def test_cli_names_the_flags_for_a_folder_in_use(tmp_path, capsys):
    """The job's errors name the folder and the values; the CLI adds the flag that fixes it (exit 2:
    the user must change the command)."""
    from perception.models import build_detector, save_checkpoint

    ckpt = tmp_path / "dense.pt"  # a real checkpoint: the CLI reads it before anything else
    save_checkpoint(ckpt, build_detector("ssdlite320_mobilenet_v3_large", num_classes=8, image_size=128))
    out = tmp_path / "out"
    path = _write(tmp_path, _job(tmp_path, ckpt))
    (out / "stages").mkdir(parents=True)
    (out / "job.json").write_text('{"version": 1, "fingerprint": "0123456789abcdef", "config": {}}')
    (out / "stages" / "baseline.json").write_text('{"stage": "baseline", "finished_at": 1.0, "result": {}}')
    assert main(["prune", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a prune job (baseline done)" in err and "--resume" in err and "--out" in err
    assert main(["prune", str(path), "--out", str(out), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different job config (fingerprint 0123456789abcdef vs" in err and "--resume" in err and "new --out" in err


def test_budget_helpers_and_fingerprint(tmp_path, ckpt):
    cfg = PruneJobConfig.model_validate(_job(tmp_path, ckpt, **{"budget.speedup": 2.0}))
    assert cfg.budget.latency_target(10.0) == pytest.approx(5.0)
    assert cfg.budget.floor(0.5) == pytest.approx(0.0)  # tiny job: max_map_drop 1.0 clamps at 0
    other = PruneJobConfig.model_validate(_job(tmp_path, ckpt, output_dir=str(tmp_path / "elsewhere")))
    changed = PruneJobConfig.model_validate(_job(tmp_path, ckpt, **{"finetune.steps": 7}))
    base = PruneJobConfig.model_validate(_job(tmp_path, ckpt))
    assert base.finetune.warmup() == max(1, round(0.1 * base.finetune.steps))  # the default: 10% of the steps
    assert PruneJobConfig.model_validate(_job(tmp_path, ckpt, **{"finetune.warmup_steps": 0})).finetune.warmup() == 0
    assert base.fingerprint() == other.fingerprint()  # where results go does not change them
    assert base.fingerprint() != changed.fingerprint()


@pytest.mark.parametrize(("augment", "expected"), [(None, False), (False, False), (True, True)])
def test_the_finetune_recipe_every_trial_trains_with(tmp_path, ckpt, augment, expected):
    """Candidates and the dense shadow take one TrainSettings from the config; augmentation is off
    unless asked for (the demo's dense fine-tune read 0.544 mAP with it, 0.562 without)."""
    from avprune.prune_job.env import JobEnv

    changes = {} if augment is None else {"finetune.augment": augment}
    cfg = PruneJobConfig.model_validate(_job(tmp_path, ckpt, **changes, **{"finetune.lr": 3e-4}))
    s = JobEnv(cfg).finetune_settings(seed=5, threads=1)
    ft = cfg.finetune
    assert (s.augment, s.seed, s.num_threads, s.lr) == (expected, 5, 1, 3e-4)
    assert (s.steps, s.batch_size, s.optimizer, s.warmup_steps, s.checkpoint_every) == (
        ft.steps, ft.batch_size, ft.optimizer, ft.warmup(), ft.measure_every)
    base = PruneJobConfig.model_validate(_job(tmp_path, ckpt, **{"finetune.lr": 3e-4}))
    # None leaves the fingerprint as before the field; an explicit value is a different job
    assert (cfg.fingerprint() == base.fingerprint()) == (augment is None)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"budget.latncy_ms": 3}, "budget.latncy_ms", "unknown key"),
        ({"surprise": 1}, "surprise", "unknown key"),
        ({"budget.speedup": _DELETE, "budget.latency_ms": 0}, "budget.latency_ms", "greater than 0"),
        ({"budget.speedup": _DELETE, "budget.latency_ms": -2}, "budget.latency_ms", "greater than 0"),
        ({"budget.max_map_drop": _DELETE, "budget.map_floor": 1.5}, "budget.map_floor", "less than or equal to 1"),
        ({"budget.max_map_drop": _DELETE, "budget.map_floor": -0.1}, "budget.map_floor", "greater than or equal"),
        ({"budget.map_floor": 0.4}, "budget", "exactly one of budget.map_floor and budget.max_map_drop"),
        ({"budget.max_map_drop": _DELETE}, "budget", "exactly one of budget.map_floor and budget.max_map_drop"),
        ({"budget.latency_ms": 5}, "budget", "exactly one of budget.latency_ms and budget.speedup"),
        ({"budget.runtime": "tflite"}, "budget.runtime", "must be one of"),
        ({"budget.input_size": [16, 16]}, "budget.input_size", ">= 32"),
        ({"pruning.importances": ["magnitude", "random"]}, "pruning.importances.1", "must be one of"),
        ({"pruning.ramps": [-0.1]}, "pruning.ramps", "[0, 1]"),
        ({"sensitivity.sparsities": [1.0]}, "sensitivity.sparsities", "(0, 1)"),
        ({"finetune.batch_size": 1}, "finetune.batch_size", "greater than or equal to 2"),
        ({"finetune.measure_every": 50}, "(top level)", "measure_every"),
        ({"model.name": "yolo"}, "model.name", "unknown detector"),
        ({"search.candidates": 0}, "search.candidates", "greater than or equal to 1"),
        ({"finetune.warmup_steps": 10_000}, "finetune", "warmup_steps (10000) must be below steps"),
    ],
)
def test_bad_values_name_the_field(tmp_path, ckpt, changes, field, words):
    path = _write(tmp_path, _job(tmp_path, ckpt, **changes))
    with pytest.raises(ConfigError) as e:
        load_prune_config(path)
    msg = str(e.value)
    assert f"  {field}:" in msg and words in msg, msg


def test_missing_checkpoint_and_data_folder(tmp_path, ckpt):
    with pytest.raises(ConfigError, match=r"model\.checkpoint: .*checkpoint file not found"):
        load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"model.checkpoint": str(tmp_path / "nope.pt")})))
    bad_data = {"data.source": "coco", "data.root": str(tmp_path / "no_such_coco")}
    with pytest.raises(ConfigError, match=r"data: .*COCO folder not found"):
        load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **bad_data)))
    with pytest.raises(ConfigError, match="data.root is required"):
        load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"data.source": "coco", "data.root": None})))


def _bad_files(tmp_path: Path, ckpt: Path) -> dict[str, tuple[str | dict, str]]:
    return {
        "bad_yaml": ("model: [unclosed\n", "not valid YAML"),
        "not_mapping": ("- a\n- b\n", "must be a mapping"),
        "unknown_key": (_job(tmp_path, ckpt, **{"finetune.stepz": 3}), "finetune.stepz: unknown key"),
        "missing_checkpoint": (_job(tmp_path, ckpt, **{"model.checkpoint": "missing/dense.pt"}), "checkpoint file not found"),
        "missing_data": (
            _job(tmp_path, ckpt, **{"data.source": "coco", "data.root": str(tmp_path / "none")}),
            "COCO folder not found",
        ),
    }


@pytest.mark.parametrize("case", ["bad_yaml", "not_mapping", "unknown_key", "missing_checkpoint", "missing_data"])
def test_cli_bad_job_exits_2_and_writes_nothing(tmp_path, ckpt, capsys, case):
    content, words = _bad_files(tmp_path, ckpt)[case]
    path = _write(tmp_path, content)
    out = tmp_path / "out"
    assert main(["prune", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avprune prune: error:") and words in err, err
    assert not out.exists()


def test_cli_missing_job_file(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_overrides_by_dotted_key(tmp_path, ckpt):
    path = EXAMPLES / "prune_default.yaml"
    cfg = load_prune_config(path, {"model.checkpoint": str(ckpt), "finetune.steps": 40, "budget.threads": 1})
    assert cfg.finetune.steps == 40 and cfg.budget.threads == 1 and cfg.model.checkpoint == ckpt.resolve()
    assert cfg.output_dir.is_absolute()  # resolved once here: Ray workers run elsewhere
    with pytest.raises(ConfigError, match=r"\(with overrides\).*\n  finetune.stepz: unknown key"):
        load_prune_config(path, {"model.checkpoint": str(ckpt), "finetune.stepz": 3})


# ----------------------------------------------------------------------------- issue #12 / #14 fields


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"pruning.channel_multiple": 0}, "pruning.channel_multiple", "positive integer"),
        ({"pruning.channel_multiple": -16}, "pruning.channel_multiple", "positive integer"),
        ({"pruning.channel_multiple": "big"}, "pruning.channel_multiple", "or 'auto'"),
        ({"pruning.channel_multiple": 2.5}, "pruning.channel_multiple", "positive integer"),
        ({"pruning.channel_multiple": True}, "pruning.channel_multiple", "positive integer"),
        ({"pruning.allocation": "greedy"}, "pruning.allocation", "'latency' or 'uniform'"),
        ({"pruning.granularity": "depth"}, "pruning.granularity", "must be one of"),
        ({"pruning.round_to": 8, "pruning.channel_multiple": 16}, "pruning", "disagree"),
        ({"pruning.controller": "allocation", "pruning.granularity": "block"}, "pruning", "allocates channel groups"),
        ({"model.name": "fasterrcnn_mobilenet_v3_large_fpn", "finetune.distill": True}, "(top level)",
         "finetune.distill"),
        ({"sensitivity.metric": "recall"}, "sensitivity.metric", "'loss' or 'map'"),
        ({"pruning.controller": "layer_adaptive", "sensitivity.metric": "loss"}, "(top level)",
         "set sensitivity.metric: map"),
        ({"sensitivity.max_layers": 0}, "sensitivity.max_layers", "greater than or equal to 1"),
    ],
)
def test_new_pruning_fields_name_the_field(tmp_path, ckpt, changes, field, words):
    path = _write(tmp_path, _job(tmp_path, ckpt, **changes))
    with pytest.raises(ConfigError) as e:
        load_prune_config(path)
    msg = str(e.value)
    assert f"  {field}:" in msg and words in msg, msg


def test_sensitivity_defaults_follow_what_reads_the_curves(tmp_path, ckpt):
    unset = {"sensitivity.max_layers": _DELETE, "sensitivity.sparsities": _DELETE}  # the tiny example sets them
    knap = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **unset, **{"pruning.controller": "allocation",
                                                                                "pruning.allocation": "latency"})))
    assert knap.sensitivity_metric() == "loss" and knap.sensitivity_max_layers() is None  # every unit
    assert knap.sensitivity_sparsities() == [0.25, 0.5, 0.75]
    adaptive = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **unset, **{"pruning.controller": "layer_adaptive"})))
    assert adaptive.sensitivity_metric() == "map" and adaptive.sensitivity_max_layers() == 8  # as before issue #12
    assert adaptive.sensitivity_sparsities() == [0.3, 0.6]
    given = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"sensitivity.max_layers": 3,
                                                                        "sensitivity.sparsities": [0.6, 0.2]})))
    assert given.sensitivity_max_layers() == 3 and given.sensitivity_sparsities() == [0.2, 0.6]


def test_channel_multiple_allocation_and_distill_defaults(tmp_path, ckpt):
    cfg = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt)))
    assert cfg.pruning.channel_multiple == 16  # ORT AVX-512 blocks
    assert cfg.pruning.allocation == "uniform" and cfg.distill() is True  # SSDlite + a dense checkpoint
    auto = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"pruning.channel_multiple": "auto",
                                                                       "pruning.controller": "allocation",
                                                                       "pruning.allocation": "latency"})))
    assert auto.pruning.channel_multiple == "auto" and auto.pruning.controller == "allocation"
    old = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"pruning.round_to": 8})))
    assert old.pruning.channel_multiple == 8  # the older name still works
    frcnn = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"model.name": "fasterrcnn_mobilenet_v3_large_fpn"})))
    assert frcnn.distill() is False  # DistilledDetector wraps SSD only: off unless asked (and then refused)
    blk = load_prune_config(_write(tmp_path, _job(tmp_path, ckpt, **{"pruning.granularity": "channel+block"})))
    assert blk.pruning.prunes_blocks and blk.pruning.prunes_channels and blk.pruning.pruner_granularity() == "channel"
