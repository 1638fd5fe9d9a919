"""Segmentation and inspection metrics: Dice, IoU, precision/recall, image-level rates, threshold sweep."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import cv2
import numpy as np

from engine.errors import EngineError

EPS = 1e-9
FALSE_ALARM_GOAL = 0.05  # the share of good parts a run may flag, unless told otherwise (train, tune, the pages)
# A validation split vouches for a model only when it is large enough to rule out the worst: with none of its good
# images flagged, false alarms stay below EVIDENCE_FACTOR times the goal at 95 % confidence (16 good images for a
# 5 % goal), and it holds MIN_DEFECTIVE defective images (one found defect shows little about the next).
EVIDENCE_FACTOR = 3.0
MIN_DEFECTIVE = 3
DETECTION_GOAL = 0.9  # the share of defective parts a run must find on validation to be ready, unless told otherwise
# Defect size bands, by the share of the image an image's labelled defects cover (upper bounds, exclusive).
SIZE_BANDS = {"< 0.1 %": 0.001, "0.1-1 %": 0.01, "1-10 %": 0.1, "> 10 %": math.inf}


def size_band(fraction: float) -> str:
    """The SIZE_BANDS name of a defect covering `fraction` of its image."""
    return next(band for band, upper in SIZE_BANDS.items() if fraction < upper)


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


@dataclass
class SetMetrics:
    """Accumulates pixel totals and per-image results over a set of images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    per_image_dice: list[float] = field(default_factory=list)
    per_image_iou: list[float] = field(default_factory=list)
    defective_flagged: int = 0
    defective_total: int = 0
    clean_flagged: int = 0
    clean_total: int = 0
    unoutlined: int = 0  # defective images without a mask: verdicts only

    def add(self, pred: np.ndarray, truth: np.ndarray, flagged: bool, defective: bool | None = None) -> None:
        """Add one image's binary prediction, its ground truth, and whether the image was flagged (the verdict
        of inspection.inspect, which alone decides it). `defective` True with an empty truth is an image known to
        hold a defect whose pixels are not (sorted into a defect folder): it counts for the verdicts only."""
        pred, truth = pred.astype(bool), truth.astype(bool)
        n_pred, n_true = int(pred.sum()), int(truth.sum())
        if defective and n_true == 0:
            self.defective_total += 1
            self.defective_flagged += flagged
            self.unoutlined += 1
            return
        tp = int(np.logical_and(pred, truth).sum())
        self.tp += tp
        self.fp += n_pred - tp
        self.fn += n_true - tp
        self.per_image_dice.append(1.0 if n_pred + n_true == 0 else 2 * tp / (n_pred + n_true))
        union = n_pred + n_true - tp
        self.per_image_iou.append(1.0 if union == 0 else tp / union)
        if n_true > 0:
            self.defective_total += 1
            self.defective_flagged += flagged
        else:
            self.clean_total += 1
            self.clean_flagged += flagged

    def result(self) -> dict[str, float | int | None]:
        """Set-level metrics: pixel-total Dice/IoU/precision/recall, mean per-image Dice, image-level rates (pixel
        metrics are None where every defective image lacks an outline)."""
        denominator = 2 * self.tp + self.fp + self.fn
        no_pixels = self.unoutlined > 0 and self.unoutlined == self.defective_total
        pixel = {
            "dice": 1.0 if denominator == 0 else 2 * self.tp / denominator,
            "iou": 1.0 if denominator == 0 else self.tp / (self.tp + self.fp + self.fn),
            "precision": self.tp / (self.tp + self.fp) if self.tp + self.fp else None,
            "recall": self.tp / (self.tp + self.fn) if self.tp + self.fn else None,
            "mean_image_dice": float(np.mean(self.per_image_dice)) if self.per_image_dice else None,
            "mean_image_iou": float(np.mean(self.per_image_iou)) if self.per_image_iou else None,
        }
        return {
            **({key: None for key in pixel} if no_pixels else pixel),
            "detection_rate": self.defective_flagged / self.defective_total if self.defective_total else None,
            "false_alarm_rate": self.clean_flagged / self.clean_total if self.clean_total else None,
            "n_images": self.defective_total + self.clean_total,
            "n_defective": self.defective_total,
            "n_outlined_defective": self.defective_total - self.unoutlined,  # 0: pixel figures say nothing here
            "n_defect_free": self.clean_total,
            "n_detected": self.defective_flagged,
            "n_false_alarms": self.clean_flagged,
        }


def threshold_sweep(
    probabilities: list[np.ndarray], truths: list[np.ndarray], thresholds: np.ndarray | None = None
) -> list[dict[str, float]]:
    """Set-level pixel Dice and IoU at each threshold (no verdicts: those are inspection.inspect's)."""
    if thresholds is None:
        thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2)
    # Histogram each image's scores once for positive and negative pixels, then read off every threshold.
    bins = np.linspace(0.0, 1.0, 1001)
    pos_hist = np.zeros(1000, np.int64)
    neg_hist = np.zeros(1000, np.int64)
    for prob, truth in zip(probabilities, truths):
        truth = truth.astype(bool)
        pos_hist += np.histogram(prob[truth], bins=bins)[0]
        neg_hist += np.histogram(prob[~truth], bins=bins)[0]
    pos_above = np.cumsum(pos_hist[::-1])[::-1]  # pixels with score >= bin start
    neg_above = np.cumsum(neg_hist[::-1])[::-1]
    n_pos = int(pos_hist.sum())
    rows = []
    for t in thresholds:
        k = min(int(round(float(t) * 1000)), 999)
        tp, fp = int(pos_above[k]), int(neg_above[k])
        fn = n_pos - tp
        denominator = 2 * tp + fp + fn
        rows.append({
            "threshold": float(t),
            "dice": 1.0 if denominator == 0 else 2 * tp / denominator,
            "iou": 1.0 if denominator == 0 else tp / (tp + fp + fn),
        })
    return rows


def best_threshold(rows: list[dict[str, float]]) -> float:
    """Threshold with the highest Dice from a threshold_sweep (ties: the one closest to 0.5)."""
    best = max(rows, key=lambda r: (round(r["dice"], 4), -abs(r["threshold"] - 0.5)))
    return best["threshold"]


def image_score(probability: np.ndarray, threshold: float = 0.5) -> float:
    """How strongly an image looks defective, for ranking images (AP, AUROC): the area in px of its largest
    region at the threshold, plus its maximum probability (which orders images without a region).

    Verdicts count regions by area (the recipe's minimum area), so ranking by the largest region measures
    what a recipe can separate; a lone bright pixel, which tops a plain maximum, weighs little here.
    """
    top = float(probability.max()) if probability.size else 0.0
    if top < threshold:
        return top
    count, _, stats, _ = cv2.connectedComponentsWithStats((probability >= threshold).astype(np.uint8), connectivity=8)
    return float(stats[1:, cv2.CC_STAT_AREA].max()) + top


def average_precision(scores: list[float] | np.ndarray, labels: list[bool] | np.ndarray) -> float | None:
    """Image-level average precision (area under the step precision-recall curve); None unless both defective
    and defect-free images are present (with no defect-free image every ranking is perfect)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        return None
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # One point per distinct score: tied images enter the ranking together.
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(precision * recall_gain))


def auroc(scores: list[float] | np.ndarray, labels: list[bool] | np.ndarray) -> float | None:
    """Image-level area under the ROC curve (ties count half); None unless both classes are present."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def wilson_upper(failures: np.ndarray | float, n: int, confidence: float = 0.95) -> np.ndarray:
    """One-sided upper confidence bound of a rate measured as failures / n (Wilson score interval)."""
    if n <= 0:
        raise EngineError("a confidence bound needs at least one image")
    z = statistics.NormalDist().inv_cdf(confidence)
    rate = np.asarray(failures, np.float64) / n
    centre = rate + z * z / (2 * n)
    spread = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return np.minimum((centre + spread) / (1 + z * z / n), 1.0)


def _evidence_ceiling(max_false_alarm: float) -> float:
    return min(EVIDENCE_FACTOR * max(max_false_alarm, 0.01), 1.0)  # a goal of 0 asks the evidence of 1 %


def good_images_needed(max_false_alarm: float) -> int:
    """The fewest good images on which none flagged bounds false alarms (95 %) within EVIDENCE_FACTOR x the goal."""
    ceiling = _evidence_ceiling(max_false_alarm)
    z2 = statistics.NormalDist().inv_cdf(0.95) ** 2
    return max(1, math.ceil(z2 * (1 - ceiling) / ceiling - 1e-9))  # wilson_upper(0, n) = z2 / (n + z2)


def good_images_to_bound(flagged: int, max_false_alarm: float, confidence: float = 0.95,
                         most: int = 100_000) -> int | None:
    """The fewest good images on which `flagged` of them flagged keeps the upper confidence bound of false alarms
    within the goal; None where no number up to `most` does (a goal of 0 with a false alarm, say)."""
    low, high = max(flagged, 1), most
    if float(wilson_upper(flagged, high, confidence)) > max_false_alarm + 1e-9:
        return None
    while low < high:  # the bound falls as images are added at the same count flagged
        middle = (low + high) // 2
        if float(wilson_upper(flagged, middle, confidence)) <= max_false_alarm + 1e-9:
            high = middle
        else:
            low = middle + 1
    return low


def too_few_to_show(n_defective: int, n_defect_free: int, max_false_alarm: float,
                    where: str = "validation") -> str | None:
    """Why a labelled set (`where`) is too small to show that a model meets its goals, in words; None when it is not.
    A set without good images makes no claim on false alarms (a line where every part is defective)."""
    needed = good_images_needed(max_false_alarm)
    if n_defect_free and n_defect_free < needed:
        to_show = good_images_to_bound(0, max_false_alarm)  # None for a goal of 0: no number of images shows it
        shown = f", and {to_show}, none flagged, to show {max_false_alarm:.0%} itself" if to_show else ""
        return (f"{where} holds {n_defect_free} good image{'s' * (n_defect_free != 1)}, too few to vouch for the "
                f"{max_false_alarm:.0%} false-alarm goal (with none flagged, false alarms could still be "
                f"{float(wilson_upper(0, n_defect_free)):.0%} at 95 % confidence); it needs at least {needed} "
                f"to keep that within {_evidence_ceiling(max_false_alarm):.0%}{shown}")
    if n_defective < MIN_DEFECTIVE:
        return (f"{where} holds {n_defective} defective image{'s' * (n_defective != 1)}, too few to show that "
                f"the model finds defects (at least {MIN_DEFECTIVE})")
    return None


