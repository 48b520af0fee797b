"""Drawing with an object-id map, so every box is the tight box of the pixels that stay visible.

Objects are painted far to near (painter's algorithm). Every primitive is drawn twice with the
same integer geometry: once in colour on the canvas, once with the object's id on ``idmap``. A
nearer object overwrites the ids of what it hides, so after the last object the pixels still
carrying id k are exactly object k's visible pixels; its full silhouette size is counted right
after it is drawn (on the padded canvas, so pixels cut off by the image border count as hidden).
Unlabelled occluders (poles, props) are drawn with id 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.synthetic.camera import Camera


@dataclass(frozen=True)
class Shading:
    """How a surface colour reaches the sensor: ambient light and distance fog."""

    ambient: float = 1.0
    fog_color: tuple[float, float, float] = (200.0, 200.0, 200.0)
    fog_density: float = 0.0  # 1/m; 0 disables fog (Koschmieder: transmission = exp(-density·Z))

    def color(self, bgr: tuple[float, float, float], depth: float, *, emissive: bool = False
              ) -> tuple[int, int, int]:
        """Shade a BGR surface colour seen at ``depth`` metres (emissive surfaces ignore ambient)."""
        c = np.asarray(bgr, np.float64) * (1.0 if emissive else self.ambient)
        if self.fog_density > 0.0:
            t = np.exp(-self.fog_density * depth)
            c = t * c + (1.0 - t) * np.asarray(self.fog_color)
        c = np.clip(c, 0, 255)
        return int(c[0]), int(c[1]), int(c[2])


@dataclass(frozen=True)
class VisibleObject:
    """What survives occlusion and clipping: tight visible box and visible fraction."""

    index: int
    box_xyxy: tuple[int, int, int, int]  # inclusive pixel bounds in image coordinates
    visible_pixels: int
    full_pixels: int

    @property
    def visible_fraction(self) -> float:
        return self.visible_pixels / max(self.full_pixels, 1)


class Painter:
    """A padded BGR canvas plus an id map; all coordinates passed in are image coordinates."""

    def __init__(self, camera: Camera, shading: Shading) -> None:
        rows, cols = camera.canvas_shape
        self.camera = camera
        self.shading = shading
        self.canvas = np.zeros((rows, cols, 3), np.uint8)
        self.idmap = np.zeros((rows, cols), np.int32)
        self.pad = camera.pad
        self._id = 0
        self._depth = 0.0
        self._lo = np.array([np.inf, np.inf])
        self._hi = np.array([-np.inf, -np.inf])
        self._full: dict[int, tuple[int, int, int, int, int]] = {}

    # -- object bookkeeping -------------------------------------------------------------------
    def begin(self, object_id: int, depth: float) -> None:
        """Start painting labelled object ``object_id`` (≥ 1) at ``depth`` metres."""
        if object_id < 1:
            raise ValueError(f"object ids start at 1 (0 is background), got {object_id}")
        self._id, self._depth = object_id, depth
        self._lo[:] = np.inf
        self._hi[:] = -np.inf

    def end(self) -> None:
        """Finish the current object: count its full silhouette (before anything nearer is drawn)."""
        k = self._id
        if k and np.isfinite(self._lo).all():
            rows, cols = self.idmap.shape
            x0, y0 = (int(max(0, np.floor(v) - 1)) for v in self._lo)
            x1 = int(min(cols, np.ceil(self._hi[0]) + 2))
            y1 = int(min(rows, np.ceil(self._hi[1]) + 2))
            full = int(np.count_nonzero(self.idmap[y0:y1, x0:x1] == k))
            if full:
                self._full[k] = (x0, y0, x1, y1, full)
        self._id = 0

    def background(self, depth: float) -> None:
        """Paint unlabelled things (they still hide what lies behind them)."""
        self._id, self._depth = 0, depth

    # -- primitives ---------------------------------------------------------------------------
    def _pts(self, pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
        p = np.asarray(pts, np.float64).reshape(-1, 2)
        # Track the object's extent (plus stroke width) so end() counts its whole silhouette.
        self._lo = np.minimum(self._lo, p.min(0) + self.pad - margin)
        self._hi = np.maximum(self._hi, p.max(0) + self.pad + margin)
        return np.round(p + self.pad).astype(np.int32)

    def _col(self, bgr, emissive: bool) -> tuple[int, int, int]:
        return self.shading.color(bgr, self._depth, emissive=emissive)

    def poly(self, pts: np.ndarray, bgr, *, emissive: bool = False) -> None:
        """Filled polygon (N×2 image coordinates)."""
        import cv2

        p = self._pts(pts)
        cv2.fillPoly(self.canvas, [p], self._col(bgr, emissive))
        cv2.fillPoly(self.idmap, [p], self._id)

    def polys(self, many: list[np.ndarray], bgr, *, emissive: bool = False) -> None:
        """Several non-overlapping filled polygons of one colour in one call (window grids)."""
        import cv2

        if not many:
            return
        ps = [self._pts(p) for p in many]
        cv2.fillPoly(self.canvas, ps, self._col(bgr, emissive))
        cv2.fillPoly(self.idmap, ps, self._id)

    def rect(self, x0: float, y0: float, x1: float, y1: float, bgr, *, emissive: bool = False) -> None:
        """Filled axis-aligned rectangle."""
        self.poly(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), bgr, emissive=emissive)

    def circle(self, cx: float, cy: float, r: float, bgr, *, thickness: int = -1, emissive: bool = False) -> None:
        """Filled (thickness -1) or outlined circle."""
        import cv2

        c = self._pts(np.array([[cx - r, cy - r], [cx + r, cy + r]]), margin=max(thickness, 0))
        center = (int(round((c[0, 0] + c[1, 0]) / 2)), int(round((c[0, 1] + c[1, 1]) / 2)))
        rad = max(1, int(round(r)))
        cv2.circle(self.canvas, center, rad, self._col(bgr, emissive), thickness)
        cv2.circle(self.idmap, center, rad, self._id, thickness)

    def line(self, p0, p1, bgr, *, thickness: float = 1.0, emissive: bool = False) -> None:
        """Straight stroke of a given width (pixels)."""
        import cv2

        t = max(1, int(round(thickness)))
        p = self._pts(np.array([p0, p1]), margin=t)
        cv2.line(self.canvas, tuple(map(int, p[0])), tuple(map(int, p[1])), self._col(bgr, emissive), t)
        cv2.line(self.idmap, tuple(map(int, p[0])), tuple(map(int, p[1])), self._id, t)

    # -- results ------------------------------------------------------------------------------
    def image(self) -> np.ndarray:
        """The visible image (the canvas without its padding), a view."""
        p, cam = self.pad, self.camera
        return self.canvas[p:p + cam.height_px, p:p + cam.width]

    def visible_objects(self) -> dict[int, VisibleObject]:
        """Tight visible box and visible/full pixel counts of every object with visible pixels."""
        p, cam = self.pad, self.camera
        out: dict[int, VisibleObject] = {}
        for k, (x0, y0, x1, y1, full) in self._full.items():
            # Crop the object's own region to the image part of the canvas.
            cx0, cy0 = max(x0, p), max(y0, p)
            cx1, cy1 = min(x1, p + cam.width), min(y1, p + cam.height_px)
            if cx0 >= cx1 or cy0 >= cy1:
                continue
            m = self.idmap[cy0:cy1, cx0:cx1] == k
            n = int(np.count_nonzero(m))
            if n == 0:
                continue
            rows = np.flatnonzero(m.any(axis=1))
            cols = np.flatnonzero(m.any(axis=0))
            box = (int(cols[0] + cx0 - p), int(rows[0] + cy0 - p), int(cols[-1] + cx0 - p), int(rows[-1] + cy0 - p))
            out[k] = VisibleObject(index=k, box_xyxy=box, visible_pixels=n, full_pixels=full)
        return out
