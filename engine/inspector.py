"""One way from an image to a verdict: the run's recipe (read again when its file changes), the caller's
overrides, the model's probabilities and engine.inspection.inspect, the one place a verdict is made.

The API (serving.predict_bytes), the batch report, evaluate and the pages go through an Inspector; the Inspect
page, which keeps probability maps across threshold moves, takes `current_recipe` and calls `inspect` itself.
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from engine.inference import Prediction, Predictor
from engine.inspection import Inspection, inspect
from engine.recipe import Recipe, load_recipe
from engine.runfolder import RunFolder
from engine.storage import file_version


def recipe_version(run_dir: str | Path) -> tuple:
    """The version of what a run's recipe is read from: recipe.json, or run.json where there is none (the default
    recipe takes its threshold); a cache key that changes when `tune` saves a new recipe."""
    folder = RunFolder(Path(run_dir))
    for source, path in (("recipe", folder.recipe), ("default", folder.run_json)):
        try:
            return source, file_version(path)
        except FileNotFoundError:
            continue
    return "none", str(run_dir)


def current_recipe(run_dir: str | Path) -> Recipe:
    """The run's recipe as load_recipe reads it, read again only when its file changed (a copy: safe to change)."""
    return copy.deepcopy(_read_recipe(str(run_dir), recipe_version(run_dir)))


@lru_cache(maxsize=64)
def _read_recipe(run_dir: str, version: tuple) -> Recipe:  # version in the key: a rewritten recipe is re-read
    return load_recipe(run_dir)


class Inspector:
    """A Predictor with its run's recipe: load the recipe, apply overrides, predict, and inspect."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def recipe(self, **overrides: Any) -> Recipe:
        """The run's current recipe with the given fields replaced (None values ignored, as Recipe.with_overrides)."""
        return current_recipe(self.predictor.run_dir).with_overrides(**overrides)

    def inspect(self, image: np.ndarray, threshold: float | None = None, *, recipe: Recipe | None = None,
                **overrides: Any) -> tuple[Prediction, Inspection]:
        """Predict one image and inspect it under `recipe` (else the run's current recipe) with the threshold and
        other overrides applied; the Prediction's timings_ms holds "inference" and "inspect" (ms)."""
        rules = (recipe or current_recipe(self.predictor.run_dir)).with_overrides(threshold=threshold, **overrides)
        prediction = self.predictor.predict(image, rules.threshold)
        start = time.perf_counter()
        inspection = inspect(prediction.probability, rules)
        prediction.timings_ms["inspect"] = round((time.perf_counter() - start) * 1000, 2)
        return prediction, inspection
