"""The seven labelled classes, each drawn from recognisable parts at its true projected size.

Vehicles are boxes in 3-D: the face towards the camera (rear of a car ahead, front of an
oncoming one) plus the side face the camera can see, with wheels, windows and lights. People and
cyclists are upright billboards (head, torso, arms, legs; a cyclist is in side view on two wheels).
Traffic lights and signs stand on poles; only the housing / plate is the labelled object, the
pole is drawn as an unlabelled occluder. Each class keeps one consistent silhouette and colour
signature so a small detector can learn it from a few thousand frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.synthetic.camera import Camera
from perception.synthetic.painter import Painter

Color = tuple[int, int, int]

GLASS: Color = (70, 55, 45)
TYRE: Color = (25, 25, 25)
SKIN: tuple[Color, ...] = ((150, 180, 225), (110, 145, 195), (70, 95, 140), (60, 75, 105))

# Class dimensions in metres: (width, height, length); people/cyclists/lights/signs use width, height.
DIMENSIONS: dict[str, tuple[float, float, float]] = {
    "car": (1.8, 1.5, 4.5),
    "truck": (2.5, 3.6, 8.5),
    "bus": (2.55, 3.1, 11.5),
    "pedestrian": (0.6, 1.75, 0.4),
    "cyclist": (1.75, 1.75, 0.5),
    # Housing with its back plate, and plate sizes of large urban signs: drawn a little larger
    # than the median real one so that they stay learnable at 320x320.
    "traffic_light": (0.6, 1.5, 0.3),
    "traffic_sign": (1.0, 1.0, 0.1),
}


@dataclass(frozen=True)
class Actor:
    """One labelled object and its straight-line motion along the road.

    World position at time t: ``x + vx·t``, ``z + vz·t`` (z along the road, metres). ``facing``
    is "rear" (moving away from the camera), "front" (towards it) or "side"; ``mount`` is the
    height of a light housing / sign plate above the road and ``pole_x`` where its pole stands.
    """

    track_id: int
    cls: str
    x: float
    z: float
    vz: float
    width: float
    height: float
    length: float
    color: Color
    color2: Color
    facing: str = "rear"
    variant: int = 0
    mount: float = 0.0
    pole_x: float = 0.0
    phase: float = 0.0
    vx: float = 0.0


def _face(cam: Camera, z: float, x0: float, x1: float, y0: float, y1: float) -> tuple[float, float, float, float]:
    """Image rectangle (u0, v0, u1, v1) of a world rectangle on the plane Z = z facing the camera."""
    (u0, v1), (u1, v0) = cam.project([x0, x1], [y0, y1], z)
    return u0, v0, u1, v1


def _side(cam: Camera, x: float, z0: float, z1: float, y0: float, y1: float) -> np.ndarray:
    """Image quad of a world rectangle on the plane X = x (a vehicle's flank)."""
    return cam.project(x, [y0, y0, y1, y1], [z0, z1, z1, z0])


def _side_wheel(cam: Camera, x: float, zc: float, r: float) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return cam.project(x, r + r * np.sin(a), zc + r * np.cos(a))


def _dim(c: Color, f: float) -> Color:
    return tuple(int(min(255, v * f)) for v in c)


def _vehicle_side(p: Painter, a: Actor, x: float, z: float) -> None:
    """The flank the camera sees (if any): body, windows and wheels."""
    cam = p.camera
    w, h, L = a.width, a.height, a.length
    if x - w / 2 > 0.3:
        xs = x - w / 2
    elif x + w / 2 < -0.3:
        xs = x + w / 2
    else:
        return
    body = _dim(a.color, 0.75)
    zf = z + L
    if a.cls == "car":
        p.poly(_side(cam, xs, z, zf, 0.3, 0.95), body)
        p.poly(_side(cam, xs, z + 0.9, zf - 1.3, 0.95, h), body)
        p.poly(_side(cam, xs, z + 1.0, zf - 1.4, 1.0, h - 0.08), GLASS)
        wheels = (z + 0.85, zf - 0.9)
        r = 0.33
    elif a.cls == "truck":
        cab0, cab1 = (zf - 2.3, zf) if a.facing == "rear" else (z, z + 2.3)
        box0, box1 = (z, zf - 2.4) if a.facing == "rear" else (z + 2.4, zf)
        p.poly(_side(cam, xs, box0, box1, 0.9, h), _dim(a.color2, 0.8))
        p.poly(_side(cam, xs, cab0, cab1, 0.45, 2.8), body)
        p.poly(_side(cam, xs, cab0 + 0.3, cab1 - 0.3, 1.8, 2.6), GLASS)
        wheels = (z + 1.0, z + 2.3, zf - 1.2)
        r = 0.5
    else:  # bus
        p.poly(_side(cam, xs, z, zf, 0.3, h), body)
        edges = np.arange(z + 0.6, zf - 1.0, 1.5)
        p.polys([_side(cam, xs, e, e + 1.25, 1.3, h - 0.55) for e in edges], GLASS)
        wheels = (z + 2.2, zf - 2.6)
        r = 0.5
    p.polys([_side_wheel(cam, xs, zc, r) for zc in wheels], TYRE)


def _car_face(p: Painter, a: Actor, x: float, z: float, lights_on: bool) -> None:
    cam = p.camera
    w, h = a.width, a.height
    L, R = x - w / 2, x + w / 2
    p.rect(*_face(cam, z, L + 0.05, L + 0.4, 0.0, 0.4), TYRE)
    p.rect(*_face(cam, z, R - 0.4, R - 0.05, 0.0, 0.4), TYRE)
    p.rect(*_face(cam, z, L, R, 0.28, 0.95), a.color)
    cab = cam.project([L + 0.1, R - 0.1, R - 0.32, L + 0.32], [0.95, 0.95, h, h], z)
    p.poly(cab, a.color)
    win_top = h - 0.08
    if a.facing == "rear":
        glass = cam.project([L + 0.25, R - 0.25, R - 0.4, L + 0.4], [1.0, 1.0, win_top, win_top], z)
        p.poly(glass, GLASS)
        lamp: Color = (40, 40, 255) if lights_on else (40, 40, 190)
        p.rect(*_face(cam, z, L + 0.05, L + 0.38, 0.68, 0.86), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, R - 0.38, R - 0.05, 0.68, 0.86), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, x - 0.26, x + 0.26, 0.45, 0.58), (235, 235, 235))
    else:
        glass = cam.project([L + 0.18, R - 0.18, R - 0.36, L + 0.36], [0.98, 0.98, win_top, win_top], z)
        p.poly(glass, GLASS)
        lamp = (200, 255, 255) if lights_on else (200, 220, 220)
        p.rect(*_face(cam, z, L + 0.08, L + 0.45, 0.62, 0.78), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, R - 0.45, R - 0.08, 0.62, 0.78), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, x - 0.4, x + 0.4, 0.35, 0.55), (40, 40, 40))
    p.rect(*_face(cam, z, L, R, 0.28, 0.4), _dim(a.color, 0.55))


def _truck_face(p: Painter, a: Actor, x: float, z: float, lights_on: bool) -> None:
    cam = p.camera
    w, h = a.width, a.height
    L, R = x - w / 2, x + w / 2
    p.rect(*_face(cam, z, L + 0.1, L + 0.6, 0.0, 0.55), TYRE)
    p.rect(*_face(cam, z, R - 0.6, R - 0.1, 0.0, 0.55), TYRE)
    if a.facing == "rear":
        p.rect(*_face(cam, z, L + 0.2, R - 0.2, 0.4, 0.9), (45, 45, 45))
        p.rect(*_face(cam, z, L, R, 0.9, h), a.color2)
        p.line(cam.project(x, 1.0, z), cam.project(x, h - 0.1, z), _dim(a.color2, 0.5),
               thickness=max(1.0, 0.05 * cam.scale(z)))
        lamp: Color = (40, 40, 255) if lights_on else (40, 40, 190)
        p.rect(*_face(cam, z, L + 0.1, L + 0.4, 0.55, 0.8), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, R - 0.4, R - 0.1, 0.55, 0.8), lamp, emissive=lights_on)
    else:
        # Cargo box behind (and above) the cab, then the cab front.
        p.rect(*_face(cam, z + 2.4, L, R, 2.6, h), a.color2)
        p.rect(*_face(cam, z, L + 0.05, R - 0.05, 0.45, 2.8), a.color)
        p.rect(*_face(cam, z, L + 0.2, R - 0.2, 1.65, 2.6), GLASS)
        p.rect(*_face(cam, z, x - 0.7, x + 0.7, 0.6, 1.3), (50, 50, 50))
        lamp = (200, 255, 255) if lights_on else (200, 220, 220)
        p.rect(*_face(cam, z, L + 0.15, L + 0.5, 0.65, 0.85), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, R - 0.5, R - 0.15, 0.65, 0.85), lamp, emissive=lights_on)


def _bus_face(p: Painter, a: Actor, x: float, z: float, lights_on: bool) -> None:
    cam = p.camera
    w, h = a.width, a.height
    L, R = x - w / 2, x + w / 2
    p.rect(*_face(cam, z, L + 0.1, L + 0.55, 0.0, 0.5), TYRE)
    p.rect(*_face(cam, z, R - 0.55, R - 0.1, 0.0, 0.5), TYRE)
    p.rect(*_face(cam, z, L, R, 0.3, h), a.color)
    p.rect(*_face(cam, z, L, R, 0.3, 0.5), _dim(a.color, 0.5))
    if a.facing == "rear":
        p.rect(*_face(cam, z, L + 0.25, R - 0.25, 1.9, h - 0.3), GLASS)
        lamp: Color = (40, 40, 255) if lights_on else (40, 40, 190)
        p.rect(*_face(cam, z, L + 0.1, L + 0.4, 0.6, 1.0), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, R - 0.4, R - 0.1, 0.6, 1.0), lamp, emissive=lights_on)
    else:
        p.rect(*_face(cam, z, L + 0.15, R - 0.15, 1.0, h - 0.5), GLASS)
        p.rect(*_face(cam, z, L + 0.3, R - 0.3, h - 0.45, h - 0.12), (0, 160, 255), emissive=True)
        lamp = (200, 255, 255) if lights_on else (200, 220, 220)
        p.rect(*_face(cam, z, L + 0.12, L + 0.5, 0.6, 0.8), lamp, emissive=lights_on)
        p.rect(*_face(cam, z, R - 0.5, R - 0.12, 0.6, 0.8), lamp, emissive=lights_on)


def _pedestrian(p: Painter, a: Actor, x: float, z: float, t: float) -> None:
    cam = p.camera
    s = cam.scale(z)
    u, v = cam.project(x, 0.0, z)
    h = a.height * s
    skin = SKIN[a.variant % len(SKIN)]
    stride = np.sin(a.phase + t * 2 * np.pi * abs(a.vz) / 1.5) if a.vz else 0.35 * np.sin(a.phase)
    legw = max(1.0, 0.14 * s)
    hip = (u, v - 0.5 * h)
    if a.facing == "side":
        for sgn in (1, -1):
            p.line(hip, (u + sgn * stride * 0.22 * s, v - 0.5 * legw), a.color2, thickness=legw)
        p.rect(u - 0.14 * s, v - 0.82 * h, u + 0.14 * s, v - 0.48 * h, a.color)
        p.line((u, v - 0.79 * h), (u - stride * 0.2 * s, v - 0.52 * h), a.color, thickness=max(1.0, 0.09 * s))
    else:
        p.rect(u - 0.17 * s, v - 0.5 * h, u - 0.03 * s, v, a.color2)
        p.rect(u + 0.03 * s, v - 0.5 * h, u + 0.17 * s, v, a.color2)
        p.rect(u - 0.21 * s, v - 0.82 * h, u + 0.21 * s, v - 0.47 * h, a.color)
        p.rect(u - 0.29 * s, v - 0.8 * h, u - 0.21 * s, v - 0.53 * h, a.color)
        p.rect(u + 0.21 * s, v - 0.8 * h, u + 0.29 * s, v - 0.53 * h, a.color)
    p.circle(u, v - 0.905 * h, 0.115 * s, skin)
    p.rect(u - 0.1 * s, v - 0.975 * h, u + 0.1 * s, v - 0.93 * h, (30, 30, 40))  # hair


def _cyclist(p: Painter, a: Actor, x: float, z: float) -> None:
    cam = p.camera
    s = cam.scale(z)
    u, v = cam.project(x, 0.0, z)
    d = 1.0 if a.variant % 2 == 0 else -1.0  # heading left or right in the image

    def pt(px: float, py: float) -> tuple[float, float]:
        return u + d * px * s, v - py * s

    r = 0.34
    ring = max(1.0, 0.07 * s)
    for wx in (-0.52, 0.52):
        p.circle(*pt(wx, r), r * s - ring / 2, TYRE, thickness=int(round(ring)))
    frame = max(1.0, 0.06 * s)
    seat, bar, crank = pt(-0.15, 0.9), pt(0.38, 1.0), pt(0.0, 0.32)
    for a0, a1 in ((pt(-0.52, r), seat), (seat, crank), (crank, pt(-0.52, r)), (crank, bar),
                   (bar, pt(0.52, r)), (seat, bar)):
        p.line(a0, a1, a.color2, thickness=frame)
    shoulder = pt(0.2, 1.45)
    p.line(seat, pt(0.12, 0.62), (60, 50, 40), thickness=max(1.0, 0.13 * s))
    p.line(pt(0.12, 0.62), crank, (60, 50, 40), thickness=max(1.0, 0.11 * s))
    p.line(seat, shoulder, a.color, thickness=max(1.0, 0.3 * s))
    p.line(shoulder, bar, a.color, thickness=max(1.0, 0.08 * s))
    hx, hy = pt(0.3, 1.62)
    p.circle(hx, hy, 0.12 * s, SKIN[a.variant % len(SKIN)])
    p.rect(hx - 0.14 * s, hy - 0.15 * s, hx + 0.12 * s, hy - 0.05 * s, a.color2)  # helmet


def _pole(p: Painter, cam: Camera, x: float, z: float, top: float, arm_to: float | None) -> None:
    """Unlabelled pole (and overhead arm): it hides what is behind it but is not an object."""
    k, d = p._id, p._depth
    p.background(z)
    s = cam.scale(z)
    p.line(cam.project(x, 0.0, z), cam.project(x, top, z), (70, 70, 75), thickness=max(1.0, 0.12 * s))
    if arm_to is not None:
        p.line(cam.project(x, top, z), cam.project(arm_to, top, z), (70, 70, 75), thickness=max(1.0, 0.1 * s))
    p._id, p._depth = k, d


def _traffic_light(p: Painter, a: Actor, x: float, z: float) -> None:
    cam = p.camera
    s = cam.scale(z)
    hw = a.width / 2
    u0, v0, u1, v1 = _face(cam, z, x - hw, x + hw, a.mount, a.mount + a.height)
    p.rect(u0, v0, u1, v1, (25, 30, 30))
    lit = a.variant % 3  # 0 red, 1 amber, 2 green
    colors = ((40, 40, 255), (0, 190, 255), (120, 230, 40))
    for i in range(3):
        cy = v0 + (i + 0.5) * (v1 - v0) / 3
        on = i == lit
        p.circle((u0 + u1) / 2, cy, 0.14 * s, colors[i] if on else _dim(colors[i], 0.3), emissive=on)


def _traffic_sign(p: Painter, a: Actor, x: float, z: float) -> None:
    cam = p.camera
    s = cam.scale(z)
    half = a.width / 2
    cu, cv = cam.project(x, a.mount + half, z)
    r = half * s
    kind = a.variant % 5
    if kind == 0:  # speed limit: red ring, white disc, black digits
        p.circle(cu, cv, r, (30, 30, 210))
        p.circle(cu, cv, 0.72 * r, (245, 245, 245))
        p.rect(cu - 0.42 * r, cv - 0.3 * r, cu - 0.08 * r, cv + 0.3 * r, (20, 20, 20))
        p.rect(cu + 0.08 * r, cv - 0.3 * r, cu + 0.42 * r, cv + 0.3 * r, (20, 20, 20))
    elif kind == 1:  # warning triangle
        p.poly(np.array([[cu, cv - r], [cu + r, cv + 0.8 * r], [cu - r, cv + 0.8 * r]]), (30, 30, 210))
        p.poly(np.array([[cu, cv - 0.45 * r], [cu + 0.55 * r, cv + 0.5 * r], [cu - 0.55 * r, cv + 0.5 * r]]),
               (245, 245, 245))
    elif kind == 2:  # stop octagon
        ang = np.pi / 8 + np.arange(8) * np.pi / 4
        p.poly(np.stack([cu + r * np.cos(ang), cv + r * np.sin(ang)], 1), (25, 25, 200))
        p.rect(cu - 0.6 * r, cv - 0.15 * r, cu + 0.6 * r, cv + 0.15 * r, (245, 245, 245))
    elif kind == 3:  # mandatory: blue disc, white arrow
        p.circle(cu, cv, r, (170, 90, 20))
        p.poly(np.array([[cu, cv - 0.6 * r], [cu + 0.45 * r, cv], [cu - 0.45 * r, cv]]), (245, 245, 245))
        p.rect(cu - 0.15 * r, cv, cu + 0.15 * r, cv + 0.6 * r, (245, 245, 245))
    else:  # priority road: yellow diamond with white border
        p.poly(np.array([[cu, cv - r], [cu + r, cv], [cu, cv + r], [cu - r, cv]]), (240, 240, 240))
        p.poly(np.array([[cu, cv - 0.7 * r], [cu + 0.7 * r, cv], [cu, cv + 0.7 * r], [cu - 0.7 * r, cv]]),
               (0, 200, 250))


def draw_actor(p: Painter, a: Actor, x: float, z: float, t: float, *, lights_on: bool) -> None:
    """Paint actor ``a`` standing at lateral ``x`` and depth ``z`` (metres) at time ``t`` (s).

    The caller has opened the object with ``p.begin(...)``; poles are painted unlabelled.
    """
    cam = p.camera
    if a.cls in ("car", "truck", "bus"):
        _vehicle_side(p, a, x, z)
        {"car": _car_face, "truck": _truck_face, "bus": _bus_face}[a.cls](p, a, x, z, lights_on)
    elif a.cls == "pedestrian":
        _pedestrian(p, a, x, z, t)
    elif a.cls == "cyclist":
        _cyclist(p, a, x, z)
    elif a.cls == "traffic_light":
        arm = x if abs(a.pole_x - x) > 0.3 else None
        _pole(p, cam, a.pole_x, z, a.mount + a.height + (0.2 if arm is not None else -0.1), arm)
        _traffic_light(p, a, x, z)
    elif a.cls == "traffic_sign":
        _pole(p, cam, a.pole_x, z, a.mount + 0.1, None)
        _traffic_sign(p, a, x, z)
    else:
        raise ValueError(f"unknown actor class {a.cls!r}; expected one of {', '.join(DIMENSIONS)}")
