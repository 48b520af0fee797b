"""Lighting, weather and sensor effects: what makes two renders of one layout look different.

An :class:`Environment` is fixed per image (or per recorded drive). Ambient light and fog act on
colours while drawing (:class:`~perception.synthetic.painter.Shading`: fog follows Koschmieder's
law, transmission = exp(−σ·Z)); rain streaks, motion blur, exposure and sensor noise act on the
finished image in :func:`apply_sensor_effects`. None of them moves a box: boxes come from the
geometry, the effects only make the pixels harder to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception.synthetic.painter import Shading

TIMES_OF_DAY = ("day", "dusk", "night")
WEATHERS = ("clear", "rain", "fog")

# BGR sky colours at the top and at the horizon, and the ambient light level, per time of day.
_SKY = {
    "day": ((215, 160, 90), (235, 215, 190), 1.0),
    "dusk": ((120, 70, 60), (110, 150, 235), 0.72),
    "night": ((40, 20, 12), (70, 50, 40), 0.42),
}


@dataclass(frozen=True)
class Environment:
    """Per-image (or per-drive) appearance settings."""

    time_of_day: str = "day"
    weather: str = "clear"
    sky_top: tuple[int, int, int] = _SKY["day"][0]
    sky_horizon: tuple[int, int, int] = _SKY["day"][1]
    ambient: float = 1.0
    fog_density: float = 0.0
    fog_color: tuple[int, int, int] = (200, 200, 200)
    exposure: float = 1.0
    noise_sigma: float = 2.0  # Gaussian luminance noise (grey levels); 0 = none
    blur_px: int = 0  # horizontal motion-blur kernel length; 0 or 1 = none
    rain: float = 0.0  # streak density, 0..1

    @property
    def shading(self) -> Shading:
        return Shading(ambient=self.ambient, fog_color=tuple(float(c) for c in self.fog_color),
                       fog_density=self.fog_density)

    @property
    def lights_on(self) -> bool:
        """Head/tail lights and lit windows glow at dusk and night."""
        return self.time_of_day != "day"


def sample_environment(rng: np.random.Generator) -> Environment:
    """Draw time of day (60% day, 25% dusk, 15% night) and weather (65% clear, 20% rain, 15% fog)."""
    tod = TIMES_OF_DAY[int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
    weather = WEATHERS[int(rng.choice(3, p=[0.65, 0.2, 0.15]))]
    top, horizon, ambient = _SKY[tod]
    ambient *= float(rng.uniform(0.9, 1.1))
    fog_density, rain = 0.0, 0.0
    fog_color = tuple(int(0.5 * a * ambient + 0.5 * b * ambient) for a, b in zip(horizon, (170, 170, 170), strict=True))
    exposure = float(rng.uniform(0.8, 1.25))
    if weather == "fog":
        fog_density = float(rng.uniform(0.012, 0.035))  # visibility (5% contrast) ≈ 85-250 m
        top = horizon = fog_color
        exposure = min(exposure, 1.0)  # fog is already bright: do not wash it out
    elif weather == "rain":
        rain = float(rng.uniform(0.3, 1.0))
        fog_density = float(rng.uniform(0.003, 0.008))
        ambient *= 0.85
        top = tuple(int(0.4 * c + 0.6 * 150) for c in top)
        horizon = tuple(int(0.5 * c + 0.5 * 170) for c in horizon)
    return Environment(
        time_of_day=tod, weather=weather, sky_top=tuple(top), sky_horizon=tuple(horizon),
        ambient=ambient, fog_density=fog_density, fog_color=fog_color,
        exposure=exposure,
        # Noise on 40% of frames only: noisy pixels do not compress, and PNG size/time matters.
        noise_sigma=float(rng.uniform(1.5, 6.0)) * (1.5 if tod == "night" else 1.0) if rng.random() < 0.4 else 0.0,
        blur_px=int(rng.choice([0, 0, 0, 3, 5, 7])), rain=rain,
    )


def _rain(img: np.ndarray, density: float, rng: np.random.Generator) -> None:
    """Slanted bright streaks drawn in place (they hide nothing: boxes stay as drawn)."""
    import cv2

    h, w = img.shape[:2]
    n = int(density * w * h / 900)
    if n == 0:
        return
    x = rng.uniform(0, w, n)
    y = rng.uniform(0, h, n)
    length = rng.uniform(6, 18, n)
    slant = rng.uniform(0.1, 0.3)
    layer = np.zeros_like(img)
    pts = np.stack([x, y, x + slant * length, y + length], axis=1).astype(np.int32)
    for x0, y0, x1, y1 in pts:
        cv2.line(layer, (int(x0), int(y0)), (int(x1), int(y1)), (200, 200, 200), 1)
    cv2.addWeighted(img, 1.0, layer, 0.35, 0.0, dst=img)


def apply_sensor_effects(img: np.ndarray, env: Environment, rng: np.random.Generator) -> np.ndarray:
    """Rain, motion blur, exposure and Gaussian sensor noise on a finished BGR uint8 image."""
    import cv2

    out = np.ascontiguousarray(img)
    if env.rain > 0:
        _rain(out, env.rain, rng)
    if env.blur_px > 1:
        k = np.zeros((1, env.blur_px), np.float32)
        k[:] = 1.0 / env.blur_px
        out = cv2.filter2D(out, -1, k)
    if env.noise_sigma <= 0:
        return cv2.convertScaleAbs(out, alpha=env.exposure)  # saturating exposure gain
    # Luminance noise (one draw per pixel, shared by the three channels), as after demosaicing.
    noise = rng.standard_normal(out.shape[:2] + (1,), dtype=np.float32) * np.float32(env.noise_sigma)
    f = out.astype(np.float32)
    f *= np.float32(env.exposure)
    f += noise
    np.clip(f, 0, 255, out=f)
    return f.astype(np.uint8)
