"""Pinhole camera over a flat ground plane: where a world point lands in the image.

World frame (metres): X to the right, Y up from the road surface, Z forward from the camera.
The camera sits at height ``height`` looking along +Z with an optional small pitch expressed as
the image row of the horizon. Projection is the standard pinhole model (Hartley & Zisserman,
*Multiple View Geometry*, ch. 6): u = cx + f·X/Z, v = v_horizon + f·(h − Y)/Z, so an object of
height H at depth Z is f·H/Z pixels tall and its foot lies at v_horizon + f·h/Z.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Nothing nearer than this is drawn (the projection explodes as Z → 0).
NEAR_CLIP_M = 1.0


@dataclass(frozen=True)
class Camera:
    """Intrinsics of the front camera plus its mounting height.

    ``pad`` is the margin (pixels) of the drawing canvas around the image: objects are drawn on
    the padded canvas so that the part cut off by the image border still counts in the object's
    full silhouette (truncation is then measured, not guessed).
    """

    width: int
    height_px: int
    focal: float
    cx: float
    horizon: float
    height: float = 1.5
    pad: int = 64

    @classmethod
    def default(cls, width: int, height_px: int, *, horizon_frac: float = 0.45, hfov_deg: float = 70.0,
                mount_height: float = 1.5) -> Camera:
        """A camera with a ~70° horizontal field of view and the horizon at 45% of the height."""
        focal = (width / 2.0) / np.tan(np.deg2rad(hfov_deg) / 2.0)
        return cls(width=width, height_px=height_px, focal=float(focal), cx=width / 2.0,
                   horizon=horizon_frac * height_px, height=mount_height, pad=max(32, width // 10))

    def project(self, x: np.ndarray | float, y: np.ndarray | float, z: np.ndarray | float) -> np.ndarray:
        """Image coordinates (..., 2) of world points; z must be ≥ NEAR_CLIP_M (caller clips)."""
        x, y, z = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                      np.asarray(z, np.float64))
        u = self.cx + self.focal * x / z
        v = self.horizon + self.focal * (self.height - y) / z
        return np.stack([u, v], axis=-1)

    def scale(self, z: float) -> float:
        """Pixels per metre for something facing the camera at depth ``z``."""
        return self.focal / z

    def ground_depth(self, v: np.ndarray) -> np.ndarray:
        """Depth of the ground point seen at image row(s) ``v`` (rows below the horizon only)."""
        dv = np.maximum(np.asarray(v, np.float64) - self.horizon, 1e-3)
        return self.focal * self.height / dv

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """(rows, cols) of the padded drawing canvas."""
        return self.height_px + 2 * self.pad, self.width + 2 * self.pad
