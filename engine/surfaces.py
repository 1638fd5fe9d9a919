"""Procedural metal surfaces: seeded random fields (fast Gaussian noise, smooth and directional textures) and the
five kinds of surface the generator draws on (engine/synth.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import cv2
import numpy as np

SURFACES = ("brushed", "rolled", "ground", "cast", "polished")


@lru_cache(maxsize=1)
def _normal_table() -> np.ndarray:
    """N(0, 1) quantiles at 4096 evenly spaced probabilities, tiled 16x so any uint16 indexes it."""
    inverse = NormalDist().inv_cdf
    return np.tile(np.array([inverse((i + 0.5) / 4096) for i in range(4096)], dtype=np.float32), 16)


def gauss(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise: random bytes through an inverse-CDF table, ~5x faster than
    rng.standard_normal (noise for textures does not need more than 4096 levels)."""
    indices = np.frombuffer(rng.bytes(2 * math.prod(shape)), dtype="<u2").reshape(shape)
    return np.take(_normal_table(), indices)


_LIGHT_GRID = 17


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x varies along columns), cached per size."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _normalise(field_: np.ndarray) -> np.ndarray:
    """Shift and scale a float32 field in place to zero mean and unit standard deviation."""
    mean, std = cv2.meanStdDev(field_)
    field_ -= np.float32(mean[0, 0])
    if std[0, 0] > 1e-6:
        field_ *= np.float32(1.0 / std[0, 0])
    return field_


def lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth isotropic noise: a cells x cells Gaussian grid upsampled with cubic interpolation."""
    cells = max(2, min(cells, size))
    field_ = cv2.resize(gauss(rng, (cells, cells)), (min(size, 64),) * 2, interpolation=cv2.INTER_CUBIC)
    # Cubic up to 64 px keeps it smooth; the remaining (cheap) linear step adds no visible artefacts.
    return cv2.resize(field_, (size, size), interpolation=cv2.INTER_LINEAR) if size > 64 else field_


def _fine(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Fine isotropic grain: white noise blurred by sigma, unit std."""
    noise = gauss(rng, (size, size))
    if sigma > 0.3:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return _normalise(noise)


def _directional(
    rng: np.random.Generator, size: int, angle: float, stretch: float, band: float = 0.0, band_period: float = 0.0
) -> np.ndarray:
    """Anisotropic streaks along `angle` (degrees, counter-clockwise), `stretch` times longer than wide.

    Noise is drawn on a coarse grid (1 px across the grain, `stretch` px along it) and one affine warp
    stretches and rotates it into place; `band` adds a brightness profile across the grain (banding).
    """
    span = int(math.ceil(size * 1.415)) + 4  # covers the image diagonal at any angle
    stretch = max(float(stretch), 1.0)
    cols = int(math.ceil(span / stretch)) + 3
    small = gauss(rng, (span, cols))
    if band > 0:
        knots = max(2, span // int(rng.integers(6, 24)))
        profile = cv2.resize(gauss(rng, (knots, 1)), (1, span), interpolation=cv2.INTER_CUBIC)[:, 0]
        if band_period > 0:  # rolls also leave periodic marks
            rows = np.arange(span, dtype=np.float32)
            profile = profile + 0.8 * np.sin(rows * np.float32(2 * np.pi / band_period) + rng.uniform(0, 2 * np.pi))
        small += (band / max(float(profile.std()), 1e-6)) * profile[:, None].astype(np.float32)
    # Map each output pixel to (along, across) grain coordinates in `small` (inverse map).
    rad = math.radians(angle)
    along = (math.cos(rad), -math.sin(rad))  # image y points down
    across = (math.sin(rad), math.cos(rad))
    c = (size - 1) / 2.0
    matrix = np.array(
        [
            [along[0] / stretch, along[1] / stretch, (cols - 1) / 2.0 - (along[0] + along[1]) * c / stretch],
            [across[0], across[1], (span - 1) / 2.0 - (across[0] + across[1]) * c],
        ],
        dtype=np.float64,
    )
    streaks = cv2.warpAffine(small, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
    return _normalise(streaks)


@dataclass
class Surface:
    """A rendered background with the facts the defects need."""

    image: np.ndarray  # float32 HxW, roughly in [0, 1]
    grain_angle: float  # degrees; the rolling / brushing direction (random for isotropic surfaces)
    texture_std: float  # amplitude of the texture, the "noise" a defect must stand out from
    kind: str


def random_surface(rng: np.random.Generator, size: int) -> Surface:
    """Render one background: a random surface finish, lighting gradient and vignetting."""
    kind = SURFACES[int(rng.integers(len(SURFACES)))]
    angle = float(rng.uniform(0.0, 180.0))
    if kind == "brushed":
        texture = (
            _directional(rng, size, angle, rng.uniform(10, 40))
            + rng.uniform(0.3, 0.8) * _directional(rng, size, angle + rng.normal(0, 2), rng.uniform(3, 8))
            + rng.uniform(0.1, 0.5) * lowfreq(rng, size, int(rng.integers(3, 8)))
        )
        amp = rng.uniform(0.03, 0.10)
    elif kind == "rolled":
        angle = float(rng.choice([0.0, 90.0]) + rng.normal(0.0, 3.0))
        texture = _directional(rng, size, angle, rng.uniform(60, 160), band=rng.uniform(0.3, 1.2),
                               band_period=rng.uniform(size / 12, size / 3) if rng.random() < 0.5 else 0.0)
        texture += rng.uniform(0.2, 0.5) * _fine(rng, size, rng.uniform(0.5, 1.0))
        amp = rng.uniform(0.02, 0.08)
    elif kind == "ground":
        texture = (
            lowfreq(rng, size, int(rng.integers(3, 6)))
            + rng.uniform(0.4, 0.9) * lowfreq(rng, size, max(4, size // int(rng.integers(12, 24))))
            + rng.uniform(0.6, 1.2) * _fine(rng, size, rng.uniform(0.5, 1.2))
            + rng.uniform(0.2, 0.6) * _directional(rng, size, angle, rng.uniform(6, 20))
        )
        amp = rng.uniform(0.025, 0.08)
    elif kind == "cast":
        granules = _fine(rng, size, rng.uniform(1.0, 2.2))
        texture = (
            lowfreq(rng, size, int(rng.integers(4, 10)))
            + rng.uniform(0.5, 1.0) * lowfreq(rng, size, max(4, size // int(rng.integers(8, 16))))
            + rng.uniform(0.6, 1.2) * (np.abs(granules) - 0.8)  # abs() gives the sandy, pitted look
            + rng.uniform(0.2, 0.5) * _fine(rng, size, 0.0)
        )
        amp = rng.uniform(0.03, 0.10)
    else:  # polished
        texture = lowfreq(rng, size, int(rng.integers(2, 5))) + 0.15 * _fine(rng, size, rng.uniform(0.5, 1.5))
        amp = rng.uniform(0.005, 0.025)
    texture = _normalise(texture.astype(np.float32, copy=False))

    # Lighting is smooth: evaluate it on a coarse grid and upsample (much cheaper than at full size).
    x, y = _grid(_LIGHT_GRID)
    brightness = rng.uniform(0.3, 0.7)
    gx, gy = rng.normal(0.0, 0.06, 2)
    vignette = rng.uniform(0.0, 0.35)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    offset = np.float32(brightness) + np.float32(gx) * x + np.float32(gy) * y
    falloff = 1.0 - np.float32(vignette * 0.5) * ((x - np.float32(cx)) ** 2 + (y - np.float32(cy)) ** 2)
    image = texture * np.float32(amp)
    image += cv2.resize(offset, (size, size), interpolation=cv2.INTER_LINEAR)
    image *= cv2.resize(falloff, (size, size), interpolation=cv2.INTER_LINEAR)
    return Surface(image=image, grain_angle=angle, texture_std=float(amp), kind=kind)
