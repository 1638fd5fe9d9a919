"""The verdict: which regions of a probability map count under a recipe, and whether the part is a defect.

`inspect` is the only place a verdict is made; the pages, the CLI (`predict`, `evaluate`, `tune`), the batch
report and the API all call it, so they agree on the verdict, the regions and the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:  # the annotation needs no import at run time (recipe.py imports the registry's readers)
    from engine.recipe import Recipe

SCRATCH_ELONGATION = 4.0


@dataclass
class Region:
    """One connected defect region."""

    bbox: list[int]  # x, y, w, h
    area_px: int
    mean_score: float
    max_score: float
    elongation: float  # long side / short side of the minimum-area rectangle
    shape: str  # "scratch-like" or "spot-like"
    area_mm2: float | None = None  # set when the pixel size is known (recipe px_per_mm)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (area_mm2 only when known)."""
        result = {"bbox": self.bbox, "area_px": self.area_px, "mean_score": round(self.mean_score, 4),
                  "max_score": round(self.max_score, 4), "elongation": round(self.elongation, 2), "shape": self.shape}
        if self.area_mm2 is not None:
            result["area_mm2"] = round(self.area_mm2, 6)
        return result


@dataclass
class Inspection:
    """What a recipe makes of one probability map: the verdict, the regions that count and their mask."""

    verdict: str  # "ok" or "defect"
    regions: list[Region]  # the regions that count, largest first
    mask: np.ndarray  # uint8 0/1 of the counted regions (outlined down to the recipe's outline threshold, if any)
    probability: np.ndarray
    recipe: Recipe

    @property
    def flagged(self) -> bool:
        """Whether the part is rejected."""
        return self.verdict == "defect"

    @property
    def counted_fraction(self) -> float:
        """Share of the image covered by the counted regions."""
        return sum(r.area_px for r in self.regions) / max(self.probability.size, 1)

    def as_dict(self, timings_ms: dict[str, float] | None = None) -> dict[str, Any]:
        """The JSON answer of the API and `predict --json`: verdict, regions, fractions and the rules applied."""
        probability, recipe = self.probability, self.recipe
        height, width = probability.shape
        result = {
            "image": {"width": width, "height": height},
            "threshold": recipe.threshold,
            "verdict": self.verdict,
            "defect_fraction": round(float((probability >= recipe.threshold).mean()), 6),
            "counted_fraction": round(self.counted_fraction, 6),
            "max_score": round(float(probability.max()), 4),
            "regions": [r.as_dict() for r in self.regions],
            "timings_ms": dict(timings_ms or {}),
            "recipe": recipe.rules(),
        }
        if recipe.px_per_mm:
            result["defect_area_mm2"] = round(sum(r.area_mm2 or 0.0 for r in self.regions), 6)
        return result


def inspect(probability: np.ndarray, recipe: Recipe) -> Inspection:
    """The verdict of one probability map under a recipe.

    Regions at the threshold that reach their minimum area (per shape where the recipe says so) count, and so do
    smaller ones whose peak reaches the recipe's sure score, from its sure minimum area; any counted region makes
    a defect, unless the recipe tolerates a total defect fraction and they stay within it.
    """
    floor = min([recipe.min_region_px, *recipe.min_region_px_by_shape.values(),
                 *([recipe.sure_min_px] if recipe.sure_score is not None else [])])
    regions, mask = _regions(probability, recipe.threshold, floor, keep=lambda region: counts(region, recipe))
    if regions and recipe.outline_threshold is not None and recipe.outline_threshold < recipe.threshold:
        mask = outline(probability, mask, recipe.outline_threshold)
    if recipe.px_per_mm:
        for region in regions:
            region.area_mm2 = region.area_px / recipe.px_per_mm**2
    inspection = Inspection("defect" if regions else "ok", regions, mask, probability, recipe)
    if regions and recipe.max_total_defect_fraction is not None:
        if inspection.counted_fraction <= recipe.max_total_defect_fraction:
            inspection.verdict = "ok"
    return inspection


def outline(probability: np.ndarray, counted: np.ndarray, threshold: float) -> np.ndarray:
    """The uint8 0/1 mask of the regions at `threshold` that hold a counted pixel: each counted region grown to the
    pixels at or above the lower threshold connected to it."""
    count, labels = cv2.connectedComponents((probability >= threshold).astype(np.uint8), connectivity=8)
    keep = np.zeros(count, np.uint8)
    keep[np.unique(labels[counted > 0])] = 1
    keep[0] = 0
    return keep[labels]


def counts(region: Region, recipe: Recipe) -> bool:
    """Whether a region counts under a recipe: it reaches its minimum area, or its peak reaches the sure score and
    its area the sure minimum (a small defect the model is sure of)."""
    if region.area_px >= max(1, recipe.min_area_for(region.shape)):
        return True
    return (recipe.sure_score is not None and region.max_score >= recipe.sure_score
            and region.area_px >= max(1, recipe.sure_min_px))


def why_counted(region: Region, recipe: Recipe) -> str:
    """Why a counted region counts, in words ("140 px at peak 0.98, sure")."""
    by_area = region.area_px >= max(1, recipe.min_area_for(region.shape))
    rule = (f"at least {recipe.min_area_for(region.shape)} px" if by_area
            else f"peak at or above the sure score {recipe.sure_score:.4g}")
    return f"{region.area_px} px at peak {region.max_score:.2f} ({rule})"


def region_shape(elongation: float) -> str:
    """'scratch-like' for long thin regions (elongation >= 4), else 'spot-like'."""
    return "scratch-like" if elongation >= SCRATCH_ELONGATION else "spot-like"


def find_regions(probability: np.ndarray, threshold: float, min_region_px: int = 0) -> list[Region]:
    """Connected components of probability >= threshold with bbox, area, scores and shape, largest first."""
    return _regions(probability, threshold, min_region_px)[0]


def _regions(probability: np.ndarray, threshold: float, min_region_px: int,
             keep: Callable[[Region], bool] | None = None) -> tuple[list[Region], np.ndarray]:
    """find_regions (only those keep() accepts) and the uint8 0/1 mask of exactly those regions."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((probability >= threshold).astype(np.uint8),
                                                               connectivity=8)
    regions, kept = [], np.zeros(count, np.uint8)
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < max(1, min_region_px):
            continue
        inside = labels[y : y + h, x : x + w] == label
        scores = probability[y : y + h, x : x + w][inside]
        if area >= 3:
            # minAreaRect spans pixel centres; +1 gives the extent in pixels (a 5x40 bar is 5 by 40, not 4 by 39).
            (_, _), (rw, rh), _ = cv2.minAreaRect(np.argwhere(inside)[:, ::-1].astype(np.float32))
            rw, rh = rw + 1, rh + 1
        else:
            rw, rh = w, h
        elongation = max(rw, rh) / max(min(rw, rh), 1.0)
        region = Region([x, y, w, h], area, float(scores.mean()), float(scores.max()), elongation,
                        region_shape(elongation))
        if keep is None or keep(region):
            regions.append(region)
            kept[label] = 1
    return sorted(regions, key=lambda r: (-r.area_px, r.bbox[1], r.bbox[0])), kept[labels]
