"""Inspection recipes: the rules that turn a probability map into a verdict, and their storage (tuning: engine.tuning).

A recipe is stored per run as `runs/<run>/recipe.json` (the run folder stays self-describing) and mirrored in
the registry as an Artifact of kind "recipe" whose metrics_json is the recipe. Without a recipe file the run's
own threshold (run.json "threshold") is used with no area rule.

Verdict rules, in order:
1. pixels with probability >= threshold form connected regions (8-connectivity);
2. a region counts when its area is at least `min_region_px` (or the per-shape minimum for its shape);
3. the part is "defect" when at least one region counts and, if `max_total_defect_fraction` is set, the
   counted regions together cover more than that share of the image (a tolerance for small blemishes).
Where `outline_threshold` is set (below the threshold), the mask outlines each counted region down to it: the pixels
at or above it connected to the region (hysteresis, as in Canny's edges). The verdict and the regions' areas stay
the threshold's; only how much of a defect the mask covers changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import runs
from engine.errors import EngineError
from engine.runfolder import RECIPE_FILE, RunFolder
from engine.storage import atomic_write_json

SHAPES = ("scratch-like", "spot-like")
NEVER_PX = 2**31 - 1  # a minimum area no region reaches: with a sure tier, only regions the model is sure of count


class RecipeError(EngineError):
    """A recipe file or value is invalid."""


@dataclass
class Recipe:
    """Verdict rules for one model: threshold, minimum region size, optional tolerance and pixel size."""

    threshold: float = 0.5
    min_region_px: int = 0
    max_total_defect_fraction: float | None = None  # None: any counted region makes the part a defect
    px_per_mm: float | None = None  # pixels per millimetre; regions then get area_mm2
    min_region_px_by_shape: dict[str, int] = field(default_factory=dict)  # e.g. {"spot-like": 40}
    sure_score: float | None = None  # a region whose peak reaches this counts from sure_min_px (None: no sure tier)
    sure_min_px: int = 0
    outline_threshold: float | None = None  # a counted region's mask reaches down to it (None: the threshold's)
    source: str = "default"  # "default" (run threshold), "tuned", "manual"
    tuning: dict[str, Any] | None = None  # what `tune` measured when it chose these values

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RecipeError if a value is out of range."""
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            raise RecipeError(f"recipe threshold must be between 0 and 1, got {self.threshold!r}")
        self.threshold = float(self.threshold)
        self.min_region_px = _non_negative_int(self.min_region_px, "min_region_px")
        if self.max_total_defect_fraction is not None:
            value = self.max_total_defect_fraction
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise RecipeError(f"recipe max_total_defect_fraction must be between 0 and 1 or null, got {value!r}")
            self.max_total_defect_fraction = float(value)
        if self.px_per_mm is not None:
            if not isinstance(self.px_per_mm, (int, float)) or not math.isfinite(self.px_per_mm) or self.px_per_mm <= 0:
                raise RecipeError(f"recipe px_per_mm must be a positive number or null, got {self.px_per_mm!r}")
            self.px_per_mm = float(self.px_per_mm)
        if not isinstance(self.min_region_px_by_shape, dict):
            raise RecipeError("recipe min_region_px_by_shape must be an object such as {\"spot-like\": 40}")
        unknown = set(self.min_region_px_by_shape) - set(SHAPES)
        if unknown:
            raise RecipeError(f"recipe min_region_px_by_shape has unknown shape(s) {sorted(unknown)}; "
                              f"use {' or '.join(SHAPES)}")
        self.min_region_px_by_shape = {k: _non_negative_int(v, f"min_region_px_by_shape[{k}]")
                                       for k, v in self.min_region_px_by_shape.items()}
        if self.sure_score is not None:
            if not isinstance(self.sure_score, (int, float)) or not 0.0 < float(self.sure_score) <= 1.0:
                raise RecipeError(f"recipe sure_score must be above 0 and at most 1, or null, got {self.sure_score!r}")
            self.sure_score = float(self.sure_score)
        self.sure_min_px = _non_negative_int(self.sure_min_px, "sure_min_px")
        if self.outline_threshold is not None:
            value = self.outline_threshold
            if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise RecipeError(f"recipe outline_threshold must be above 0 and at most 1, or null, got {value!r}")
            self.outline_threshold = float(value)

    def min_area_for(self, shape: str) -> int:
        """Smallest area (px) a region of this shape needs to count."""
        return self.min_region_px_by_shape.get(shape, self.min_region_px)

    def describe(self) -> str:
        """The region rule in words ("threshold 0.90, min region 500 px, or 20 px where the peak reaches 0.99")."""
        main = "no region counts by area alone" if self.min_region_px >= NEVER_PX else f"min region {self.min_region_px} px"
        sure = (f", or {self.sure_min_px} px where its peak reaches {self.sure_score:.4g}"
                if self.sure_score is not None else "")
        outline = (f"; outlined down to {self.outline_threshold:.2f}" if self.outline_threshold is not None
                   and self.outline_threshold < self.threshold else "")
        return f"threshold {self.threshold:.2f}, {main}{sure}{outline}"

    def rules(self) -> dict[str, Any]:
        """The values that decide a verdict (what per-image results carry)."""
        return {"threshold": self.threshold, "min_region_px": self.min_region_px,
                "max_total_defect_fraction": self.max_total_defect_fraction, "px_per_mm": self.px_per_mm,
                "min_region_px_by_shape": dict(self.min_region_px_by_shape), "sure_score": self.sure_score,
                "sure_min_px": self.sure_min_px, "outline_threshold": self.outline_threshold, "source": self.source}

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field (what recipe.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Recipe from a dict; unknown keys are ignored (a newer version may add some)."""
        if not isinstance(data, dict):
            raise RecipeError("a recipe must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise RecipeError(f"invalid recipe: {err}") from err

    def with_overrides(self, **values: Any) -> "Recipe":
        """A copy with the given fields replaced (None values are ignored); source becomes "manual"."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        return dataclasses.replace(self, **values, source="manual")


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or int(value) != value:
        raise RecipeError(f"recipe {name} must be a whole number >= 0, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------- storage


def default_recipe(run_dir: Path) -> Recipe:
    """The recipe a run has without recipe.json: its stored threshold, no area rule."""
    return Recipe(threshold=runs.read_record(Path(run_dir)).threshold, source="default")


def load_recipe(run_dir: str | Path) -> Recipe:
    """The recipe of a run folder: runs/<run>/recipe.json, else the default from run.json."""
    run_dir = Path(run_dir)
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        return default_recipe(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecipeError(f"{path}: unreadable recipe ({err}); fix it, delete it or run `python -m engine tune`") from err
    try:
        return Recipe.from_dict(data)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from err


def verdict_threshold(run_dir: Path, fallback: float | None = None) -> float | None:
    """The threshold verdicts of this run use (its recipe's, as Inspect and the API apply it); `fallback` if the
    recipe cannot be read."""
    try:
        return load_recipe(run_dir).threshold
    except EngineError:
        return fallback


def save_recipe(run_dir: str | Path, recipe: Recipe) -> Path:
    """Write runs/<run>/recipe.json atomically and mirror the run into the registry (Artifact kind "recipe")."""
    from engine import (
        runstore,  # runstore imports the registry, which the inspection-only paths do not need
    )

    run_dir = Path(run_dir)
    recipe.validate()
    path = atomic_write_json(run_dir / RECIPE_FILE, recipe.as_dict())
    if RunFolder(run_dir).run_json.is_file():
        runstore.mirror(run_dir)
    return path
