"""Evaluate a Predictor on a dataset split: set metrics, per-image results, threshold sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine import runs
from engine.data import Sample, load_pair, scan_dataset
from engine.errors import DatasetError
from engine.inference import Predictor
from engine.inspection import Inspection, find_regions, why_counted
from engine.inspector import Inspector
from engine.metrics import (
    SIZE_BANDS,
    SetMetrics,
    auroc,
    average_precision,
    dice_score,
    image_score,
    iou_score,
    size_band,
    too_few_to_show,
)
from engine.progress import Progress
from engine.readiness import goal_missed
from engine.recipe import Recipe
from engine.tuning import TuneStats

# per_type keys of images whose manifest names no defect type
UNTYPED, DEFECT_FREE = "defect (type not given)", "defect-free"
SWEEP_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def select_samples(data: str | Path, split: str = "test") -> list[Sample]:
    """Samples of a dataset split (`all` for every image; a folder sorted by verdict has no splits: all of it)."""
    report = scan_dataset(data)
    samples = report.samples if split == "all" or report.sorted_by_folder else report.split(split)
    if not samples:
        raise DatasetError(f"{data}: no images in split '{split}' (splits: {report.counts()})")
    return samples


def evaluate(predictor: Predictor, samples: list[Sample], threshold: float | None = None,
             progress: Progress | None = None, sweep: bool = False,
             recipe: Recipe | None = None) -> dict[str, Any]:
    """Metrics of a predictor over samples at each image's own resolution, plus one row per image.

    Everything follows the run's inspection recipe (threshold and minimum region area), as `predict` and
    the API do: pixel metrics are computed on the mask of the regions that count, verdicts decide the
    detection and false-alarm rates, and images are ranked for AUROC and average precision by
    metrics.image_score at the recipe's threshold.
    """
    inspector = Inspector(predictor)
    recipe = (recipe or inspector.recipe()).with_overrides(threshold=threshold)
    metrics = SetMetrics()
    by_type: dict[str, SetMetrics] = {}  # an image counts for every defect type it holds
    by_size: dict[str, SetMetrics] = {}  # a defective image counts in the size band of its defects' share
    per_image = []
    # The sweep (Review's chart) uses tuning's grid at the recipe's region rule: the rates it shows are the
    # verdicts inspect would give at each threshold, gathered per image, so no probability map is kept.
    sure = [recipe.sure_score] if recipe.sure_score is not None else []
    stats = TuneStats(SWEEP_THRESHOLDS, {recipe.min_region_px, recipe.sure_min_px}, sure) if sweep else None
    for i, sample in enumerate(samples):
        image, truth = load_pair(sample)
        inspection = inspector.inspect(image, recipe=recipe)[1]
        probability = inspection.probability
        verdict, pred = inspection.verdict, inspection.mask.astype(bool)
        defective = sample.holds_defect(truth)
        metrics.add(pred, truth, flagged=verdict == "defect", defective=defective)
        untyped = UNTYPED if defective else DEFECT_FREE
        for defect_type in sample.kinds or (untyped,):
            by_type.setdefault(defect_type, SetMetrics()).add(pred, truth, flagged=verdict == "defect",
                                                              defective=defective)
        fraction = float(truth.astype(bool).mean())
        if fraction > 0:  # an image without its defect's pixels has no size
            by_size.setdefault(size_band(fraction), SetMetrics()).add(pred, truth, flagged=verdict == "defect")
        per_image.append(_image_row(sample, probability, truth, inspection, defective))
        if stats is not None:
            stats.add(probability, truth, defective)
        if progress:
            progress(i + 1, len(samples), "images")
    scores, labels = [row["score"] for row in per_image], [row["has_defect"] for row in per_image]
    result = {**metrics.result(), "auroc": auroc(scores, labels), "average_precision": average_precision(scores, labels),
              "threshold": recipe.threshold, "min_region_px": recipe.min_region_px, "recipe": recipe.rules(),
              "model": predictor.describe(), "per_image": per_image,
              "per_type": {name: _type_summary(m) for name, m in sorted(by_type.items())},
              "by_size": {band: _type_summary(by_size[band]) for band in SIZE_BANDS if band in by_size}}
    # Rates on a handful of images say little: where the set is too small to show the run's goals, say so.
    goal, goal_detection = runs.goals_of(predictor.run_dir)
    result["too_few"] = too_few_to_show(result["n_defective"], result["n_defect_free"], goal, "this set")
    # Readiness was judged on the run's validation; a set large enough to show that the run misses its goals says so.
    result["goal_missed"] = (goal_missed(result, goal, "on this set,", goal_detection)
                             if result["n_defective"] and result["too_few"] is None else None)
    if stats is not None:
        result["sweep"] = stats.rule_table(recipe)
    return result


def found_by_group(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Detection per defect kind and per size band of an evaluate result, one row each with counts (for tables)."""
    rows = [{"group": f"kind: {name}", "defective images": row["n_defective"], "found": row["n_detected"],
             "detection": row["detection_rate"]}
            for name, row in result["per_type"].items() if row["n_defective"]]
    return rows + [{"group": f"size: {band} of the image", "defective images": row["n_defective"],
                    "found": row["n_detected"], "detection": row["detection_rate"]}
                   for band, row in result["by_size"].items()]


def _image_row(sample: Sample, probability: np.ndarray, truth: np.ndarray, inspection: Inspection,
               defective: bool) -> dict[str, Any]:
    """One image's result: its verdict, pixel figures where its defect's pixels are known, and why regions counted
    or were dropped."""
    recipe, pred, flagged = inspection.recipe, inspection.mask.astype(bool), inspection.flagged
    outlined = sample.outlined  # an image sorted into a defect folder holds a defect whose pixels are unknown
    fraction = float(truth.astype(bool).mean())
    return {
        "id": sample.id, "dice": dice_score(pred, truth) if outlined else None,
        "iou": iou_score(pred, truth) if outlined else None, "has_defect": defective, "flagged": flagged,
        "false_positive_px": int(np.logical_and(pred, truth == 0).sum()) if outlined else None,
        "missed_px": int(np.logical_and(~pred, truth > 0).sum()) if outlined else None,
        "max_score": float(probability.max()), "score": image_score(probability, recipe.threshold),
        "regions": len(inspection.regions),
        "largest_region_px": max((r.area_px for r in inspection.regions), default=0),
        "defect_types": sample.defect_types, "kinds": list(sample.kinds), "defect_fraction": fraction,
        "size_band": size_band(fraction) if fraction > 0 else None,
        "counted": [why_counted(region, recipe) for region in inspection.regions[:5]],
        "dropped": None if flagged else _dropped(probability, recipe),
    }


def _dropped(probability: np.ndarray, recipe: Recipe) -> str | None:
    """Why a part with regions above the threshold was passed: the largest region the recipe's rule did not count
    (None where no score reaches the threshold)."""
    regions = find_regions(probability, recipe.threshold)
    if not regions:
        return None
    return (f"{len(regions)} region(s) at or above {recipe.threshold:.2f} not counted by the rule "
            f"({recipe.describe()}); the largest: {regions[0].area_px} px at peak {regions[0].max_score:.2f}")


def _type_summary(metrics: SetMetrics) -> dict[str, Any]:
    result = metrics.result()
    keys = ("dice", "iou", "mean_image_dice", "detection_rate", "false_alarm_rate", "n_images", "n_defective",
            "n_detected", "n_false_alarms")
    summary = {key: result[key] for key in keys}
    if not result["n_defective"]:  # nothing to segment: Dice would be 1 or 0 on a single stray pixel
        summary.update(dice=None, iou=None, mean_image_dice=None)
    return summary
