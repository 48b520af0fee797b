"""perception.synthetic: determinism, exact visible boxes, occlusion/size rules, COCO and drive outputs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from perception.classes import DRIVE_CLASSES, category_id
from perception.synthetic import generate as gen
from perception.synthetic.camera import Camera
from perception.synthetic.effects import Environment
from perception.synthetic.objects import DIMENSIONS, Actor
from perception.synthetic.render import BoxRules, render_frame
from perception.synthetic.scene import Road
from perception.synthetic.world import World

SIZE = (320, 192)  # small frames keep the suite fast; the geometry is resolution independent


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, gen.Manifest]:
    root = tmp_path_factory.mktemp("synth")
    manifest = gen.generate_dataset(root, images=10, drives=1, seed=7, size=SIZE, drive_seconds=0.6, fps=10.0)
    return root, manifest


# -- a hand-built street for the occlusion / size rules ---------------------------------------------
def _car(track_id: int, x: float, z: float, cls: str = "car") -> Actor:
    w, h, length = DIMENSIONS[cls]
    return Actor(track_id=track_id, cls=cls, x=x, z=z, vz=0.0, width=w, height=h, length=length,
                 color=(40, 40, 200), color2=(230, 230, 230), facing="rear")


def _world(*actors: Actor, size=(640, 384)) -> World:
    road = Road(n_same=2, n_oncoming=1, ego_lane=0, asphalt=(90, 90, 94), ground=(60, 120, 80))
    return World(camera=Camera.default(*size), env=Environment(noise_sigma=0.0), road=road, buildings=(),
                 trees=(), actors=tuple(actors), ego_speed=0.0)


def _render(world: World, rules: BoxRules | None = None):
    return render_frame(world, 0.0, np.random.default_rng(0), rules=rules or BoxRules(min_visible=0.0),
                        effects=False)


def test_near_object_fully_covering_a_far_one_drops_it():
    far = _car(1, 0.0, 30.0)
    _, alone = _render(_world(far))
    assert [b.track_id for b in alone] == [1]
    _, boxes = _render(_world(far, _car(2, 0.0, 8.0, "truck")))
    assert [b.track_id for b in boxes] == [2]


def test_partially_covered_object_box_shrinks_to_its_visible_part():
    far = _car(1, 5.0, 40.0, "bus")
    _, alone = _render(_world(far))
    full = alone[0]
    # A truck straight ahead at 10 m hides the left part (flank and most of the rear) of the far bus.
    _, boxes = _render(_world(far, _car(2, 0.0, 10.0, "truck")))
    part = next(b for b in boxes if b.track_id == 1)
    fx, fy, fw, fh = full.bbox
    px, py, pw, ph = part.bbox
    assert px > fx + 5 and px + pw == fx + fw, "left part hidden: the box starts later, ends at the same place"
    assert (py, ph) == (fy, fh)
    assert 0.0 < part.visible_fraction < 1.0 and full.visible_fraction == 1.0
    # The box is exactly the visible pixels: the far car alone, rendered again, differs from the
    # background only inside its box.
    img_bg, _ = _render(_world())
    img, _ = _render(_world(far))
    diff = np.any(img != img_bg, axis=2)
    rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
    assert (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1) == full.bbox


def test_minimum_size_rule_drops_small_boxes_and_is_a_parameter():
    far = _car(1, 1.0, 55.0)
    _, kept = _render(_world(far), BoxRules(min_side=4, min_area=20, min_visible=0.0))
    assert len(kept) == 1
    w, h = kept[0].bbox[2:]
    _, dropped = _render(_world(far), BoxRules(min_side=min(w, h) + 1, min_area=20, min_visible=0.0))
    assert dropped == []
    _, dropped = _render(_world(far), BoxRules(min_side=1, min_area=w * h + 1, min_visible=0.0))
    assert dropped == []
    with pytest.raises(ValueError, match="min_visible"):
        BoxRules(min_visible=1.5)


def test_object_cut_by_the_image_border_is_clipped_and_counted_as_partly_hidden():
    _, boxes = _render(_world(_car(1, 4.2, 6.0)))
    (b,) = boxes
    x, y, w, h = b.bbox
    assert x + w == 640 and b.visible_fraction < 1.0


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path, dataset):
    root, _ = dataset
    again = tmp_path / "again"
    gen.generate_dataset(again, images=10, drives=0, seed=7, size=SIZE)
    a = {k: v for k, v in _files(root).items() if k.startswith("coco/")}
    b = {k: v for k, v in _files(again).items() if k.startswith("coco/")}
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    other = tmp_path / "other"
    gen.generate_dataset(other, images=10, drives=0, seed=8, size=SIZE)
    c = _files(other)
    assert a.keys() == {k for k in c if k.startswith("coco/")}
    assert sum(a[k] != c[k] for k in a) >= len(a) - 1


def test_worker_pool_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "POOL_MIN_JOBS", 0)
    kw = {"images": 4, "drives": 1, "seed": 3, "size": SIZE, "val_fraction": 0.25, "drive_seconds": 0.4, "fps": 10.0}
    gen.generate_dataset(tmp_path / "w1", workers=1, **kw)
    gen.generate_dataset(tmp_path / "w2", workers=2, **kw)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")


def test_coco_json_loads_in_pycocotools_with_valid_boxes(dataset):
    from pycocotools.coco import COCO

    root, manifest = dataset
    assert manifest.splits["train"]["images"] == 8 and manifest.splits["val"]["images"] == 2
    for split in ("train", "val"):
        coco = COCO(str(root / f"coco/annotations/instances_{split}.json"))
        assert [coco.cats[i]["name"] for i in range(1, 8)] == list(DRIVE_CLASSES)
        assert sorted(coco.imgs) == list(range(1, len(coco.imgs) + 1))
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            im = coco.imgs[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 7
            assert 0.0 <= ann["occluded"] < 1.0
        for im in coco.imgs.values():
            assert (root / f"coco/{split}" / im["file_name"]).is_file()


def test_drive_outputs_agree_in_frames_and_stamps(dataset):
    import cv2
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    root, manifest = dataset
    (drive,) = manifest.drives
    d = root / drive["path"]
    n = drive["frames"]
    assert n == 6
    cap = cv2.VideoCapture(str(d / "drive.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == n and frames[0].shape == (SIZE[1], SIZE[0], 3)

    with open(d / "drive.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        msgs = [(m.log_time, msg) for _, _, m, msg in
                reader.iter_decoded_messages(topics=["/camera/front/image/compressed"])]
    assert len(msgs) == n
    stamps = [msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec for _, msg in msgs]
    assert stamps == [log_time for log_time, _ in msgs]
    epoch = int(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()) * 10**9
    assert stamps == [epoch + round(i * 1e9 / 10.0) for i in range(n)]
    img = cv2.imdecode(np.frombuffer(bytes(msgs[0][1].data), np.uint8), cv2.IMREAD_COLOR)
    assert msgs[0][1].format == "jpeg" and img.shape == (SIZE[1], SIZE[0], 3)

    lines = (d / "kitti/image_02/timestamps.txt").read_text().splitlines()
    parsed = []
    for line in lines:
        day, frac = line.split(".")
        sec = dt.datetime.strptime(day, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
        assert len(frac) == 9
        parsed.append(int(sec) * 10**9 + int(frac))
    assert parsed == stamps
    pngs = sorted((d / "kitti/image_02/data").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:010d}.png" for i in range(n)]

    gt = json.loads((d / "ground_truth.json").read_text())
    assert [im["id"] for im in gt["images"]] == list(range(n))
    assert [im["timestamp_ns"] for im in gt["images"]] == stamps
    assert all((d / im["file_name"]).is_file() for im in gt["images"])


def test_drive_is_temporally_coherent():
    from perception.synthetic.drive import drive_world, iter_drive

    world = drive_world(seed=1, drive_index=0, camera=Camera.default(*SIZE), seconds=1.0)
    frames = list(iter_drive(world, seed=1, drive_index=0, seconds=1.0, fps=5.0))
    assert len(frames) == 5 and world.ego_speed > 0
    tracks = [{b.track_id: b for b in f.boxes} for f in frames]
    # Most objects persist from one frame to the next, and a parked sign comes closer at ego speed.
    for a, b in zip(tracks, tracks[1:], strict=False):
        assert len(a.keys() & b.keys()) >= 0.5 * max(len(a), 1)
    statics = {a.track_id for a in world.actors if a.vz == 0.0} & tracks[0].keys() & tracks[1].keys()
    assert statics, "seed 1 has parked signs/lights in view"
    for tid in statics:
        step = tracks[0][tid].depth_m - tracks[1][tid].depth_m
        assert step == pytest.approx(world.ego_speed / 5.0, abs=1e-2)
    assert not np.array_equal(frames[0].image, frames[-1].image)


def test_manifest_is_written_last_and_removed_by_an_interrupted_run(tmp_path, dataset):
    root, manifest = dataset
    saved = json.loads((root / "manifest.json").read_text())
    assert saved["complete"] is True and saved["seed"] == 7 and saved["size"] == list(SIZE)
    assert saved["splits"]["val"]["annotations"] == manifest.splits["val"]["annotations"]

    out = tmp_path / "interrupted"
    gen.generate_dataset(out, images=2, drives=0, seed=0, size=SIZE, val_fraction=0.5)
    assert (out / "manifest.json").is_file()

    def boom(stage: str, done: int, total: int) -> None:
        if stage == "val":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen.generate_dataset(out, images=2, drives=0, seed=0, size=SIZE, val_fraction=0.5, progress=boom)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("kwargs, match", [
    ({"images": 0}, "images"), ({"drives": -1}, "drives"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"size": (30, 30)}, "size"), ({"fps": 0.0}, "fps"), ({"workers": 0}, "workers"),
    ({"images": 1}, "empty val split"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    args = {"images": 10, "drives": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        gen.generate_dataset(tmp_path, **args)
    assert not list(tmp_path.iterdir()) or not (tmp_path / "manifest.json").exists()


def test_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create output folder"):
        gen.generate_dataset(blocker / "sub", images=5, drives=0, seed=0, size=SIZE)


def test_stats_and_contact_sheet(dataset, tmp_path):
    import cv2

    from perception.synthetic.contact_sheet import contact_sheet
    from perception.synthetic.stats import dataset_stats

    root, _ = dataset
    ann = root / "coco/annotations/instances_train.json"
    doc = json.loads(ann.read_text())
    stats = dataset_stats(ann)
    assert stats["images"] == 8 and stats["boxes"] == len(doc["annotations"])
    assert sum(stats["boxes_per_class"].values()) == stats["boxes"]
    assert stats["mean_objects_per_image"] == pytest.approx(stats["boxes"] / 8)
    small = sum((a["bbox"][2] * 320 / SIZE[0]) * (a["bbox"][3] * 320 / SIZE[1]) < 1024 for a in doc["annotations"])
    assert stats["fraction_small_at_model_input"] == pytest.approx(small / stats["boxes"])
    # Halving the model input makes more boxes small.
    assert dataset_stats(ann, (160, 160))["fraction_small_at_model_input"] >= stats["fraction_small_at_model_input"]

    out = contact_sheet(root / "coco/train", ann, tmp_path / "sheet.png", n=6, cols=3, tile_width=200)
    sheet = cv2.imread(str(out))
    assert sheet.shape == (2 * round(SIZE[1] * 200 / SIZE[0]), 600, 3)
    with pytest.raises(FileNotFoundError, match="missing"):
        contact_sheet(tmp_path, ann, tmp_path / "x.png")


def test_default_scenes_are_varied_and_not_trivial():
    """At the default size: several objects per frame, every class present, small and occluded boxes."""
    rules = BoxRules()
    boxes = [b for i in range(30) for b in gen.render_coco_image(0, i, (640, 384), rules)[1]]
    assert len(boxes) >= 3 * 30
    assert {b.category_id for b in boxes} == {category_id(c) for c in DRIVE_CLASSES}
    small = np.mean([(b.bbox[2] * 0.5) * (b.bbox[3] * 320 / 384) < 1024 for b in boxes])
    assert 0.2 < small < 0.6
    assert np.mean([b.visible_fraction < 0.95 for b in boxes]) > 0.1
    assert all(min(b.bbox[2:]) >= rules.min_side for b in boxes)


def test_environment_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Environment().ambient = 0.5  # type: ignore[misc]
