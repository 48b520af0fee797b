"""`avprune data`: help texts, a tiny synth run, KITTI import wiring and clear errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from avprune.cli import main


@pytest.mark.parametrize("argv, expect", [
    (["data", "--help"], "synth"),
    (["data", "synth", "--help"], "--images"),
    (["data", "import-kitti", "--help"], "--labels"),
])
def test_help_explains(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert expect in capsys.readouterr().out


def test_tiny_synth_run_writes_the_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = main(["data", "synth", "--out", str(out), "--images", "5", "--drives", "1", "--seed", "2",
               "--size", "320x192", "--drive-seconds", "0.2", "--fps", "10", "--workers", "1", "-q"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["size"] == [320, 192] and manifest["seed"] == 2
    assert manifest["splits"]["train"]["images"] == 4 and manifest["splits"]["val"]["images"] == 1
    assert manifest["drives"][0]["frames"] == 2
    for rel in ("coco/train/000000.png", "coco/val/000004.png", "coco/annotations/instances_val.json",
                "drives/drive_000/drive.mp4", "drives/drive_000/drive.mcap",
                "drives/drive_000/kitti/image_02/data/0000000001.png",
                "drives/drive_000/kitti/image_02/timestamps.txt", "drives/drive_000/ground_truth.json"):
        assert (out / rel).is_file(), rel
    printed = capsys.readouterr().out
    assert "4 train + 1 val images" in printed and "small at model input" in printed


@pytest.mark.parametrize("extra, message", [
    (["--images", "0"], "images must be an integer >= 1"),
    (["--drives", "-2"], "drives must be an integer >= 0"),
    (["--val-fraction", "1.5"], "val_fraction"),
])
def test_bad_values_exit_2_with_a_message(tmp_path, capsys, extra, message):
    rc = main(["data", "synth", "--out", str(tmp_path / "o"), "-q", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "avprune data: error:" in err and message in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_unwritable_out_dir_is_reported(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    rc = main(["data", "synth", "--out", str(blocker / "x"), "--images", "5", "--drives", "0", "-q"])
    assert rc == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_bad_size_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(tmp_path), "--size", "640by384"])
    assert e.value.code == 2
    assert "expected WxH" in capsys.readouterr().err


def test_import_kitti_calls_the_converter(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("perception.kitti")
    fake.kitti_to_coco = lambda labels, images, out: calls.append((str(labels), str(images), str(out)))
    monkeypatch.setitem(sys.modules, "perception.kitti", fake)
    out = tmp_path / "kitti.json"
    rc = main(["data", "import-kitti", "--labels", "L", "--images", "I", "--out", str(out)])
    assert rc == 0 and calls == [("L", "I", str(out))]
    assert str(out) in capsys.readouterr().out


def test_import_kitti_errors_are_reported(monkeypatch, capsys):
    def broken(labels, images, out):
        raise FileNotFoundError(f"label folder {labels} does not exist")

    fake = types.ModuleType("perception.kitti")
    fake.kitti_to_coco = broken
    monkeypatch.setitem(sys.modules, "perception.kitti", fake)
    rc = main(["data", "import-kitti", "--labels", "nowhere", "--images", "I", "--out", "o.json"])
    assert rc == 2
    assert "label folder nowhere does not exist" in capsys.readouterr().err
