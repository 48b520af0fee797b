"""Render one frame of a :class:`~perception.synthetic.world.World` and its exact boxes.

Order: street (unlabelled), then actors far to near through the id-map
:class:`~perception.synthetic.painter.Painter`, then sensor effects. A box is the tight box of the
object's pixels that are still visible after occlusion and clipping to the image; objects with no
visible pixels, a visible box under ``min_side`` px or ``min_area`` px², or less than
``min_visible`` of their silhouette showing are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.classes import category_id
from perception.synthetic.camera import NEAR_CLIP_M
from perception.synthetic.effects import apply_sensor_effects
from perception.synthetic.objects import Actor, draw_actor
from perception.synthetic.painter import Painter
from perception.synthetic.scene import draw_street
from perception.synthetic.world import VIEW_FAR_M, World


@dataclass(frozen=True)
class BoxRules:
    """Which visible remnants still count as objects (pixels at the rendered resolution)."""

    min_side: int = 6
    min_area: int = 48
    min_visible: float = 0.3  # KITTI "moderate" keeps partly occluded objects, not mostly hidden ones

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.min_area < 1:
            raise ValueError(f"min_side and min_area must be >= 1 px, got {self.min_side}, {self.min_area}")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"min_visible is a fraction in [0, 1], got {self.min_visible}")


@dataclass(frozen=True)
class ObjectBox:
    """One ground-truth object of a frame (COCO bbox: x, y, w, h in pixels)."""

    category_id: int
    bbox: tuple[int, int, int, int]
    visible_fraction: float
    track_id: int
    depth_m: float

    @property
    def area(self) -> int:
        return self.bbox[2] * self.bbox[3]


def actor_position(a: Actor, world: World, t: float) -> tuple[float, float]:
    """(x, depth) of actor ``a`` relative to the ego camera at time ``t``."""
    return a.x + a.vx * t, a.z + a.vz * t - world.ego_s(t)


def draw_actors(p: Painter, placed: list[tuple[Actor, float, float]], t: float, *, lights_on: bool) -> list[int]:
    """Paint actors far to near (ids 1..n in painting order); returns the painting order."""
    order = sorted(range(len(placed)), key=lambda i: (-placed[i][2], placed[i][0].track_id))
    for k, i in enumerate(order, start=1):
        a, x, z = placed[i]
        p.begin(k, z)
        draw_actor(p, a, x, z, t, lights_on=lights_on)
        p.end()
    return order


def select_boxes(p: Painter, placed: list[tuple[Actor, float, float]], order: list[int],
                 rules: BoxRules) -> list[ObjectBox]:
    """Apply the visibility rules to what the painter saw; boxes come out near to far."""
    boxes: list[ObjectBox] = []
    for k, vis in p.visible_objects().items():
        x0, y0, x1, y1 = vis.box_xyxy
        w, h = x1 - x0 + 1, y1 - y0 + 1
        if min(w, h) < rules.min_side or w * h < rules.min_area or vis.visible_fraction < rules.min_visible:
            continue
        a, _, z = placed[order[k - 1]]
        boxes.append(ObjectBox(category_id=category_id(a.cls), bbox=(x0, y0, w, h),
                               visible_fraction=round(vis.visible_fraction, 4), track_id=a.track_id,
                               depth_m=round(z, 3)))
    boxes.sort(key=lambda b: (b.depth_m, b.track_id))
    return boxes


def render_frame(world: World, t: float, rng: np.random.Generator, *, rules: BoxRules | None = None,
                 effects: bool = True) -> tuple[np.ndarray, list[ObjectBox]]:
    """Render the world at time ``t`` seconds: a BGR uint8 image (H, W, 3) and its boxes.

    ``rng`` only drives the per-frame sensor effects (noise, rain streaks), so a drive's geometry
    is fixed by its world while every frame still gets fresh noise.
    """
    rules = rules or BoxRules()
    cam = world.camera
    p = Painter(cam, world.env.shading)
    draw_street(p, world.road, world.buildings, world.trees, world.env, world.ego_s(t))
    placed = []
    for a in world.actors:
        x, z = actor_position(a, world, t)
        if NEAR_CLIP_M + 1.0 < z < VIEW_FAR_M:
            placed.append((a, x, z))
    order = draw_actors(p, placed, t, lights_on=world.env.lights_on)
    boxes = select_boxes(p, placed, order, rules)
    image = p.image()
    image = apply_sensor_effects(image, world.env, rng) if effects else image.copy()
    return image, boxes
