"""Stream readers on files the tests write: same frames and timestamps from every format,
clear errors (file + frame or offset) for broken recordings, counted per-frame decode failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploy.streams import StreamError, list_topics, open_stream, parse_stream_spec
from deploy.streams.image_folder import parse_kitti_timestamp
from deploy.streams.ros_image import raw_image_to_rgb
from tests.conftest import RAW_TOPIC, TOPIC, stamps, write_kitti, write_mcap, write_mp4
from tests.conftest import STREAM_H as H
from tests.conftest import STREAM_N as N
from tests.conftest import STREAM_W as W
from tests.conftest import stream_frames as make_frames

pytestmark = pytest.mark.timeout(60)  # a reader that hangs on a broken file fails instead




def write_rosbag2(path: Path, frames: list[np.ndarray], ts: list[int], storage: str) -> Path:
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    CompressedImage = store.types["sensor_msgs/msg/CompressedImage"]
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conn = writer.add_connection(TOPIC, CompressedImage.__msgtype__, typestore=store)
        writer.add_connection("/imu", "std_msgs/msg/String", typestore=store)
        for frame, t in zip(frames, ts, strict=True):
            ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            msg = CompressedImage(header=Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam"),
                                  format="png", data=png.reshape(-1))
            writer.write(conn, t + 5_000_000, store.serialize_cdr(msg, CompressedImage.__msgtype__))
    return path


def write_ros1_bag(path: Path, frames: list[np.ndarray], ts: list[int]) -> Path:
    import cv2
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    CompressedImage = store.types["sensor_msgs/msg/CompressedImage"]
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    with Writer(path) as writer:
        conn = writer.add_connection(TOPIC, CompressedImage.__msgtype__, typestore=store)
        for i, (frame, t) in enumerate(zip(frames, ts, strict=True)):
            ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            msg = CompressedImage(header=Header(seq=i, stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam"),
                                  format="png", data=png.reshape(-1))
            writer.write(conn, t, store.serialize_ros1(msg, CompressedImage.__msgtype__))
    return path


def read_all(spec: str, **kw):
    with open_stream(spec, **kw) as reader:
        frames = list(reader)
    return reader, frames


def relative(ts: list[int]) -> list[int]:
    return [t - ts[0] for t in ts]


# ---------------------------------------------------------------------------------------- same frames


def test_kitti_folder_exact_frames_and_nanosecond_stamps(tmp_path):
    frames, ts = make_frames(), stamps()
    root = write_kitti(tmp_path / "kitti", frames, ts)
    for spec in (str(root), str(root / "image_02"), f"{root}:image_02"):
        reader, got = read_all(spec)
        assert reader.kind == "kitti"
        assert [f.timestamp_ns for f in got] == ts
        assert [f.frame_id for f in got] == list(range(N))
        for a, b in zip(got, frames, strict=True):
            assert a.frame.dtype == np.uint8 and a.frame.shape == (H, W, 3)
            np.testing.assert_array_equal(a.frame, b)
    assert parse_kitti_timestamp("2011-09-26 13:02:25.964389445") == 1317042145_964389445
    assert parse_kitti_timestamp("2011-09-26 13:02:25.5") == 1317042145_500000000
    assert [t.topic for t in list_topics(root)] == ["image_02"]


def test_plain_image_folder_needs_fps(tmp_path):
    import cv2

    frames = make_frames(3)
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"img_{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    with pytest.raises(StreamError, match="--fps"):
        open_stream(str(tmp_path))
    reader, got = read_all(str(tmp_path), fps=20)
    assert [f.timestamp_ns for f in got] == [0, 50_000_000, 100_000_000]
    np.testing.assert_array_equal(got[2].frame, frames[2])


def test_mp4_frames_within_codec_tolerance_and_stamps(tmp_path):
    frames = make_frames()
    reader, got = read_all(str(write_mp4(tmp_path / "drive.mp4", frames)))
    assert reader.kind == "video"
    assert [f.timestamp_ns for f in got] == relative(stamps())
    for a, b in zip(got, frames, strict=True):
        assert np.abs(a.frame.astype(int) - b.astype(int)).mean() < 6  # mp4v is lossy


def test_mcap_compressed_and_raw_topics(tmp_path):
    frames, ts = make_frames(), stamps()
    path = write_mcap(tmp_path / "drive.mcap", frames, ts)
    topics = {t.topic: (t.msgtype, t.count) for t in list_topics(path)}
    assert topics == {TOPIC: ("sensor_msgs/msg/CompressedImage", N), RAW_TOPIC: ("sensor_msgs/msg/Image", N)}
    _, raw = read_all(f"{path}:{RAW_TOPIC}")
    assert [f.timestamp_ns for f in raw] == ts  # header stamps, not the later log times
    for a, b in zip(raw, frames, strict=True):
        np.testing.assert_array_equal(a.frame, b)  # rgb8 and bgr8 both come back as RGB
    _, jpeg = read_all(f"{path}:{TOPIC}")
    assert [f.timestamp_ns for f in jpeg] == ts
    for a, b in zip(jpeg, frames, strict=True):
        assert np.abs(a.frame.astype(int) - b.astype(int)).mean() < 4
    with pytest.raises(StreamError, match="several image topics"):
        open_stream(str(path))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_rosbag2_storages(tmp_path, storage):
    frames, ts = make_frames(), stamps()
    bag = write_rosbag2(tmp_path / "bag", frames, ts, storage)
    reader, got = read_all(str(bag))  # the only image topic is picked; /imu is not an image
    assert reader.kind == "rosbag2" and reader.topic == TOPIC
    assert [f.timestamp_ns for f in got] == ts
    for a, b in zip(got, frames, strict=True):
        np.testing.assert_array_equal(a.frame, b)
    assert {t.topic for t in list_topics(bag)} == {TOPIC, "/imu"}
    with pytest.raises(StreamError, match="not an image"):
        open_stream(f"{bag}:/imu")


def test_ros1_bag(tmp_path):
    frames, ts = make_frames(3), stamps(3)
    reader, got = read_all(str(write_ros1_bag(tmp_path / "drive.bag", frames, ts)))
    assert reader.kind == "rosbag1"
    assert [f.timestamp_ns for f in got] == ts
    np.testing.assert_array_equal(got[1].frame, frames[1])


def test_formats_agree_on_relative_timestamps(tmp_path):
    # What `make demo` relies on: one drive as MP4, MCAP and KITTI gives the same arrival times.
    frames, ts = make_frames(), stamps()
    specs = [str(write_mp4(tmp_path / "d.mp4", frames)), f"{write_mcap(tmp_path / 'd.mcap', frames, ts)}:{TOPIC}",
             str(write_kitti(tmp_path / "kitti", frames, ts))]
    times = [relative([f.timestamp_ns for f in read_all(s)[1]]) for s in specs]
    assert times[0] == times[1] == times[2]


# ---------------------------------------------------------------------------------------- broken input


def test_unknown_topic_lists_existing(tmp_path):
    path = write_mcap(tmp_path / "d.mcap", make_frames(2), stamps(2))
    with pytest.raises(StreamError, match="no topic '/nope'.*/camera/front/image/compressed"):
        open_stream(f"{path}:/nope")
    root = write_kitti(tmp_path / "kitti", make_frames(2), stamps(2))
    with pytest.raises(StreamError, match="image_03.*image_02"):
        open_stream(f"{root}:image_03")


@pytest.mark.parametrize("suffix", [".mp4", ".mcap", ".bag"])
def test_empty_files(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(StreamError, match=rf"{path.name}.*empty \(0 bytes\)"):
        open_stream(str(path))


def test_garbage_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for name, pattern in (("junk.mp4", "cannot be opened"), ("junk.mcap", "not an MCAP file"),
                          ("junk.bag", "cannot be opened")):
        path = tmp_path / name
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(StreamError, match=pattern) as e:
            open_stream(str(path))
        assert str(path) in str(e.value)


def test_truncated_mp4_and_avi(tmp_path):
    frames = make_frames(10)
    data = write_mp4(tmp_path / "full.mp4", frames).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: never written
    with pytest.raises(StreamError, match="cut.mp4.*truncated"):
        open_stream(str(cut))
    data = write_mp4(tmp_path / "full.avi", frames, fourcc="MJPG").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # the header still promises 10 frames
    with pytest.raises(StreamError, match=r"cut.avi broke off at frame \d of the 10"):
        read_all(str(cut))


def test_truncated_mcap_names_offset(tmp_path):
    data = write_mcap(tmp_path / "full.mcap", make_frames(), stamps()).read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(StreamError, match=r"cut.mcap \(\d+ bytes\) has no valid footer at byte offset \d+"):
        open_stream(f"{cut}:{TOPIC}")


def test_bad_timestamps_line_and_count(tmp_path):
    root = write_kitti(tmp_path / "kitti", make_frames(4), stamps(4))
    stamps_file = root / "image_02" / "timestamps.txt"
    lines = stamps_file.read_text().splitlines()
    stamps_file.write_text("\n".join(lines[:2] + ["2011-09-26 25:61:00.1"] + lines[3:]) + "\n")
    with pytest.raises(StreamError, match=r"timestamps.txt line 3 \(frame 2\)"):
        open_stream(str(root))
    stamps_file.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(StreamError, match="3 timestamps for 4 images"):
        open_stream(str(root))


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(StreamError, match="holds no images"):
        open_stream(str(tmp_path), fps=10)


def test_single_bad_frames_are_counted(tmp_path):
    frames, ts = make_frames(), stamps()
    path = write_mcap(tmp_path / "d.mcap", frames, ts, corrupt=(2,))
    reader, got = read_all(f"{path}:{TOPIC}")
    assert [f.frame_id for f in got] == [0, 1, 3, 4, 5]
    assert [(f.frame_id, f.timestamp_ns) for f in reader.decode_failures] == [(2, ts[2])]
    assert reader.describe()["decode_failures"][0]["frame_id"] == 2
    root = write_kitti(tmp_path / "kitti", frames, ts)
    (root / "image_02" / "data" / "0000000004.png").write_bytes(b"\x89PNG broken")
    reader, got = read_all(str(root))
    assert len(got) == N - 1 and [f.frame_id for f in reader.decode_failures] == [4]


def test_spec_parsing_and_raw_encodings(tmp_path):
    assert parse_stream_spec("a/b.mcap:/cam/x") == (Path("a/b.mcap"), "/cam/x")
    assert parse_stream_spec("a/b.mp4") == (Path("a/b.mp4"), None)
    with pytest.raises(FileNotFoundError):
        open_stream(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "x.txt").write_text("x")
        open_stream(str(tmp_path / "x.txt"))
    # padded rows (step > width * channels) and mono
    padded = np.zeros((2, 8), np.uint8)
    padded[:, :3] = [[1, 2, 3], [4, 5, 6]]
    mono = raw_image_to_rgb(2, 3, "mono8", 8, padded.tobytes(), what="t")
    assert mono.shape == (2, 3, 3) and mono[1, 2].tolist() == [6, 6, 6]
    with pytest.raises(ValueError, match="yuv422.*not supported"):
        raw_image_to_rgb(2, 3, "yuv422", 8, padded.tobytes(), what="t")


def test_synthetic_drive_formats_agree(tmp_path):
    # The drive `make demo` validates, as the generator writes it: MP4, MCAP and KITTI must give the
    # same frames (within codec loss) at the same times.
    from perception.synthetic.generate import generate_dataset

    generate_dataset(tmp_path, images=1, drives=1, seed=0, val_fraction=0.0, size=(160, 96), drive_seconds=0.5,
                     fps=30)
    drive = tmp_path / "drives" / "drive_000"
    runs = [read_all(str(drive / "drive.mp4"))[1], read_all(str(drive / "drive.mcap"))[1],
            read_all(str(drive / "kitti"))[1]]
    times = [relative([f.timestamp_ns for f in frames]) for frames in runs]
    assert len(times[0]) == 15 and times[0] == times[1] == times[2]
    for lossy in runs[:2]:
        diff = np.mean([np.abs(a.frame.astype(int) - b.frame.astype(int)).mean() for a, b in zip(lossy, runs[2], strict=True)])
        assert diff < 12


def test_image_packet_stamps_and_broken_messages():
    """Header stamp first; a zero stamp falls back to the log time with one note; a message that
    does not deserialize is one failing frame, not the end of the stream."""
    from types import SimpleNamespace

    from deploy.streams.base import DecodeError
    from deploy.streams.ros_image import ZeroStampNotes, image_packet

    def msg(sec: int, nanosec: int) -> SimpleNamespace:
        data = np.arange(2 * 3 * 3, dtype=np.uint8)
        return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=sec, nanosec=nanosec)),
                               height=2, width=3, encoding="rgb8", step=9, data=data)

    notes: list[str] = []
    zero = ZeroStampNotes("MCAP log time", notes)
    kw = {"type_name": "sensor_msgs/msg/Image", "on_zero_stamp": zero}
    stamped = image_packet(lambda: msg(5, 7), log_time=99, index=0, what="f0", **kw)
    assert stamped.timestamp_ns == 5_000_000_007 and stamped.decode().shape == (2, 3, 3)
    unstamped = [image_packet(lambda: msg(0, 0), log_time=100 + i, index=i, what=f"f{i}", **kw) for i in (1, 2)]
    assert [p.timestamp_ns for p in unstamped] == [101, 102]
    assert notes == ["some header stamps are zero: those frames use the MCAP log time"] and zero.count == 2

    def corrupt() -> None:
        raise ValueError("truncated CDR")

    broken = image_packet(corrupt, log_time=103, index=3, what="bag frame 3", **kw)
    assert broken.timestamp_ns == 103
    with pytest.raises(DecodeError, match="bag frame 3: message does not deserialize"):
        broken.decode()
