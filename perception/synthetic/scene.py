"""The static street: sky, ground, road with lane markings, sidewalks, buildings and trees.

Nothing here is labelled. Everything is placed in world metres and projected with the pinhole
:class:`~perception.synthetic.camera.Camera`; the ego car's travelled distance ``ego_s`` shifts
the dashed lane markings and roadside props, which is what makes a recorded drive scroll.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.synthetic.camera import NEAR_CLIP_M, Camera
from perception.synthetic.effects import Environment
from perception.synthetic.painter import Painter

LANE_W = 3.5
SIDEWALK_W = 3.0
FAR_M = 400.0  # road drawn up to here (then it meets the horizon)
PROP_FAR_M = 160.0  # buildings / trees beyond this are not drawn
DASH_LEN, DASH_PERIOD = 3.0, 10.0


@dataclass(frozen=True)
class Road:
    """Lane geometry relative to the ego lane centre (X = 0); right-hand traffic."""

    n_same: int  # lanes in the ego direction (ego in one of them)
    n_oncoming: int
    ego_lane: int  # 0 = leftmost same-direction lane
    asphalt: tuple[int, int, int]
    ground: tuple[int, int, int]

    @property
    def center_x(self) -> float:
        """X of the line between the two directions."""
        return -(self.ego_lane + 0.5) * LANE_W

    @property
    def right_edge(self) -> float:
        return (self.n_same - self.ego_lane - 0.5) * LANE_W

    @property
    def left_edge(self) -> float:
        return self.center_x - self.n_oncoming * LANE_W

    def same_lane_x(self, j: int) -> float:
        return (j - self.ego_lane) * LANE_W

    def oncoming_lane_x(self, k: int) -> float:
        return self.center_x - (k + 0.5) * LANE_W


@dataclass(frozen=True)
class Building:
    side: int  # +1 right, -1 left
    face_x: float  # |X| of the facade facing the road
    z0: float
    z1: float
    height: float
    color: tuple[int, int, int]
    window: tuple[int, int, int]


@dataclass(frozen=True)
class Tree:
    x: float
    z: float
    trunk_h: float
    crown_r: float
    color: tuple[int, int, int]


def sample_road(rng: np.random.Generator) -> Road:
    """1-2 lanes each way (sometimes 3 in the ego direction), ego in a random own lane."""
    n_same = int(rng.choice([1, 2, 2, 3]))
    grey = int(rng.integers(70, 110))
    ground = [(60, 120, 80), (70, 110, 110), (90, 120, 130)][int(rng.integers(3))]
    return Road(n_same=n_same, n_oncoming=int(rng.choice([1, 2])), ego_lane=int(rng.integers(n_same)),
                asphalt=(grey, grey, grey + 4), ground=ground)


def sample_props(rng: np.random.Generator, road: Road, z_from: float, z_to: float
                 ) -> tuple[tuple[Building, ...], tuple[Tree, ...]]:
    """Buildings in rows along both sides and trees on the sidewalks between ``z_from`` and ``z_to``."""
    buildings: list[Building] = []
    trees: list[Tree] = []
    for side, edge in ((1, road.right_edge), (-1, -road.left_edge)):
        z = z_from - float(rng.uniform(0, 20))
        setback = float(rng.uniform(1.0, 6.0))
        while z < z_to:
            length = float(rng.uniform(10, 35))
            if rng.random() < 0.85:
                base = rng.integers(60, 200, 3)
                buildings.append(Building(
                    side=side, face_x=edge + SIDEWALK_W + setback + float(rng.uniform(0, 2)),
                    z0=z, z1=z + length, height=float(rng.uniform(6, 22)),
                    color=tuple(int(c) for c in base),
                    window=tuple(int(c) for c in rng.integers(40, 90, 3))))
            z += length + float(rng.uniform(0, 6))
        z = z_from + float(rng.uniform(0, 12))
        while z < z_to:
            if rng.random() < 0.6:
                trees.append(Tree(x=side * (edge + SIDEWALK_W - 0.6), z=z, trunk_h=float(rng.uniform(1.8, 3.0)),
                                  crown_r=float(rng.uniform(1.2, 2.4)),
                                  color=(int(rng.integers(30, 70)), int(rng.integers(90, 150)), int(rng.integers(30, 80)))))
            z += float(rng.uniform(8, 18))
    return tuple(buildings), tuple(trees)


def _sky_and_ground(p: Painter, road: Road, env: Environment) -> None:
    cam = p.camera
    hz = int(round(cam.horizon + p.pad))
    t = np.linspace(0.0, 1.0, max(hz, 1))[:, None]
    sky = (1 - t) * np.asarray(env.sky_top, np.float64) + t * np.asarray(env.sky_horizon, np.float64)
    p.canvas[:hz] = sky[:, None, :].astype(np.uint8)
    p.canvas[hz:] = np.asarray(p.shading.color(road.ground, 0.0), np.uint8)


def _ground_quad(cam: Camera, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
    return cam.project([x0, x1, x1, x0], 0.0, [z0, z0, z1, z1])


def _markings(p: Painter, road: Road, ego_s: float) -> None:
    cam = p.camera
    white, yellow = (225, 225, 225), (40, 200, 230)
    hw = 0.08
    solid = [(road.right_edge - 0.2, white), (road.left_edge + 0.2, white),
             (road.center_x - 0.12, yellow), (road.center_x + 0.12, yellow)]
    for x, col in solid:
        p.poly(_ground_quad(cam, x - hw, x + hw, NEAR_CLIP_M, FAR_M), col)
    dashed = [road.center_x + j * LANE_W for j in range(1, road.n_same)]
    dashed += [road.center_x - k * LANE_W for k in range(1, road.n_oncoming)]
    phase = ego_s % DASH_PERIOD
    quads = []
    for x in dashed:
        for k in range(int(120 / DASH_PERIOD) + 2):
            z0 = k * DASH_PERIOD - phase
            z1 = z0 + DASH_LEN
            if z1 <= NEAR_CLIP_M:
                continue
            quads.append(_ground_quad(cam, x - hw, x + hw, max(z0, NEAR_CLIP_M), z1))
    p.polys(quads, white)


def _road(p: Painter, road: Road, ego_s: float) -> None:
    cam = p.camera
    sw = (150, 150, 155)
    p.poly(_ground_quad(cam, road.right_edge, road.right_edge + SIDEWALK_W, NEAR_CLIP_M, FAR_M), sw)
    p.poly(_ground_quad(cam, road.left_edge - SIDEWALK_W, road.left_edge, NEAR_CLIP_M, FAR_M), sw)
    p.poly(_ground_quad(cam, road.left_edge, road.right_edge, NEAR_CLIP_M, FAR_M), road.asphalt)
    _markings(p, road, ego_s)


def _fog_ground(p: Painter) -> None:
    """Distance fog on the ground plane, row by row (each row below the horizon has one depth)."""
    sh = p.shading
    if sh.fog_density <= 0:
        return
    cam = p.camera
    hz = int(np.ceil(cam.horizon + p.pad))
    rows = np.arange(hz, p.canvas.shape[0]) - p.pad
    trans = np.exp(-sh.fog_density * cam.ground_depth(rows + 0.5)).astype(np.float32)[:, None, None]
    g = p.canvas[hz:].astype(np.float32)
    g = trans * g + (1 - trans) * np.asarray(sh.fog_color, np.float32)
    p.canvas[hz:] = g.astype(np.uint8)


def _building(p: Painter, b: Building, z0: float, z1: float, ego_s: float, lights_on: bool, rng_key: int) -> None:
    """Facade (and end wall) of ``b``; z0, z1 are its visible depth range relative to the camera."""
    cam = p.camera
    x = b.side * b.face_x
    p.background(z0)
    facade = cam.project([x, x, x, x], [0, 0, b.height, b.height], [z0, z1, z1, z0])
    p.poly(facade, tuple(0.85 * c for c in b.color))
    # End wall facing the camera (only when its near end is in front of us).
    if b.z0 - ego_s >= NEAR_CLIP_M:
        x_far = x + b.side * 12.0
        end = cam.project([x, x_far, x_far, x], [0, 0, b.height, b.height], z0)
        p.poly(end, b.color)
    # Window grid on the facade, skipped when windows would be under ~2 px tall.
    if cam.scale(z0) * 1.4 < 2.0:
        return
    floors = np.arange(1.2, b.height - 1.5, 3.2)
    cols = np.arange(b.z0 + 1.0, b.z1 - 1.5, 2.6) - ego_s  # windows are fixed to the building
    col_idx = np.arange(cols.size)
    keep = (cols >= z0) & (cols + 1.3 <= z1) & (cols < PROP_FAR_M)
    cols, col_idx = cols[keep], col_idx[keep]
    if floors.size == 0 or cols.size == 0:
        return
    fy, fz = np.meshgrid(floors, cols, indexing="ij")
    fi, ci = np.meshgrid(np.arange(floors.size), col_idx, indexing="ij")
    fy, fz = fy.ravel(), fz.ravel()
    ys = np.stack([fy, fy, fy + 1.5, fy + 1.5], 1)
    zs = np.stack([fz, fz + 1.3, fz + 1.3, fz], 1)
    quads = cam.project(np.full_like(ys, x), ys, zs)
    if lights_on:
        # Which windows are lit is a property of the window (floor, column), so it never flickers.
        lit = ((fi.ravel() * 7 + ci.ravel() * 3 + rng_key) % 5) < 2
        p.polys(list(quads[lit]), (90, 200, 240), emissive=True)
        p.polys(list(quads[~lit]), b.window)
    else:
        p.polys(list(quads), b.window)


def _tree(p: Painter, t: Tree, z: float) -> None:
    cam = p.camera
    p.background(z)
    s = cam.scale(z)
    base = cam.project(t.x, 0.0, z)
    top = cam.project(t.x, t.trunk_h, z)
    p.rect(base[0] - 0.12 * s, top[1], base[0] + 0.12 * s, base[1], (40, 60, 90))
    cy = top[1] - 0.7 * t.crown_r * s
    p.circle(base[0], cy, t.crown_r * s, t.color)
    p.circle(base[0] - 0.5 * t.crown_r * s, cy + 0.3 * t.crown_r * s, 0.7 * t.crown_r * s,
             tuple(0.8 * c for c in t.color))


def draw_street(p: Painter, road: Road, buildings: tuple[Building, ...], trees: tuple[Tree, ...],
                env: Environment, ego_s: float) -> None:
    """Paint everything unlabelled, far to near, for the ego car at road position ``ego_s``."""
    # The ground layer is shaded without fog here; _fog_ground then fogs it row by row.
    p.background(0.0)
    _sky_and_ground(p, road, env)
    _road(p, road, ego_s)
    _fog_ground(p)
    items: list[tuple[float, int, object]] = []
    for i, b in enumerate(buildings):
        z0, z1 = b.z0 - ego_s, b.z1 - ego_s
        if z1 > NEAR_CLIP_M and z0 < PROP_FAR_M:
            items.append((max(z0, NEAR_CLIP_M), i, b))
    for i, t in enumerate(trees):
        z = t.z - ego_s
        if NEAR_CLIP_M + 1.0 < z < PROP_FAR_M:
            items.append((z, len(buildings) + i, t))
    for z, key, item in sorted(items, key=lambda it: (-it[0], it[1])):
        if isinstance(item, Building):
            _building(p, item, z, min(item.z1 - ego_s, PROP_FAR_M), ego_s, env.lights_on, key)
        else:
            _tree(p, item, z)
