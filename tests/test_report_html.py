"""The HTML report: self-contained, renders from report.json alone, opens in headless Chromium.

The Chromium test needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``) and is
skipped with that reason when it is absent.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from deploy.realtime import SimulatedClock
from deploy.report_html import render, write_report
from deploy.validation import ValidationConfig, parse_fail_on, run_validation
from tests.conftest import IdRuntime, stamps, write_kitti
from tests.conftest import stream_frames as make_frames

pytestmark = pytest.mark.timeout(120)



class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: dict[str, str] = {}  # id -> src

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img" and "id" in a:
            self.images[a["id"]] = a["src"]
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.links.append(a["href"])
        if "id" in a:
            self.ids.append(a["id"])


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """Two fake models on a KITTI stream with one corrupt frame, on a simulated clock."""
    root = write_kitti(tmp_path_factory.mktemp("kitti"), make_frames(9), stamps(9))
    (root / "image_02" / "data" / "0000000007.png").write_bytes(b"not a png")
    clock = SimulatedClock()
    times = {"cand.onnx": lambda i: 20.0, "ref.onnx": lambda i: 250.0 if i % 3 == 0 else 50.0}

    def opener(path: str):
        return IdRuntime(clock, times[path])

    config = ValidationConfig(budget_ms=100, warmup="1", fail_on=parse_fail_on("p99"))
    return run_validation(["cand.onnx", "ref.onnx"], [str(root)], config, open_runtime=opener, clock=clock)


def test_report_is_self_contained_and_complete(outcome):
    page = render(outcome.report, outcome.samples)
    parsed = _Collector()
    parsed.feed(page)
    assert "script" not in parsed.tags and not parsed.links
    assert parsed.srcs and all(src.startswith("data:image/") for src in parsed.srcs)
    assert {"timeline", "distribution", "stages"} <= set(parsed.ids)
    for title in ("Summary", "Latency timeline", "Latency distribution", "Per-stage breakdown", "Sample frames",
                  "Streams", "Models and environment"):
        assert f"<h2>{title}</h2>" in page
    assert "PASS: cand.onnx meets the budget" in page and "(not gating): FAIL" in page
    assert "#7" in page  # the corrupt frame is listed among the decode failures
    assert "<h2>Paired speed-up</h2>" in page and "cand.onnx is 2.50x as fast as ref.onnx" in page
    import cv2

    timeline = parsed.images["timeline"]
    png = cv2.imdecode(np.frombuffer(base64.b64decode(timeline.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert png is not None and png.shape[0] >= 300 and png.shape[1] >= 1000
    assert _budget_pixels(png) > 100  # the budget line is drawn
    assert len(outcome.samples) == 3 and all(len(s.detections) == 2 for s in outcome.samples)


def test_report_renders_from_json_alone(outcome, tmp_path):
    json_path, html_path = write_report(outcome, tmp_path / "rep")
    reloaded = json.loads(json_path.read_text())
    stats = reloaded["overall"][0]["stats"]
    assert (stats["decode_failures"], stats["warmup_frames"], stats["offered"]) == (1, 1, 8)
    page = render(reloaded)  # no sample frames: everything else comes from the JSON
    assert 'id="timeline"' in page and "Sample frames" not in page
    assert html_path.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_opens_in_headless_chromium_and_shows_timeline(outcome, tmp_path):
    import cv2

    _, html_path = write_report(outcome, tmp_path / "rep")
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr", "--v=0"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="timeline"' in dom.stdout and "Latency timeline" in dom.stdout
    shot = tmp_path / "shot.png"
    res = subprocess.run([*base, "--window-size=1400,1400", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    # The page has no scripts, so any console message is an error (blocked resource, bad markup, ...).
    console = [line for line in res.stderr.splitlines() + dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    image = cv2.imread(str(shot))
    assert image is not None and image.std() > 10  # not a blank page
    assert _budget_pixels(image) > 100  # the timeline, with its budget line, is on screen


def _budget_pixels(bgr: np.ndarray) -> int:
    """Pixels of the budget line's red (#d62728, anti-aliased); orange and the FAIL banner are excluded."""
    b, g, r = (bgr[:, :, i].astype(int) for i in range(3))
    return int(((r > 170) & (g < 90) & (b < 90)).sum())


def test_html_kit_escapes_once_and_embeds():
    from deploy import html_kit as hk

    fig, ax = hk.figure(3, 2)
    ax.plot([0, 1], [1, 0])
    png = hk.figure_png(fig)
    assert png.startswith(b"\x89PNG")
    t = hk.table(["model", "p50 ms"], [["<dense>", 7.126], [hk.tag(True), None]], row_classes=[None, "overall"])
    assert "&lt;dense&gt;" in t and "7.13" in t and "–" in t and 'class="tag-pass"' in t and "class='overall'" in t
    page = hk.page("T <1>", [hk.banner("ok & fine", passed=None, reasons=["r<1>"]), hk.section("S", t),
                             hk.png(png, "chart", ident="c1"), hk.jpeg(np.zeros((8, 8, 3), np.uint8), "pic")])
    parsed = _Collector()
    parsed.feed(page)
    assert page.startswith("<!DOCTYPE html>") and "<title>T &lt;1&gt;</title>" in page
    assert 'class="verdict info"' in page and "ok &amp; fine" in page and "<li>r&lt;1&gt;</li>" in page
    assert parsed.images["c1"].startswith("data:image/png;base64,") and "script" not in parsed.tags
    assert any(src.startswith("data:image/jpeg;base64,") for src in parsed.srcs)
