"""Seeded procedural metal-surface textures with defects and exact masks, and dataset generation."""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Iterable

import cv2
import numpy as np

from engine import config
from engine.errors import EngineError
from engine.imageio import IMAGE_EXTENSIONS, write_png
from engine.progress import Progress
from engine.storage import atomic_write_text, check_replaceable, replace_folder, staged_folder

DEFECT_TYPES = ("scratch", "crack", "pit", "dent", "inclusion", "patch")
SURFACES = ("brushed", "rolled", "ground", "cast", "polished")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("id", "split", "defect_types", "defect_fraction", "seed")
MAX_SIZE = 4096
POOL_MIN_COUNT = 64  # below this, starting worker processes costs more than it saves

Sample = tuple[np.ndarray, np.ndarray, list[str]]


def _default_weights() -> dict[str, float]:
    return {name: (3.0 if name == "scratch" else 1.0) for name in DEFECT_TYPES}


@dataclass
class SynthParams:
    """What the generator draws: image size, defect mix, difficulty and colour."""

    size: int = 256
    defect_free: float = 0.4  # share of images with no defect (many clean surfaces teach what is not a defect)
    defect_weights: dict[str, float] = field(default_factory=_default_weights)
    max_defects: int = 3  # 1..max_defects defects per defective image
    difficulty: float = 0.5  # 0 easy (high contrast, wide) .. 1 hard (thin, low contrast)
    tint: float = 0.0  # probability of a colour-tinted (BGR) image; 0 = all grayscale


def only_types(weights: dict[str, float], types: str | None) -> dict[str, float]:
    """The weights of the comma-separated defect `types` alone (all of them when None or empty); an unknown
    name is an EngineError that lists the known ones."""
    names = [name.strip() for name in (types or "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(DEFECT_TYPES))
    if unknown:
        raise EngineError(f"unknown defect type(s) {', '.join(unknown)}; choose from {', '.join(DEFECT_TYPES)}")
    return {name: weight for name, weight in weights.items() if not names or name in names}


def validate_params(params: SynthParams) -> None:
    """Raise EngineError with a one-line reason if the parameters cannot be rendered."""
    if not isinstance(params.size, (int, np.integer)) or not 32 <= params.size <= MAX_SIZE:
        raise EngineError(f"size must be an integer between 32 and {MAX_SIZE} pixels, got {params.size!r}")
    for name in ("defect_free", "difficulty", "tint"):
        value = getattr(params, name)
        if not isinstance(value, (int, float, np.number)) or not 0.0 <= float(value) <= 1.0:
            raise EngineError(f"{name} must be a number between 0 and 1, got {value!r}")
    if not isinstance(params.max_defects, (int, np.integer)) or params.max_defects < 1:
        raise EngineError(f"max_defects must be an integer >= 1, got {params.max_defects!r}")
    unknown = sorted(set(params.defect_weights) - set(DEFECT_TYPES))
    if unknown:
        raise EngineError(f"unknown defect type(s) {', '.join(unknown)}; choose from {', '.join(DEFECT_TYPES)}")
    weights = list(params.defect_weights.values())
    if any(not isinstance(w, (int, float, np.number)) or not math.isfinite(w) or w < 0 for w in weights):
        raise EngineError("defect weights must be finite numbers >= 0")
    if params.defect_free < 1.0 and sum(weights) <= 0:
        raise EngineError("give at least one defect type a weight above 0 (or set defect_free to 1)")


# ---------------------------------------------------------------------------------------------
# Random fields
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _normal_table() -> np.ndarray:
    """N(0, 1) quantiles at 4096 evenly spaced probabilities, tiled 16x so any uint16 indexes it."""
    inverse = NormalDist().inv_cdf
    return np.tile(np.array([inverse((i + 0.5) / 4096) for i in range(4096)], dtype=np.float32), 16)


def _gauss(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
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


def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth isotropic noise: a cells x cells Gaussian grid upsampled with cubic interpolation."""
    cells = max(2, min(cells, size))
    field_ = cv2.resize(_gauss(rng, (cells, cells)), (min(size, 64),) * 2, interpolation=cv2.INTER_CUBIC)
    # Cubic up to 64 px keeps it smooth; the remaining (cheap) linear step adds no visible artefacts.
    return cv2.resize(field_, (size, size), interpolation=cv2.INTER_LINEAR) if size > 64 else field_


def _fine(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Fine isotropic grain: white noise blurred by sigma, unit std."""
    noise = _gauss(rng, (size, size))
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
    small = _gauss(rng, (span, cols))
    if band > 0:
        knots = max(2, span // int(rng.integers(6, 24)))
        profile = cv2.resize(_gauss(rng, (knots, 1)), (1, span), interpolation=cv2.INTER_CUBIC)[:, 0]
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
class _Surface:
    """A rendered background with the facts the defects need."""

    image: np.ndarray  # float32 HxW, roughly in [0, 1]
    grain_angle: float  # degrees; the rolling / brushing direction (random for isotropic surfaces)
    texture_std: float  # amplitude of the texture, the "noise" a defect must stand out from
    kind: str


def _surface(rng: np.random.Generator, size: int) -> _Surface:
    """Render one background: a random surface finish, lighting gradient and vignetting."""
    kind = SURFACES[int(rng.integers(len(SURFACES)))]
    angle = float(rng.uniform(0.0, 180.0))
    if kind == "brushed":
        texture = (
            _directional(rng, size, angle, rng.uniform(10, 40))
            + rng.uniform(0.3, 0.8) * _directional(rng, size, angle + rng.normal(0, 2), rng.uniform(3, 8))
            + rng.uniform(0.1, 0.5) * _lowfreq(rng, size, int(rng.integers(3, 8)))
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
            _lowfreq(rng, size, int(rng.integers(3, 6)))
            + rng.uniform(0.4, 0.9) * _lowfreq(rng, size, max(4, size // int(rng.integers(12, 24))))
            + rng.uniform(0.6, 1.2) * _fine(rng, size, rng.uniform(0.5, 1.2))
            + rng.uniform(0.2, 0.6) * _directional(rng, size, angle, rng.uniform(6, 20))
        )
        amp = rng.uniform(0.025, 0.08)
    elif kind == "cast":
        granules = _fine(rng, size, rng.uniform(1.0, 2.2))
        texture = (
            _lowfreq(rng, size, int(rng.integers(4, 10)))
            + rng.uniform(0.5, 1.0) * _lowfreq(rng, size, max(4, size // int(rng.integers(8, 16))))
            + rng.uniform(0.6, 1.2) * (np.abs(granules) - 0.8)  # abs() gives the sandy, pitted look
            + rng.uniform(0.2, 0.5) * _fine(rng, size, 0.0)
        )
        amp = rng.uniform(0.03, 0.10)
    else:  # polished
        texture = _lowfreq(rng, size, int(rng.integers(2, 5))) + 0.15 * _fine(rng, size, rng.uniform(0.5, 1.5))
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
    return _Surface(image=image, grain_angle=angle, texture_std=float(amp), kind=kind)


# ---------------------------------------------------------------------------------------------
# Defects: each adds its appearance to `delta` and its exact footprint to `mask` (same geometry)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Canvas:
    delta: np.ndarray  # float32 HxW, added to the surface
    mask: np.ndarray  # uint8 HxW, 255 where a defect was drawn
    noise: float  # texture + sensor noise std the contrast is measured against
    blur: float  # optical blur sigma applied after drawing (thin lines lose contrast to it)
    difficulty: float
    grain_angle: float
    rng: np.random.Generator

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def scale(self) -> float:
        """Geometry is specified for 256 px images; scale it, but not below what stays visible."""
        return max(self.size / 256.0, 0.4)

    def contrast(self, width: float = 99.0) -> float:
        """A contrast magnitude: at least ~2.5x the noise (after blur), lower more often when hard."""
        d = self.difficulty
        factor = 2.5 + (10.0 - 7.0 * d) * self.rng.random() ** (1.0 + 2.0 * d)
        return min(factor * self.noise / _line_retention(self.blur, width), 0.6)

    def sign(self, dark_share: float) -> float:
        return -1.0 if self.rng.random() < dark_share else 1.0

    def centre(self, margin: float = 0.05) -> tuple[float, float]:
        lo, hi = margin * self.size, (1.0 - margin) * self.size
        return float(self.rng.uniform(lo, hi)), float(self.rng.uniform(lo, hi))

    def add_footprint(self, footprint: np.ndarray, value: float | np.ndarray, where: tuple = ()) -> None:
        """Add `value` where `footprint` (bool, for the region `where`) is set, and mark it in the mask."""
        region = (slice(None), slice(None)) if not where else where
        if isinstance(value, np.ndarray):
            self.delta[region] += np.where(footprint, value, np.float32(0.0))
        else:
            self.delta[region][footprint] += np.float32(value)
        self.mask[region][footprint] = 255


@lru_cache(maxsize=256)
def _line_retention(sigma: float, width: float) -> float:
    """Share of a line's contrast left at its centre after a Gaussian blur of `sigma`."""
    if sigma <= 0 or width >= 8:
        return 1.0
    taps = np.arange(-4, 5, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    half = int(width) // 2
    return float(kernel[4 - half : 4 - half + max(1, int(width))].sum())


_SHIFT = 4  # polylines with 4 fractional bits: smooth curves without a wider footprint


def _draw_polyline(canvas: _Canvas, points: np.ndarray, width: int, value: float | np.ndarray) -> None:
    """Rasterise a polyline into a fresh footprint and add it with `value` (scalar or per-pixel field)."""
    footprint = np.zeros_like(canvas.mask)
    pts = np.round(points * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(footprint, [pts], False, 255, thickness=int(width), lineType=cv2.LINE_8, shift=_SHIFT)
    canvas.add_footprint(footprint > 0, value)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _scratch(canvas: _Canvas) -> None:
    """Thin long (possibly curved) line, darker or brighter, contrast fading a little along it."""
    rng, size, d = canvas.rng, canvas.size, canvas.difficulty
    length = size * (rng.uniform(0.25, 1.1) if rng.random() < 0.85 else rng.uniform(0.1, 0.25))
    width = 1 + int(5.999 * rng.random() ** (0.5 + 2.5 * d))
    theta = rng.uniform(0.0, np.pi)
    direction = np.array([math.cos(theta), math.sin(theta)])
    normal = np.array([-direction[1], direction[0]])
    centre = np.array(canvas.centre(0.15))
    p0, p3 = centre - direction * length / 2, centre + direction * length / 2
    bend = rng.normal(0.0, 0.12) * length
    p1 = p0 + direction * length / 3 + normal * bend * rng.uniform(0.5, 1.5)
    p2 = p0 + direction * 2 * length / 3 + normal * bend * rng.uniform(-0.5, 1.5)
    points = _bezier(p0, p1, p2, p3, max(8, int(length / 4)))
    contrast = canvas.sign(0.6) * canvas.contrast(width)
    # Real scratches vary in depth: modulate between 70 % and 100 % of the contrast.
    fade = 0.85 + 0.15 * np.tanh(_lowfreq(rng, size, 4))
    _draw_polyline(canvas, points, width, np.float32(contrast) * fade)


def _jagged(rng: np.random.Generator, start: np.ndarray, heading: float, length: float) -> np.ndarray:
    """A crack-like random walk: short straight segments with jittered, slowly drifting heading."""
    steps = max(3, int(length / rng.uniform(3.0, 7.0)))
    seg = length / steps
    drift = np.cumsum(rng.normal(0.0, 0.08, steps))
    headings = heading + drift + rng.normal(0.0, 0.45, steps)
    moves = np.stack([np.cos(headings), np.sin(headings)], axis=1) * seg
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _crack(canvas: _Canvas) -> None:
    """Branching jagged dark polyline, 1-3 px wide, branches thinner."""
    rng, size = canvas.rng, canvas.size
    width = int(rng.integers(1, 4))
    length = size * rng.uniform(0.15, 0.6)
    heading = rng.uniform(0.0, 2 * np.pi)
    centre = np.array(canvas.centre(0.2))
    start = centre - np.array([math.cos(heading), math.sin(heading)]) * length / 2
    main = _jagged(rng, start, heading, length)
    contrast = -canvas.contrast(1)  # dark; sized for the thinnest branch so every branch stays visible
    _draw_polyline(canvas, main, width, contrast)
    for _ in range(int(rng.integers(0, 4))):
        origin = main[int(rng.integers(1, len(main)))]
        branch_heading = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.2)
        branch = _jagged(rng, origin, branch_heading, length * rng.uniform(0.15, 0.5))
        _draw_polyline(canvas, branch, max(1, width - 1), contrast)


def _roi(canvas: _Canvas, cx: float, cy: float, radius: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The image window around a centre and the local pixel offsets (dx, dy) from that centre."""
    size = canvas.size
    r = int(math.ceil(radius)) + 1
    x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
    y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    return (slice(y0, y1), slice(x0, x1)), dx, dy


def _ellipse_coords(dx: np.ndarray, dy: np.ndarray, a: float, b: float, phi: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets in the ellipse's frame, normalised by its semi-axes (u along a, v along b)."""
    c, s = math.cos(phi), math.sin(phi)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return u, v


def _pit(canvas: _Canvas) -> None:
    """Small dark shaded blob with a light rim on the side facing the light."""
    rng = canvas.rng
    r = max(1.5, rng.uniform(2.0, 8.0) * canvas.scale)
    rim = max(1.0, 0.3 * r)
    cx, cy = canvas.centre()
    light = rng.uniform(0.0, 2 * np.pi)
    where, dx, dy = _roi(canvas, cx, cy, r + rim)
    dist = np.sqrt(dx * dx + dy * dy)
    facing = (dx * math.cos(light) + dy * math.sin(light)) / np.maximum(dist, 1e-3)
    contrast = canvas.contrast(2 * r)
    bowl = dist < r
    rim_zone = (dist >= r) & (dist < r + rim) & (facing > 0.35)
    rho2 = (dist / r) ** 2
    value = np.where(bowl, -contrast * (0.6 + 0.4 * (1 - rho2)) * (1.0 - 0.3 * facing), 0.8 * contrast * facing)
    canvas.add_footprint(bowl | rim_zone, value.astype(np.float32), where)


def _dent(canvas: _Canvas) -> None:
    """Larger shallow elliptical depression, shaded as if lit from one side."""
    rng = canvas.rng
    a = rng.uniform(6.0, 20.0) * canvas.scale
    b = a * rng.uniform(0.6, 1.0)
    phi = rng.uniform(0.0, np.pi)
    light = rng.uniform(0.0, 2 * np.pi)
    cx, cy = canvas.centre()
    where, dx, dy = _roi(canvas, cx, cy, a)
    u, v = _ellipse_coords(dx, dy, a, b, phi)
    rho2 = u * u + v * v
    inside = rho2 < 1.0
    # Shading of a bowl: brightness follows the slope towards the light, plus an overall darkening.
    lu, lv = math.cos(light - phi), math.sin(light - phi)
    contrast = canvas.contrast()
    value = contrast * (-0.5 - 0.5 * (1 - rho2) + 0.9 * (u * lu + v * lv))
    canvas.add_footprint(inside, value.astype(np.float32), where)


def _inclusion(canvas: _Canvas) -> None:
    """Dark elongated spot, stretched along the rolling / grain direction."""
    rng = canvas.rng
    a = rng.uniform(4.0, 25.0) * canvas.scale
    b = max(1.0, rng.uniform(1.0, 3.0) * canvas.scale)
    phi = math.radians(-canvas.grain_angle + rng.normal(0.0, 3.0))  # image y points down
    cx, cy = canvas.centre()
    where, dx, dy = _roi(canvas, cx, cy, a)
    u, v = _ellipse_coords(dx, dy, a, b, phi)
    rho2 = u * u + v * v
    inside = rho2 < 1.0
    contrast = canvas.contrast(2 * b)
    canvas.add_footprint(inside, (-contrast * (0.7 + 0.3 * (1 - rho2))).astype(np.float32), where)


def _patch(canvas: _Canvas) -> None:
    """Stain: an irregular region (thresholded smooth noise inside a blob) with a brightness shift."""
    rng = canvas.rng
    radius = canvas.size * rng.uniform(0.05, 0.18)
    cx, cy = canvas.centre()
    where, dx, dy = _roi(canvas, cx, cy, radius)
    rows, cols = dy.shape[0], dx.shape[1]
    blob_noise = cv2.resize(_gauss(rng, (6, 6)), (cols, rows), interpolation=cv2.INTER_CUBIC)
    rho2 = (dx * dx + dy * dy) / (radius * radius)
    shape = (1.0 - rho2) + 0.45 * blob_noise
    footprint = (shape > 0.35) & (rho2 < 1.0) | (rho2 < 0.04)
    contrast = canvas.sign(0.5) * canvas.contrast()
    value = np.float32(contrast) * (0.8 + 0.2 * np.clip(shape, 0.0, 1.0))
    canvas.add_footprint(footprint, value.astype(np.float32), where)


_DRAW: dict[str, Callable[[_Canvas], None]] = {
    "scratch": _scratch,
    "crack": _crack,
    "pit": _pit,
    "dent": _dent,
    "inclusion": _inclusion,
    "patch": _patch,
}


def draw_defects(size: int, noise: float, blur: float, grain_angle: float, rng: np.random.Generator,
                 params: SynthParams) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """1..max_defects defects of the weighted types on a size x size canvas: (delta to add to the surface,
    float32; exact mask, uint8 0/255; the types drawn). Contrasts are measured against `noise`, the surface's
    texture and sensor noise, and sized to survive an optical blur of `blur`."""
    canvas = _Canvas(delta=np.zeros((size, size), np.float32), mask=np.zeros((size, size), np.uint8), noise=noise,
                     blur=blur, difficulty=float(params.difficulty), grain_angle=grain_angle, rng=rng)
    names = [n for n in DEFECT_TYPES if params.defect_weights.get(n, 0.0) > 0]
    if not names:
        raise EngineError("give at least one defect type a weight above 0 to draw defects")
    weights = np.array([params.defect_weights[n] for n in names], dtype=np.float64)
    count = int(rng.integers(1, int(params.max_defects) + 1))
    types = []
    for index in rng.choice(len(names), size=count, p=weights / weights.sum()):
        _DRAW[names[index]](canvas)
        types.append(names[index])
    return canvas.delta, canvas.mask, types


# ---------------------------------------------------------------------------------------------
# One sample
# ---------------------------------------------------------------------------------------------


def _tint(rng: np.random.Generator, gray: np.ndarray) -> np.ndarray:
    """Colour a grayscale uint8 image with a random metal tint (BGR gains around 1)."""
    gains = 1.0 + rng.normal(0.0, 0.07, 3)
    gains /= gains.mean()
    return cv2.transform(gray[:, :, None], gains.reshape(3, 1).astype(np.float32))


def render_sample(seed: int, params: SynthParams, defect_free: bool) -> Sample:
    """Render one image (uint8 HxW gray, or HxWx3 BGR when tinted) and its mask (uint8 0/255) and the defect types drawn."""
    validate_params(params)
    size = int(params.size)
    # Independent streams: the background and sensor noise do not depend on whether defects are drawn,
    # so a seed rendered with and without defects differs only where the defects are.
    surface_rng, defect_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed) % 2**64).spawn(3)
    )
    surface = _surface(surface_rng, size)
    blur = float(surface_rng.uniform(0.0, 0.7))
    sensor = float(surface_rng.uniform(0.004, 0.025))
    tinted = surface_rng.random() < params.tint

    mask = np.zeros((size, size), np.uint8)
    types: list[str] = []
    image = surface.image
    if not defect_free:
        delta, mask, types = draw_defects(size, math.hypot(surface.texture_std, sensor), blur if blur >= 0.35 else 0.0,
                                          surface.grain_angle, defect_rng, params)
        image += delta

    if blur >= 0.35:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    image += _gauss(noise_rng, (size, size)) * np.float32(sensor)
    salt = int(noise_rng.poisson(size * size * noise_rng.uniform(0.0, 2e-4)))
    if salt:
        flat = image.reshape(-1)
        flat[noise_rng.integers(0, size * size, salt)] = noise_rng.choice(np.array([0.0, 1.0], np.float32), salt)
    out = np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    if tinted:
        out = _tint(surface_rng, out)
    return out, mask, types


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _image_seed(seed: int, index: int) -> int:
    """The seed of image `index` in a dataset: a 63-bit hash of (dataset seed, index)."""
    state = np.random.SeedSequence([int(seed) % 2**64, 1, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _layout(count: int, seed: int, defect_free: float) -> tuple[np.ndarray, list[str]]:
    """Which images are defect-free (exactly round(count * share)) and the stratified 80/10/10 split."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, 0]))
    free = np.zeros(count, dtype=bool)
    free[rng.permutation(count)[: int(round(count * defect_free))]] = True
    splits = ["train"] * count
    # Split defect-free and defective images separately so every split gets some of each.
    for group in (np.flatnonzero(free), np.flatnonzero(~free)):
        order = rng.permutation(group)
        n = len(order)
        n_holdout = max(1, int(round(0.1 * n))) if n >= 3 else 0
        for i in order[:n_holdout]:
            splits[i] = "val"
        for i in order[n_holdout : 2 * n_holdout]:
            splits[i] = "test"
    return free, splits


def _id_width(count: int) -> int:
    return max(6, len(str(count - 1)))


WRITE_THREADS = 4  # per process: PNG encode and fsync release the GIL, so writes overlap rendering


class _BatchRenderer:
    """Renders batches of images and writes their files, the writes on a few threads."""

    def __init__(self, out: Path, params: SynthParams, width: int) -> None:
        self.out, self.params, self.width = out, params, width
        self.executor = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="synth-write")

    def run(self, batch: list[tuple[int, int, bool]]) -> list[tuple[int, str, float]]:
        """Render and write each (index, seed, defect_free) task; return (index, types, defect fraction)."""
        futures: list[Future] = []
        results = []
        for index, seed, free in batch:
            image, mask, types = render_sample(seed, self.params, free)
            name = f"{index:0{self.width}d}.png"
            futures.append(self.executor.submit(write_png, self.out / "images" / name, image, False))
            if free:
                # A mask left from an earlier dataset in this folder would make this image "defective".
                futures.append(self.executor.submit((self.out / "masks" / name).unlink, missing_ok=True))
                fraction = 0.0
            else:
                futures.append(self.executor.submit(write_png, self.out / "masks" / name, mask, False))
                fraction = cv2.countNonZero(mask) / mask.size
            results.append((index, ";".join(types), fraction))
        for future in futures:
            future.result()  # re-raises a failed write here
        return results

    def close(self) -> None:
        self.executor.shutdown(wait=True)


_WORKER: _BatchRenderer | None = None  # one per pool process


def _init_worker(out: str, params: SynthParams, width: int) -> None:
    global _WORKER
    cv2.setNumThreads(1)  # the pool already uses every core; OpenCV threads would only contend
    _WORKER = _BatchRenderer(Path(out), params, width)


def _run_batch(batch: list[tuple[int, int, bool]]) -> list[tuple[int, str, float]]:
    assert _WORKER is not None, "pool worker not initialised"
    return _WORKER.run(batch)


# Threads known to sit idle holding nothing a worker needs (tqdm's bar monitor, used by the CLI).
_IDLE_THREADS = frozenset({"tqdm_monitor"})


def _os_threads() -> int:
    """Threads of this process as the OS sees them (Python and native); -1 where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork when safe (starts in ms), else spawn (~0.5 s: each worker imports numpy and OpenCV)."""
    # Forking while other threads run (Streamlit sessions, servers) can deadlock the child on a lock
    # some thread held at the time of the fork.
    # Native threads count too: once OpenCV or OpenMP have started their pools in this process (a test
    # session, a page that trained or inspected), a forked worker hangs in cv2.setNumThreads.
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if (sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
            and all(t.name in _IDLE_THREADS for t in others) and _os_threads() == len(others) + 1):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _render_all(out: Path, params: SynthParams, width: int, tasks: list[tuple[int, int, bool]],
                workers: int | None, progress: Progress | None) -> list[tuple[int, str, float]]:
    """Render and write every (index, seed, defect-free) task, in a process pool when there are enough;
    returns (index, defect types, defect fraction) per image."""
    count = len(tasks)
    workers = max(1, int(workers if workers is not None else config.cpu_threads()))
    workers = min(workers, max(1, count // 16))
    chunk = int(min(32, max(4, count // (workers * 8))))
    batches = [tasks[i : i + chunk] for i in range(0, count, chunk)]
    results: list[tuple[int, str, float]] = []

    def collect(done_batches: Iterable[list[tuple[int, str, float]]]) -> None:
        for done in done_batches:
            results.extend(done)
            if progress:
                progress(len(results), count, "images")

    if workers > 1 and count >= POOL_MIN_COUNT:
        with _pool_context().Pool(workers, initializer=_init_worker, initargs=(str(out), params, width)) as pool:
            collect(pool.imap(_run_batch, batches))
    else:
        renderer = _BatchRenderer(out, params, width)
        try:
            collect(map(renderer.run, batches))
        finally:
            renderer.close()
    return results


def generate_dataset(
    out: str | Path,
    count: int,
    seed: int = 0,
    params: SynthParams | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write DIR/images/<id>.png, DIR/masks/<id>.png (only for defective images), DIR/manifest.csv; return counts."""
    params = params or SynthParams()
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise EngineError(f"count must be an integer >= 1, got {count!r}")
    validate_params(params)
    started = time.perf_counter()
    out = Path(out)
    check_replaceable(out, MANIFEST_COLUMNS, "generate")
    free, splits = _layout(count, seed, params.defect_free)
    seeds = [_image_seed(seed, i) for i in range(count)]
    tasks = [(i, seeds[i], bool(free[i])) for i in range(count)]
    width = _id_width(count)
    # Built whole in a hidden folder beside `out`, then swapped in: a failure leaves `out` as it was.
    with staged_folder(out) as tmp:
        try:
            (tmp / "images").mkdir()
            (tmp / "masks").mkdir()
            results = _render_all(tmp, params, width, tasks, workers, progress)
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for index, types, fraction in results:
                writer.writerow([f"{index:0{width}d}", splits[index], types, f"{fraction:.5f}", seeds[index]])
            atomic_write_text(tmp / "manifest.csv", buffer.getvalue())
        except OSError as err:
            raise EngineError(f"cannot write the dataset to {out}: {err.strerror or err}") from err
        replace_folder(tmp, out)

    n_free = int(free.sum())
    return {
        "out": str(out),
        "images": count,
        "defective": count - n_free,
        "defect_free": n_free,
        "seconds": round(time.perf_counter() - started, 3),
        "per_split": {s: splits.count(s) for s in SPLITS},
    }


def splits_text(per_split: dict[str, int]) -> str:
    """A generated set's images per split, for people: 'train 700, val 150, test 150'."""
    return ", ".join(f"{split} {count}" for split, count in per_split.items())


def preview(params: SynthParams, n: int = 6, seed: int = 0) -> list[Sample]:
    """Render n samples in memory (nothing written) for the UI preview."""
    if n < 1:
        raise EngineError(f"preview needs n >= 1, got {n!r}")
    validate_params(params)
    free, _ = _layout(n, seed, params.defect_free)
    # The same seeds and layout as generate_dataset(count=n, seed=seed): the preview is that dataset.
    return [render_sample(_image_seed(seed, i), params, bool(free[i])) for i in range(n)]


def ensure_sample_folder(path: Path | str | None = None, count: int = 24) -> Path:
    """Create the default sample folder (data/procedural_images) if missing or empty; return it."""
    path = Path(path) if path is not None else config.SAMPLE_DIR
    images = path / "images"
    has_images = images.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in images.iterdir())
    if not has_images:
        generate_dataset(path, count, seed=0, workers=1)
    return path


_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def dataset_dir(name: str) -> Path:
    """Folder for a new dataset called `name` under config.DATA_DIR; EngineError for an unusable name."""
    name = (name or "").strip()
    if not _DATASET_NAME.match(name) or name in (".", ".."):
        raise EngineError(f"dataset name {name!r} is not usable; use 1-64 letters, digits, '-', '_' or '.'")
    return config.DATA_DIR / name


def generate_and_register(
    out: str | Path,
    count: int,
    seed: int = 0,
    params: SynthParams | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    source: str = "generated",
) -> dict:
    """generate_dataset, then record the folder in the registry (name, content hash, counts); returns the counts."""
    from engine.data import (
        register_dataset,  # data imports torch; keep plain generation light
    )

    params = params or SynthParams()
    result = generate_dataset(out, count, seed=seed, params=params, workers=workers, progress=progress)
    details = {"seed": seed, "size": params.size, "defect_free": params.defect_free,
               "difficulty": params.difficulty, "tint": params.tint, "defect_weights": params.defect_weights}
    result["dataset"] = register_dataset(out, source=source, details=details)
    return result


def ensure_sample_dataset(path: Path | str | None = None) -> Path:
    """ensure_sample_folder, and make sure the registry lists the sample folder; return it."""
    from engine import registry

    path = ensure_sample_folder(path)
    resolved = str(path.resolve())
    if not any(dataset.path == resolved for dataset in registry.list_datasets()):
        from engine.data import register_dataset

        register_dataset(path, source="sample", details={"seed": 0})
    return path
