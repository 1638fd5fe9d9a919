"""Painting the generator's defects onto real defect-free images, with exact masks.

A square window of the image (its short side by default) is measured: its noise (what a defect must stand out
from), its sharpness (a defect is drawn no sharper than the surface's finest detail: a crisp line on a soft image
teaches the model to look for crispness, which real defects there do not have), its brightness (a dark scratch on
a bright part is darker in grey levels than on a dark one) and its grain direction (inclusions follow it). The
generator then draws its defects for that window (engine.synth.draw_defects: scratches and cracks down to 1 px,
pits, dents, inclusions, patches, dark and bright), and they are added to the image's own pixels, so the texture,
lighting and sensor noise under a painted defect are the image's. The mask is exactly the pixels that changed.
Seeded by the caller's generator: the same seed paints the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from engine.errors import EngineError
from engine.synth import DEFECT_TYPES, SynthParams, draw_defects, only_types

MIN_SIDE = 24  # a window smaller than this has no room for a defect
MIN_NOISE = 1e-3  # a surface flatter than this (a blank or saturated image) is left alone
VISIBLE = 1.5 / 255  # a pixel counts as changed (and so as defect) when it moved by more: it survives 8 bits
MAX_BLUR = 3.0  # px: a softer surface still gets defects this sharp (the estimate grows with coarse texture)
MIN_BLUR = 0.35  # px: below this the defects are drawn as they are (the generator's own rule)
DEFECTS_PER_IMAGE = 2  # painted defects per painted image or crop: 1 up to this many
# Said where every kind is painted because none was named (KolektorSDD, docs/RESULTS.md, fourteenth session).
EVERY_KIND = ("a model taught every kind flags the other marks of good parts too, and one taught some kinds finds the "
              "others less")


def _default_weights() -> dict[str, float]:
    return {name: (3.0 if name in ("scratch", "crack") else 1.0) for name in DEFECT_TYPES}


@dataclass(frozen=True)
class PaintParams:
    """What is painted: defect mix, count, difficulty, and the size of the square the defects are drawn in."""

    defect_weights: dict[str, float] = field(default_factory=_default_weights)
    max_defects: int = DEFECTS_PER_IMAGE  # 1..max_defects per painted image
    difficulty: float = 0.5  # 0 easy (high contrast, wide) .. 1 hard (thin, low contrast)
    window: float = 0.0  # side of the square defects are sized to: 0 = the image's short side, <= 1 a share of it, > 1 px

    def synth(self) -> SynthParams:
        """The generator's parameters for these."""
        return SynthParams(defect_weights=dict(self.defect_weights), max_defects=self.max_defects,
                           difficulty=self.difficulty)

    def on_crops(self, scale: float, short_side: float) -> PaintParams:
        """The same defects painted on training crops of images resized by `scale` whose short side is `short_side`
        px at full size: a size given as a share of the image or in px becomes px of the crops (at least MIN_SIDE);
        the default (0) stays each crop's short side."""
        if self.window <= 0:
            return self
        full = self.window * short_side if self.window <= 1 else self.window
        return replace(self, window=max(float(MIN_SIDE), full * scale))


def params_for(types: str | None, difficulty: float = 0.5, size: float = 0.0,
               count: int = DEFECTS_PER_IMAGE) -> PaintParams:
    """PaintParams that draw only the comma-separated defect `types` (every type when None or empty), 1..`count`
    defects per image, sized to a square of side `size` (a share of the image's short side when <= 1, px when > 1,
    the whole short side when 0); EngineError for a size or count that cannot be painted."""
    if size < 0 or 1 < size < MIN_SIDE:
        raise EngineError(f"defect size {size:g}: give a share of the image's short side (0 to 1) or at least "
                          f"{MIN_SIDE} px")
    if count < 1:
        raise EngineError(f"defects per image {count}: give at least 1")
    return PaintParams(defect_weights=only_types(_default_weights(), types), max_defects=int(count),
                       difficulty=difficulty, window=float(size))


def window_side(shape: tuple[int, int], window: float) -> int:
    """The side in pixels of the square a defect is drawn in, for an image of this shape."""
    short = min(shape)
    if window <= 0:
        return short
    return min(short, int(round(window * short if window <= 1 else window)))


def surface_noise(patch: np.ndarray) -> float:
    """How much a surface varies around its lighting (texture and sensor noise together, what the generator's
    contrasts are measured against): a robust std (1.4826 x MAD) of the patch minus its smooth lighting."""
    lighting = cv2.GaussianBlur(patch, (0, 0), max(2.0, min(patch.shape) / 16))
    texture = patch - lighting
    return float(1.4826 * np.median(np.abs(texture - np.median(texture))))


def surface_blur(patch: np.ndarray) -> float:
    """The Gaussian sigma (px) of the surface's finest detail, from the correlation of neighbouring pixels of its
    texture: white noise blurred by sigma correlates exp(-1 / (4 sigma^2)) with its neighbour, so sigma =
    sqrt(-1 / (4 ln rho)). Coarse texture reads as blur too, which is what is wanted: no sharper than the surface."""
    lighting = cv2.GaussianBlur(patch, (0, 0), max(2.0, min(patch.shape) / 16))
    texture = patch - lighting
    correlations = []
    for a, b in ((texture[:, :-1], texture[:, 1:]), (texture[:-1], texture[1:])):
        a, b = a - a.mean(), b - b.mean()
        correlations.append(float((a * b).mean() / max(math.sqrt(float((a * a).mean() * (b * b).mean())), 1e-12)))
    rho = float(np.clip(np.mean(correlations), 1e-3, 0.999))
    return float(min(MAX_BLUR, math.sqrt(-1.0 / (4.0 * math.log(rho)))))


def grain_angle(patch: np.ndarray) -> float:
    """The dominant direction of the surface's texture in degrees (the generator's convention), from the
    structure tensor: the grain runs across the strongest gradients."""
    gx = cv2.Sobel(patch, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(patch, cv2.CV_32F, 0, 1, ksize=3)
    gradient = 0.5 * math.atan2(2.0 * float(np.sum(gx * gy)), float(np.sum(gx * gx - gy * gy)))
    return (-math.degrees(gradient + math.pi / 2)) % 180.0  # y points down in images, up in the generator


def paint(image: np.ndarray, rng: np.random.Generator, params: PaintParams | None = None
          ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paint defects onto a float32 [0, 1] grayscale image: (painted image, mask uint8 0/1, types drawn).

    An image without room (smaller than MIN_SIDE, or a flat, blank or saturated surface) is returned unchanged
    with an empty mask and no types.
    """
    params = params or PaintParams()
    image = np.asarray(image, dtype=np.float32)
    empty = np.zeros(image.shape, np.uint8)
    side = window_side(image.shape, params.window)
    if side < MIN_SIDE:
        return image, empty, []
    y = int(rng.integers(image.shape[0] - side + 1))
    x = int(rng.integers(image.shape[1] - side + 1))
    patch = image[y : y + side, x : x + side]
    noise = surface_noise(patch)
    if noise < MIN_NOISE:
        return image, empty, []
    blur = surface_blur(patch)
    blur = blur if blur >= MIN_BLUR else 0.0
    delta, _, types = draw_defects(side, noise, blur, grain_angle(patch), rng, params.synth())
    if blur:  # the optics the surface went through; the generator sized the contrasts to survive it
        delta = cv2.GaussianBlur(delta, (0, 0), blur)
    # Light: the generator's contrasts are for a mid-grey surface; scale them with the local brightness.
    local = cv2.GaussianBlur(patch, (0, 0), max(2.0, side / 32))
    delta *= np.clip(local / 0.5, 0.3, 1.7)
    painted_patch = np.clip(patch + delta, 0.0, 1.0)
    changed = np.abs(painted_patch - patch) > VISIBLE  # blurred edges included: the mask is what changed
    if not changed.any():
        return image, empty, []
    painted = image.copy()
    painted[y : y + side, x : x + side] = np.where(changed, painted_patch, patch)
    mask = empty.copy()
    mask[y : y + side, x : x + side] = changed
    return painted, mask, types


class DefectBank:
    """A set's own labelled defects, each cut out as its difference from the surface under it, to move onto
    defect-free images (copy-paste augmentation): with a few labelled defects, the model sees them on many
    surfaces, and what it learns is the look of the user's defects rather than the generator's.

    The surface under a defect is estimated by inpainting its mask (OpenCV's Telea); a piece is the image minus
    that surface within the mask, feathered at its edge, and the mask itself (as labelled) is the label.
    """

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], margin: int = 3) -> None:
        self.pieces: list[tuple[np.ndarray, np.ndarray, float]] = []  # (difference, mask, surface brightness)
        for image, mask in pairs:
            count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
            if count < 2:
                continue
            image = np.asarray(image, np.float32)
            holes = cv2.dilate((mask > 0).astype(np.uint8), np.ones((3, 3), np.uint8))
            surface = cv2.inpaint(np.round(image * 255).astype(np.uint8), holes, margin, cv2.INPAINT_TELEA)
            surface = surface.astype(np.float32) / 255
            for k in range(1, count):
                x, y, w, h = stats[k][:4]
                top, left = max(0, y - margin), max(0, x - margin)
                box = (slice(top, y + h + margin), slice(left, x + w + margin))
                piece_mask = (labels[box] == k).astype(np.uint8)
                feather = cv2.GaussianBlur(piece_mask.astype(np.float32), (0, 0), 0.7) * (
                    cv2.dilate(piece_mask, np.ones((3, 3), np.uint8)) > 0)
                self.pieces.append(((image[box] - surface[box]) * feather, piece_mask,
                                    float(surface[box].mean())))

    def __len__(self) -> int:
        return len(self.pieces)

    def transplant(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """One of the bank's defects moved onto a float32 [0, 1] image at a random place, flipped at random and
        scaled to the local brightness: (image, mask uint8 0/1, ["transplanted"]). A piece larger than the
        image is cut to it; without pieces the image is returned unchanged."""
        empty = np.zeros(image.shape, np.uint8)
        if not self.pieces:
            return image, empty, []
        difference, mask, brightness = self.pieces[int(rng.integers(len(self.pieces)))]
        if rng.random() < 0.5:
            difference, mask = difference[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            difference, mask = difference[::-1], mask[::-1]
        h, w = min(mask.shape[0], image.shape[0]), min(mask.shape[1], image.shape[1])
        dy, dx = int(rng.integers(mask.shape[0] - h + 1)), int(rng.integers(mask.shape[1] - w + 1))
        difference, mask = difference[dy : dy + h, dx : dx + w], mask[dy : dy + h, dx : dx + w]
        if not mask.any():
            return image, empty, []
        y, x = int(rng.integers(image.shape[0] - h + 1)), int(rng.integers(image.shape[1] - w + 1))
        spot = (slice(y, y + h), slice(x, x + w))
        light = float(np.clip(image[spot].mean() / max(brightness, 1e-3), 0.5, 2.0))
        painted = image.copy()
        painted[spot] = np.clip(image[spot] + difference * light, 0.0, 1.0)
        labels = empty.copy()
        labels[spot] = mask
        return painted, labels, ["transplanted"]
