"""Sampling a street and the traffic on it: one :class:`World` serves a still image or a drive.

A world is a road, its roadside props and a set of :class:`~perception.synthetic.objects.Actor`
tracks (constant velocity along the road). A still image is the world at t = 0; a recorded drive
samples actors over the stretch of road the ego car and the traffic will cover during the drive,
so objects enter from the distance, are overtaken and leave the view naturally.

The distance distribution is biased on purpose (see ``_DEPTH``): near enough that every object is
at least ~10 px at 640×384, far enough that about a third of the boxes are "small" (< 32² px) at a
320×320 detector input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.synthetic.camera import Camera
from perception.synthetic.effects import Environment, sample_environment
from perception.synthetic.objects import DIMENSIONS, Actor
from perception.synthetic.scene import SIDEWALK_W, Building, Road, Tree, sample_props, sample_road

# Depth window (m) in which each class is placed at t = 0 for a still image.
_DEPTH: dict[str, tuple[float, float]] = {
    "vehicle": (4.0, 45.0),
    "pedestrian": (4.0, 13.0),
    "cyclist": (4.0, 22.0),
    "traffic_light": (7.0, 15.0),
    "traffic_sign": (4.0, 14.0),
}
# Still images thin out vehicles beyond this depth (keep probability exp(-(z - Z)/scale)), so that
# distant traffic does not dominate the box count; drives keep every vehicle.
_THIN_FROM_M, _THIN_SCALE_M = 16.0, 10.0
VIEW_FAR_M = 60.0  # actors beyond this are not drawn (they would be < ~10 px)

_CAR_COLORS: tuple[tuple[int, int, int], ...] = (
    (40, 40, 200), (180, 90, 30), (230, 230, 230), (170, 170, 170), (30, 30, 30), (40, 190, 230),
    (60, 120, 40), (120, 40, 90), (200, 160, 120))
_TRUCK_BOX = ((235, 235, 235), (200, 205, 210), (30, 120, 230), (150, 90, 40))
_BUS = ((20, 190, 240), (40, 40, 200), (190, 120, 40))


@dataclass(frozen=True)
class World:
    """Everything needed to render any frame of a scene."""

    camera: Camera
    env: Environment
    road: Road
    buildings: tuple[Building, ...]
    trees: tuple[Tree, ...]
    actors: tuple[Actor, ...]
    ego_speed: float  # m/s

    def ego_s(self, t: float) -> float:
        """Distance travelled by the ego car at time ``t``."""
        return self.ego_speed * t


def _c(rng: np.random.Generator, palette) -> tuple[int, int, int]:
    return tuple(int(v) for v in palette[int(rng.integers(len(palette)))])


def _jitter(rng: np.random.Generator, base: float, rel: float = 0.06) -> float:
    return float(base * rng.uniform(1 - rel, 1 + rel))


def _span(lo: float, hi: float, v_rel: float, duration: float) -> tuple[float, float]:
    """Road stretch (relative to the ego start) from which an actor can enter [lo, hi] during the drive."""
    return lo - max(0.0, v_rel) * duration, hi - min(0.0, v_rel) * duration


def _vehicles(rng, road: Road, ego_v: float, duration: float, next_id) -> list[Actor]:
    out: list[Actor] = []
    lanes = [(road.same_lane_x(j), "rear", j == road.ego_lane) for j in range(road.n_same)]
    lanes += [(road.oncoming_lane_x(k), "front", False) for k in range(road.n_oncoming)]
    lo, hi = _DEPTH["vehicle"]
    for x_lane, facing, is_ego in lanes:
        if facing == "front":
            v = -float(rng.uniform(7, 15))
        else:
            v = ego_v + float(rng.uniform(0.0, 3.0) if is_ego else rng.uniform(-4.0, 4.0))
        z_from, z_to = _span(lo + (4.0 if is_ego else 0.0), hi, v - ego_v, duration)
        z = z_from + float(rng.uniform(0, 15))
        while z < z_to:
            cls = str(rng.choice(["car", "truck", "bus"], p=[0.5, 0.27, 0.23]))
            w, h, length = DIMENSIONS[cls]
            if cls == "car":
                color = color2 = _c(rng, _CAR_COLORS)
            elif cls == "truck":
                color, color2 = _c(rng, _CAR_COLORS), _c(rng, _TRUCK_BOX)
            else:
                color = color2 = _c(rng, _BUS)
            length = _jitter(rng, length)
            keep = duration > 0 or z < _THIN_FROM_M or rng.random() < np.exp(-(z - _THIN_FROM_M) / _THIN_SCALE_M)
            if keep:
                out.append(Actor(track_id=next_id(), cls=cls, x=x_lane + float(rng.uniform(-0.3, 0.3)), z=z, vz=v,
                                 width=_jitter(rng, w), height=_jitter(rng, h), length=length,
                                 color=color, color2=color2, facing=facing))
            z += length + 4.0 + float(rng.exponential(16.0))
    return out


def _people(rng, road: Road, ego_v: float, duration: float, density: float, next_id) -> list[Actor]:
    """Pedestrians on both sidewalks and cyclists at the road edges."""
    out: list[Actor] = []
    for cls in ("pedestrian", "cyclist"):
        lo, hi = _DEPTH[cls]
        n_mean = density * (1.0 if cls == "pedestrian" else 0.65)
        for side, edge in ((1, road.right_edge), (-1, road.left_edge)):
            for _ in range(int(rng.poisson(n_mean * (1.0 + ego_v * duration / (hi - lo))))):
                if cls == "pedestrian":
                    v = float(rng.choice([0.0, 1.3, -1.3])) * float(rng.uniform(0.7, 1.2))
                    x = edge + side * float(rng.uniform(0.4, SIDEWALK_W - 0.4))
                    facing = "side" if v and rng.random() < 0.6 else "front"
                    color2 = _c(rng, ((60, 40, 30), (110, 70, 40), (40, 40, 40), (150, 150, 160)))
                else:
                    v = side * float(rng.uniform(3.5, 6.5))
                    x = edge - side * 0.9
                    facing = "side"
                    color2 = _c(rng, ((30, 30, 200), (200, 120, 0), (20, 20, 20), (0, 180, 220)))
                z_from, z_to = _span(lo, hi, v - ego_v, duration)
                w, h, _ = DIMENSIONS[cls]
                out.append(Actor(track_id=next_id(), cls=cls, x=x, z=float(rng.uniform(z_from, z_to)), vz=v,
                                 width=w, height=_jitter(rng, h, 0.08), length=0.5,
                                 color=_c(rng, _CAR_COLORS), color2=color2, facing=facing,
                                 variant=int(rng.integers(8)), phase=float(rng.uniform(0, 2 * np.pi))))
    return out


def _street_furniture(rng, road: Road, ego_v: float, duration: float, density: float, next_id) -> list[Actor]:
    """Traffic lights (on an overhead arm or a roadside post) and signs at the road edges."""
    out: list[Actor] = []
    for cls, n_mean in (("traffic_light", 0.7), ("traffic_sign", 0.85)):
        lo, hi = _DEPTH[cls]
        z_from, z_to = _span(lo, hi, -ego_v, duration)
        for _ in range(int(rng.poisson(density * n_mean * (z_to - z_from) / (hi - lo)))):
            side = 1 if rng.random() < 0.7 else -1
            edge = road.right_edge if side > 0 else road.left_edge
            pole_x = edge + side * 0.5
            w, h, _ = DIMENSIONS[cls]
            if cls == "traffic_light":
                overhead = rng.random() < 0.5
                x = pole_x - side * float(rng.uniform(2.5, 5.0)) if overhead else pole_x
                mount = float(rng.uniform(4.2, 5.0)) if overhead else float(rng.uniform(2.2, 2.8))
            else:
                x, mount = pole_x, float(rng.uniform(1.9, 2.5))
            out.append(Actor(track_id=next_id(), cls=cls, x=x, z=float(rng.uniform(z_from, z_to)), vz=0.0,
                             width=w, height=h, length=0.3, color=(0, 0, 0), color2=(0, 0, 0),
                             facing="front", variant=int(rng.integers(15)), mount=mount, pole_x=pole_x))
    return out


def sample_world(rng: np.random.Generator, camera: Camera, *, duration: float = 0.0,
                 env: Environment | None = None) -> World:
    """A random street with traffic covering ``duration`` seconds of driving (0 for a still image)."""
    if duration < 0:
        raise ValueError(f"duration must be >= 0 seconds, got {duration}")
    env = env if env is not None else sample_environment(rng)
    road = sample_road(rng)
    ego_v = float(rng.uniform(8.0, 14.0)) if duration > 0 else float(rng.uniform(0.0, 14.0))
    counter = iter(range(1, 1 << 30))

    def next_id() -> int:
        return next(counter)

    density = float(rng.uniform(0.6, 1.4))
    actors = _vehicles(rng, road, ego_v, duration, next_id)
    actors += _people(rng, road, ego_v, duration, density, next_id)
    actors += _street_furniture(rng, road, ego_v, duration, density, next_id)
    buildings, trees = sample_props(rng, road, -10.0, ego_v * duration + 200.0)
    return World(camera=camera, env=env, road=road, buildings=buildings, trees=trees,
                 actors=tuple(actors), ego_speed=ego_v)
