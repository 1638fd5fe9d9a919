"""Painting the generator's defects onto real defect-free images, with exact masks.

A square window of the image (its short side by default) is measured: its noise (what a defect must stand out
from), its brightness (a dark scratch on a bright part is darker in grey levels than on a dark one) and its grain
direction (inclusions follow it). The generator then draws its defects for that window (engine.synth.draw_defects:
scratches and cracks down to 1 px, pits, dents, inclusions, patches, dark and bright), and they are added to the
image's own pixels, so the texture, lighting and sensor noise under a painted defect are the image's.
The mask is exactly the pixels that changed. Seeded by the caller's generator: the same seed paints the same.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.errors import DatasetError, EngineError, ImageError
from engine.imageio import IMAGE_EXTENSIONS, read_image, write_png
from engine.progress import Progress
from engine.storage import atomic_write_text
from engine.synth import DEFECT_TYPES, SynthParams, draw_defects

MIN_SIDE = 24  # a window smaller than this has no room for a defect
MIN_NOISE = 1e-3  # a surface flatter than this (a blank or saturated image) is left alone
VISIBLE = 1.5 / 255  # a pixel counts as changed (and so as defect) when it moved by more: it survives 8 bits


def _default_weights() -> dict[str, float]:
    return {name: (3.0 if name in ("scratch", "crack") else 1.0) for name in DEFECT_TYPES}


@dataclass(frozen=True)
class PaintParams:
    """What is painted: defect mix, count, difficulty, and the window the defects are drawn in."""

    defect_weights: dict[str, float] = field(default_factory=_default_weights)
    max_defects: int = 2  # 1..max_defects per painted image
    difficulty: float = 0.5  # 0 easy (high contrast, wide) .. 1 hard (thin, low contrast)
    window: float = 0.0  # side of the window: 0 = the image's short side, <= 1 a share of it, > 1 pixels

    def synth(self) -> SynthParams:
        """The generator's parameters for these."""
        return SynthParams(defect_weights=dict(self.defect_weights), max_defects=self.max_defects,
                           difficulty=self.difficulty)


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
    delta, footprint, types = draw_defects(side, noise, 0.0, grain_angle(patch), rng, params.synth())
    # Light: the generator's contrasts are for a mid-grey surface; scale them with the local brightness.
    local = cv2.GaussianBlur(patch, (0, 0), max(2.0, side / 32))
    delta *= np.clip(local / 0.5, 0.3, 1.7)
    painted_patch = np.clip(patch + delta, 0.0, 1.0)
    changed = (footprint > 0) & (np.abs(painted_patch - patch) > VISIBLE)
    if not changed.any():
        return image, empty, []
    painted = image.copy()
    painted[y : y + side, x : x + side] = np.where(changed, painted_patch, patch)
    mask = empty.copy()
    mask[y : y + side, x : x + side] = changed
    return painted, mask, types


# --------------------------------------------------------------------------------------- datasets

MANIFEST_COLUMNS = ("id", "split", "defect_types", "defect_fraction", "synthetic", "source")


def good_images(folder: str | Path) -> list[Path]:
    """The images of a folder of defect-free images: DIR/images/* of a dataset folder, else DIR/* itself."""
    root = Path(folder)
    base = root / "images" if (root / "images").is_dir() else root
    if not base.is_dir():
        raise DatasetError(f"{root}: not a folder; pass a folder of defect-free images (or a dataset folder)")
    found = sorted(p for p in base.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found


def paint_dataset(onto: str | Path, out: str | Path, count: int, defect_free: float = 0.4, seed: int = 0,
                  params: PaintParams | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Write a dataset folder of `count` images made from the good images in `onto` (cycled through): a share
    `defect_free` left as they are, the others with painted defects and their exact masks; the manifest marks
    painted images `synthetic`. An unreadable image is reported once and left out. Registers the folder; returns
    counts."""
    from engine.data import register_dataset, split_for_id  # data imports torch

    sources, out = good_images(onto), Path(out)
    if count < 1:
        raise EngineError("--count must be at least 1")
    start, rows, skipped = time.perf_counter(), [], []
    width = max(6, len(str(count - 1)))
    attempt = 0
    while len(rows) < count and len(skipped) < len(sources):
        source = sources[attempt % len(sources)]
        attempt += 1
        if any(source.name in reason for reason in skipped):
            continue
        try:
            image = read_image(source)
        except ImageError as err:
            skipped.append(str(err))
            print(f"warning: skipped {err}", file=sys.stderr)
            continue
        index = len(rows)
        rng = np.random.default_rng([seed, index])
        sample_id = f"{index:0{width}d}"
        image, mask, types = (image, None, []) if rng.random() < defect_free else paint(image, rng, params)
        write_png(out / "images" / f"{sample_id}.png", np.round(image * 255).astype(np.uint8), durable=False)
        if types:
            write_png(out / "masks" / f"{sample_id}.png", mask * np.uint8(255), durable=False)
        rows.append({"id": sample_id, "split": split_for_id(sample_id), "defect_types": " ".join(types),
                     "defect_fraction": round(float(mask.mean()), 6) if types else 0.0,
                     "synthetic": int(bool(types)), "source": str(source)})
        if progress:
            progress(len(rows), count, "images")
    if not rows:
        raise DatasetError(f"{onto}: none of its images could be read ({skipped[0] if skipped else ''})")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "manifest.csv", buffer.getvalue())  # last and durable: the folder is complete
    painted = sum(row["synthetic"] for row in rows)
    dataset = register_dataset(out, source="painted", details={"onto": str(Path(onto).resolve()), "seed": seed,
                                                               "defect_free": defect_free, "skipped": skipped[:50]})
    return {"images": len(rows), "defective": painted, "defect_free": len(rows) - painted, "skipped": skipped,
            "seconds": time.perf_counter() - start, "dataset": dataset}


def preview(onto: str | Path, n: int = 4, seed: int = 0, params: PaintParams | None = None
            ) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Up to n good images of a folder, evenly spread over it, each painted (seeded): (image, mask, types)."""
    sources = good_images(onto)
    picked = [sources[round(i * (len(sources) - 1) / max(1, n - 1))] for i in range(min(n, len(sources)))]
    out = []
    for index, source in enumerate(picked):
        try:
            image = read_image(source)
        except ImageError:
            continue
        out.append(paint(image, np.random.default_rng([seed, index]), params))
    return out
