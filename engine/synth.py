"""Seeded synthetic samples: what the generator draws (SynthParams), its defects with exact masks on a procedural
surface (engine/surfaces.py), and one rendered image. Datasets of them: engine/synthset.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np

from engine.errors import EngineError
from engine.surfaces import gauss, lowfreq, random_surface

DEFECT_TYPES = ("scratch", "crack", "pit", "dent", "inclusion", "patch")
MAX_SIZE = 4096

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
    fade = 0.85 + 0.15 * np.tanh(lowfreq(rng, size, 4))
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
    blob_noise = cv2.resize(gauss(rng, (6, 6)), (cols, rows), interpolation=cv2.INTER_CUBIC)
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
    surface = random_surface(surface_rng, size)
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
    image += gauss(noise_rng, (size, size)) * np.float32(sensor)
    salt = int(noise_rng.poisson(size * size * noise_rng.uniform(0.0, 2e-4)))
    if salt:
        flat = image.reshape(-1)
        flat[noise_rng.integers(0, size * size, salt)] = noise_rng.choice(np.array([0.0, 1.0], np.float32), salt)
    out = np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    if tinted:
        out = _tint(surface_rng, out)
    return out, mask, types
