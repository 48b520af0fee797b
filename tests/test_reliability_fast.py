"""Bad inputs are refused before torch is imported, and the torch-free checks agree with torch (issue 15).

Importing torch costs 2-10 s on a loaded 2-core machine, more than the "fails in under 5 s" target:
checkpoints are peeked at without torch (:func:`perception.io.peek_torch_file`), job files check
detector names against :data:`perception.names.DETECTOR_NAMES`, and annotation files are read by
:mod:`perception.coco_json`. Each case runs the real CLI in a fresh interpreter and asserts the
exit code, the message, that nothing was written and that torch was never imported. The peek's
verdicts are held against ``torch.load(weights_only=True)`` on the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

from avprune.checks import checkpoint_identity
from perception.io import CheckpointFileError, PeekedTensor, load_torch_file, peek_torch_file
from perception.names import CHECKPOINT_FORMAT, DETECTOR_NAMES
from tests.conftest import ROOT, _write_coco

pytestmark = pytest.mark.timeout(120)

SSD = "ssdlite320_mobilenet_v3_large"


def _ckpt(path: Path, *, name: str = SSD, num_classes: int = 8) -> Path:
    """An avprune checkpoint's layout (save_checkpoint's payload) without building a detector."""
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": {"name": name, "num_classes": num_classes},
                "state_dict": OrderedDict(w=torch.arange(64.0), b=torch.zeros(2, 3)), "extra": {}}, path)
    return path


def _damaged_tensor(src: Path, dest: Path) -> Path:
    """``src`` with its first tensor record cut in half: the pickle is intact, the tensor bytes are not."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dest, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            out.writestr(info.filename, data[: len(data) // 2] if info.filename.endswith("data/0") else data)
    return dest


class _RunsCode:
    """Unpickling this would run a command (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _structure(obj, leaf: type):
    """``obj`` with every ``leaf`` (a tensor, or the peek's stand-in) as the PeekedTensor class, so a
    ``torch.load`` result and a peek compare on structure, keys and values other than tensors."""
    if isinstance(obj, leaf):
        return PeekedTensor
    if isinstance(obj, dict):
        return {k: _structure(v, leaf) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_structure(v, leaf) for v in obj]
    return obj


# ----------------------------------------------------------------------------- the torch-free name list


def test_detector_name_list_is_the_registry():
    from perception.models import CHECKPOINT_FORMAT as models_format
    from perception.models import list_detectors

    assert list(DETECTOR_NAMES) == list_detectors()
    assert models_format == CHECKPOINT_FORMAT


# ----------------------------------------------------------------------------- the peek agrees with torch.load


def test_peek_reads_what_torch_load_reads(tmp_path):
    files = {
        "checkpoint": _ckpt(tmp_path / "ckpt.pt"),
        "state_dict": tmp_path / "sd.pt",
        "reference-script": tmp_path / "ref.pt",
    }
    torch.save(torch.nn.Linear(3, 2).state_dict(), files["state_dict"])  # an OrderedDict with _metadata
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 3}, files["reference-script"])
    for kind, path in files.items():
        peeked = peek_torch_file(path)
        assert peeked is not None, kind
        assert _structure(peeked, PeekedTensor) == _structure(load_torch_file(path), torch.Tensor), kind


def test_peek_defers_to_torch_for_what_it_does_not_mimic(tmp_path):
    path = tmp_path / "extra.pt"  # torch.Size and a dtype: on torch's allow-list, not on the peek's
    torch.save({"w": torch.zeros(2), "shape": torch.Size([2, 3]), "dtype": torch.float16}, path)
    assert peek_torch_file(path) is None
    assert load_torch_file(path)["shape"] == torch.Size([2, 3])  # and torch does read it


def test_peek_refuses_pickled_objects_like_torch_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    files = {"module": tmp_path / "linear.pt", "code": tmp_path / "code.pt"}
    torch.save(torch.nn.Linear(2, 2), files["module"])
    torch.save({"w": torch.zeros(1), "x": _RunsCode(marker)}, files["code"])
    for path in files.values():
        with pytest.raises(CheckpointFileError) as peek:
            peek_torch_file(path)
        with pytest.raises(CheckpointFileError) as full:
            load_torch_file(path)
        assert str(peek.value) == str(full.value) and "holds pickled Python objects" in str(peek.value)
    assert not marker.exists()


def test_damaged_tensors_are_still_found_by_the_full_read(tmp_path):
    bad = _damaged_tensor(_ckpt(tmp_path / "ok.pt"), tmp_path / "damaged.pt")
    assert checkpoint_identity(bad, full=False) == {"name": SSD, "num_classes": 8}  # the pickle is fine
    with pytest.raises(CheckpointFileError, match="not a PyTorch checkpoint"):
        checkpoint_identity(bad)


# ----------------------------------------------------------------------------- the CLI, in a fresh interpreter

# Every case in one fresh interpreter (one start-up, not one per case), in order: after each, whether
# torch has been imported so far. The damaged-tensor case comes last: it is the one that needs torch.
_RUN = """
import contextlib, io, json, sys
from avprune.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    results.append({"rc": rc, "err": err.getvalue().strip(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""

SSD_WORDS = f"the checkpoint says {SSD} with 8 classes, the job says {SSD} with 5 classes"
PRUNE_CASES = {  # case: (job changes, words in the message)
    "another model": ({"num_classes": 5}, SSD_WORDS),
    "plain state_dict": ({"ckpt": "plain"}, "is a plain state_dict"),
    "pickled objects": ({"ckpt": "pickled"}, "holds pickled Python objects"),
    "val split without boxes": ({"coco": "empty"}, "instances_val.json has 2 images but no boxes"),
    "unknown detector": ({"name": "yolo"}, "unknown detector 'yolo'"),
}


def _job(folder: Path, inputs: dict[str, Path], ckpt: str = "ckpt", coco: str = "coco", **model) -> Path:
    folder.mkdir(parents=True)
    job = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    job["model"].update({"checkpoint": str(inputs[ckpt]), **model})
    job["data"] = {"source": "coco", "root": str(inputs[coco]), "val_images": 2}
    job.update(output_dir=str(folder / "out"), cache_dir=str(folder / "cache"))
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Each case's exit code, stderr and torch-imported flag, plus its folder (``dir``)."""
    base = tmp_path_factory.mktemp("fast")
    ann = _write_coco(base / "empty", 2, 2) / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    inputs = {"coco": _write_coco(base / "coco", 2, 2), "empty": base / "empty", "ckpt": _ckpt(base / "ckpt.pt"),
              "plain": base / "plain.pt", "pickled": base / "pickled.pt"}
    torch.save(torch.nn.Linear(3, 2).state_dict(), inputs["plain"])
    torch.save(torch.nn.Linear(2, 2), inputs["pickled"])
    inputs["damaged"] = _damaged_tensor(inputs["ckpt"], base / "damaged.pt")
    cases: dict[str, list[str]] = {"validate pickled": [
        "validate", str(inputs["pickled"]), "--stream", str(base / "none.mp4"), "--budget-ms", "50",
        "--report", str(base / "rep")]}
    for i, (case, (changes, _)) in enumerate(PRUNE_CASES.items()):
        cases[case] = ["prune", str(_job(base / f"case{i}", inputs, **changes)), "--no-progress"]
    cases["damaged tensors"] = ["prune", str(_job(base / "damaged", inputs, ckpt="damaged")), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(list(cases.values()))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: {**r, "dir": Path(args[1]).parent, "inputs": inputs}
            for (case, args), r in zip(cases.items(), results, strict=True)}


@pytest.mark.parametrize("case", list(PRUNE_CASES))
def test_prune_refuses_bad_inputs_without_importing_torch(runs, case):
    run, words = runs[case], PRUNE_CASES[case][1]
    err = run["err"]
    assert run["rc"] == 2 and words in err and "weights_only" not in err, err
    assert err.startswith("avprune prune: error: ")
    assert err.count("\n") == (1 if case == "unknown detector" else 0), err  # a job-file error lists its fields
    assert not run["torch"]
    assert not (run["dir"] / "out").exists() and not (run["dir"] / "cache").exists()


def test_damaged_tensors_in_prune_are_found_before_anything_is_written(runs):
    """The peek passes (the pickle is intact); the full read, after the cheap checks, refuses."""
    run = runs["damaged tensors"]
    assert run["rc"] == 2 and run["err"] == ("avprune prune: error: not a PyTorch checkpoint (or damaged): "
                                             f"{run['inputs']['damaged']}")
    assert run["torch"]  # the only case that needed it
    assert not (run["dir"] / "out").exists() and not (run["dir"] / "cache").exists()


def test_validate_refuses_a_pickled_checkpoint_without_importing_torch(runs):
    run = runs["validate pickled"]
    err = run["err"]
    assert run["rc"] == 2 and err.startswith("avprune validate: error: ") and err.count("\n") == 0
    assert f"{run['inputs']['pickled']} holds pickled Python objects" in err and "weights_only" not in err
    assert not run["torch"] and not (run["dir"] / "rep").exists()
