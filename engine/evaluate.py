"""Evaluate a Predictor on a dataset split: set metrics, per-image results, threshold sweep."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import Sample, load_pair, scan_dataset
from engine.errors import DatasetError
from engine.inference import Predictor
from engine.metrics import SetMetrics, dice_score, iou_score, threshold_sweep


def select_samples(data: str | Path, split: str = "test") -> list[Sample]:
    """Samples of a dataset split (`all` for every image)."""
    report = scan_dataset(data)
    samples = report.samples if split == "all" else report.split(split)
    if not samples:
        raise DatasetError(f"{data}: no images in split '{split}' (splits: {report.counts()})")
    return samples


def evaluate(predictor: Predictor, samples: list[Sample], threshold: float | None = None,
             progress: Callable[[int, int], None] | None = None, keep_probabilities: bool = False) -> dict[str, Any]:
    """Metrics of a predictor over samples at each image's own resolution, plus one row per image."""
    threshold = predictor.threshold if threshold is None else threshold
    metrics = SetMetrics()
    per_image, probabilities, truths = [], [], []
    for i, sample in enumerate(samples):
        image, truth = load_pair(sample)
        probability = predictor.predict_proba(image)
        pred = probability >= threshold
        metrics.add(pred, truth)
        per_image.append({
            "id": sample.id, "dice": dice_score(pred, truth), "iou": iou_score(pred, truth),
            "has_defect": bool(truth.any()), "flagged": bool(pred.any()),
            "false_positive_px": int(np.logical_and(pred, truth == 0).sum()),
            "missed_px": int(np.logical_and(~pred, truth > 0).sum()),
            "max_score": float(probability.max()), "defect_types": sample.defect_types,
        })
        if keep_probabilities:
            probabilities.append(probability)
            truths.append(truth)
        if progress:
            progress(i + 1, len(samples))
    result = {**metrics.result(), "threshold": threshold, "model": predictor.describe(), "per_image": per_image}
    if keep_probabilities:
        result["sweep"] = threshold_sweep(probabilities, truths)
    return result
