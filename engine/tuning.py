"""Tuning a run's recipe on labelled images: the grid of thresholds, minimum areas and sure tiers, the statistics
gathered once per image (TuneStats), the choice under the false-alarm goal, and `tune_run`, which saves the recipe
and has engine.readiness judge the run again."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine import readiness, runs
from engine.errors import EngineError
from engine.metrics import SIZE_BANDS, size_band, wilson_upper
from engine.progress import Progress
from engine.recipe import NEVER_PX, Recipe, RecipeError, load_recipe, save_recipe
from engine.runrecord import RunRecord, TuneResult

# Up to 0.95 in steps of 0.05, then 0.97-0.99: a well-trained model scores most pixels near 0 or 1.
DEFAULT_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2)) + (0.97, 0.98, 0.99)
DEFAULT_MIN_AREAS = (0, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)
# Peak scores at which a region smaller than the min area still counts (the sure tier), tuned with the rest.
DEFAULT_SURE_SCORES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def min_areas_at(scale: float) -> tuple[int, ...]:
    """The default minimum areas in px of the full-size image for a model that sees images resized by `scale`: the
    grid training tunes on at the model's scale, so a later tuning can reach every recipe training could."""
    return tuple(sorted({int(round(a / scale**2)) for a in DEFAULT_MIN_AREAS}))


class TuneStats:
    """What the recipe grid needs from each image, gathered once per image.

    The grid: threshold x minimum area x sure score x minimum area of sure regions (the sure axis 0 is "no sure
    tier"). Per image and threshold: the area of its largest region, and per sure score the area of its largest
    region that reaches it (together they decide whether the image is flagged at every cell). Per threshold, area
    bin and peak bin: summed region areas and true-defect pixels inside them (set-level Dice of the counted regions).
    Memory is O(images x thresholds x sure scores + thresholds x areas x sure scores).
    """

    def __init__(self, thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                 min_areas: Iterable[int] = DEFAULT_MIN_AREAS, sure_scores: Iterable[float] = ()) -> None:
        self.thresholds = np.asarray(sorted(set(float(t) for t in thresholds)), np.float64)
        self.sure_scores = np.asarray(sorted(set(float(s) for s in sure_scores)), np.float64)
        areas = set(int(a) for a in min_areas)
        if not len(self.thresholds) or not areas:
            raise RecipeError("tuning needs at least one threshold and one minimum area")
        if self.thresholds.min() < 0 or self.thresholds.max() > 1 or min(areas) < 0:
            raise RecipeError("tuning thresholds must lie in [0, 1] and minimum areas be >= 0")
        if len(self.sure_scores) and (self.sure_scores.min() <= 0 or self.sure_scores.max() > 1):
            raise RecipeError("tuning sure scores must lie in (0, 1]")
        # With a sure tier, "no other region counts" is a minimum area too: only sure regions flag a part.
        self.min_areas = np.asarray(sorted(areas | ({NEVER_PX} if len(self.sure_scores) else set())), np.int64)
        self._edges = np.maximum(self.min_areas, 1)  # a region has at least one pixel
        shape = (len(self.thresholds), len(self.min_areas), len(self.sure_scores) + 1)  # peak bin 0: below them all
        self._area_in_bin = np.zeros(shape, np.int64)
        self._hit_in_bin = np.zeros(shape, np.int64)
        self.largest: list[np.ndarray] = []  # per image: largest region area at each threshold
        self.largest_sure: list[np.ndarray] = []  # per image (T, S): largest area of the regions reaching each score
        self.has_defect: list[bool] = []
        self.kinds: list[tuple[str, ...]] = []  # per image: its defect kinds (empty for a good one or none named)
        self.fractions: list[float] = []  # per image: share of the image its labelled defects cover
        self.truth_px = 0
        self._good_area: dict[int, np.ndarray] = {}  # per good image: its region areas by bin (to leave it out)
        self.unoutlined = 0  # defective images without a mask (counted for detection, not Dice)

    def add(self, probability: np.ndarray, truth: np.ndarray, defective: bool | None = None,
            kinds: Iterable[str] = ()) -> None:
        """Add one image's probability map and ground-truth mask; `defective` True with an empty mask is an image
        known to hold a defect whose pixels are not (sorted into a defect folder): it counts for detection only.
        `kinds` names its defect kinds, for detection per kind."""
        truth = truth.astype(bool)
        defective = bool(truth.any()) or bool(defective)
        if defective and not truth.any():
            self.unoutlined += 1
        largest = np.zeros(len(self.thresholds), np.int64)
        largest_sure = np.zeros((len(self.thresholds), len(self.sure_scores)), np.int64)
        area_before = None if defective else self._area_in_bin.copy()
        top = float(probability.max()) if probability.size else 0.0
        for i, threshold in enumerate(self.thresholds):
            if threshold > top:
                break  # thresholds are ascending: nothing above this one either
            count, labels, stats, _ = cv2.connectedComponentsWithStats((probability >= threshold).astype(np.uint8),
                                                                       connectivity=8)
            if count <= 1:
                continue
            areas = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
            hits = np.bincount(labels[truth], minlength=count)[1:]
            # A region's peak bin: how many sure scores its highest pixel reaches (scores ascend, so they nest).
            peaks = sum(((np.bincount(labels[probability >= s], minlength=count)[1:] > 0).astype(np.int64)
                         for s in self.sure_scores if s <= top), np.zeros_like(areas))
            largest[i] = areas.max()
            for s in range(len(self.sure_scores)):
                reaching = areas[peaks > s]
                largest_sure[i, s] = reaching.max() if len(reaching) else 0
            if defective and not truth.any():
                continue  # its regions are neither hits nor false positives: Dice leaves it out
            # Bin each region by the largest min-area it still passes; suffix sums later give "area >= a".
            bins = np.searchsorted(self._edges, areas, side="right") - 1
            ok = bins >= 0
            np.add.at(self._area_in_bin[i], (bins[ok], peaks[ok]), areas[ok])
            np.add.at(self._hit_in_bin[i], (bins[ok], peaks[ok]), hits[ok])
        if area_before is not None:
            self._good_area[len(self.largest)] = (self._area_in_bin - area_before).astype(np.int32)
        self.largest.append(largest)
        self.largest_sure.append(largest_sure)
        self.has_defect.append(defective)
        self.kinds.append(tuple(kinds) if defective else ())
        self.fractions.append(float(truth.mean()) if truth.size else 0.0)
        self.truth_px += int(truth.sum())

    def without(self, positions: Iterable[int]) -> "TuneStats":
        """These statistics with some of the good images (by position) left out."""
        left_out = set(positions)
        if any(self.has_defect[k] for k in left_out):
            raise RecipeError("only good images can be left out of tuning statistics")
        kept = copy.copy(self)
        for name in ("largest", "largest_sure", "has_defect", "kinds", "fractions"):
            setattr(kept, name, [v for k, v in enumerate(getattr(self, name)) if k not in left_out])
        kept._area_in_bin = self._area_in_bin - sum((self._good_area[k] for k in left_out), np.zeros_like(
            self._area_in_bin))
        kept._good_area = {}  # positions have moved; a copy is not left out of again
        return kept

    def without_sure_tier(self) -> "TuneStats":
        """These statistics with no sure tier in the grid (a single minimum area), for comparison."""
        if not len(self.sure_scores):
            return self
        plain = copy.copy(self)
        plain.sure_scores = np.zeros(0)
        plain.min_areas, plain._edges = self.min_areas[:-1], self._edges[:-1]  # NEVER_PX is the last
        plain._area_in_bin = self._area_in_bin[:, :-1].sum(axis=2, keepdims=True)
        plain._hit_in_bin = self._hit_in_bin[:, :-1].sum(axis=2, keepdims=True)
        plain.largest_sure = [np.zeros((len(self.thresholds), 0), np.int64) for _ in self.largest]
        plain._good_area = {}
        return plain

    def flagged(self, chosen: TuneResult) -> np.ndarray:
        """Per image, whether the recipe cell `chosen` (a `best` result, or a Recipe's rules) flags it."""
        t = int(np.searchsorted(self.thresholds, chosen["threshold"] - 1e-9))
        flags = np.stack(self.largest)[:, t] >= max(chosen["min_region_px"], 1)
        if chosen.get("sure_score") is not None:
            s = int(np.searchsorted(self.sure_scores, chosen["sure_score"] - 1e-9))
            flags |= np.stack(self.largest_sure)[:, t, s] >= max(chosen.get("sure_min_px") or 0, 1)
        return flags

    def held_out_false_alarm_rate(self, max_false_alarm: float, confidence: float | None = None,
                                  cautious: bool = False) -> float | None:
        """False alarms of the recipe rule (best) on good images it was not chosen on, two-fold: the good images are
        split alternately in two halves, a recipe is chosen without one half, and that half is judged under it. A
        recipe chosen on the very images that judge it can stop just short of each of them; this rate cannot.
        None where there are fewer than two good images or no defective one."""
        good = [k for k, defective in enumerate(self.has_defect) if not defective]
        if len(good) < 2 or len(good) == len(self.has_defect):
            return None
        flagged = 0
        for held in (good[0::2], good[1::2]):
            chosen = self.without(held).best(max_false_alarm, confidence, cautious)
            flagged += int(self.flagged(chosen)[held].sum())
        return round(flagged / len(good), 6)

    def breakdown(self, chosen: TuneResult) -> TuneResult:
        """Defective images found under the recipe cell `chosen`, per kind and per size band, with counts."""
        flags = self.flagged(chosen)
        per_kind: dict[str, dict[str, int]] = {}
        by_size: dict[str, dict[str, int]] = {band: {"n": 0, "found": 0} for band in SIZE_BANDS}
        for k, defective in enumerate(self.has_defect):
            if not defective:
                continue
            for kind in self.kinds[k]:
                counts = per_kind.setdefault(kind, {"n": 0, "found": 0})
                counts["n"], counts["found"] = counts["n"] + 1, counts["found"] + int(flags[k])
            if self.fractions[k] > 0:  # an image without its defect's pixels has no size
                band = by_size[size_band(self.fractions[k])]
                band["n"], band["found"] = band["n"] + 1, band["found"] + int(flags[k])
        return {"per_kind": dict(sorted(per_kind.items())), "by_size": {b: c for b, c in by_size.items() if c["n"]}}

    def _full_grid(self) -> dict[str, np.ndarray]:
        """Detection, false alarms and Dice at every cell, each of shape (T, A, S + 1, A); `valid` marks the cells
        that are distinct rules that can flag a part (without a sure tier, its minimum area means nothing)."""
        if not self.largest:
            raise RecipeError("no images were added to the tuning statistics")
        n_sure, edges = len(self.sure_scores), self._edges
        main = np.stack(self.largest)[:, :, None] >= edges  # (N, T, A)
        sure = np.stack(self.largest_sure)[:, :, :, None] >= edges  # (N, T, S, A)
        no_tier = np.zeros((*sure.shape[:2], 1, sure.shape[3]), bool)
        flagged = main[:, :, :, None, None] | np.concatenate([no_tier, sure], axis=2)[:, :, None]  # (N, T, A, S+1, A)
        defective = np.asarray(self.has_defect)
        with np.errstate(invalid="ignore"):
            detection = flagged[defective].mean(axis=0) if defective.any() else np.full(flagged.shape[1:], np.nan)
            false_alarm = flagged[~defective].mean(axis=0) if (~defective).any() else np.full(flagged.shape[1:], np.nan)
        # A region in area bin a and peak bin b counts at (A, S, As) when a >= A, or S > 0, b >= S and a >= As.
        a, b, big, s, small = np.ix_(*(np.arange(n) for n in (len(edges), n_sure + 1, len(edges), n_sure + 1,
                                                               len(edges))))
        counts = (a >= big) | ((s > 0) & (b >= s) & (a >= small))
        predicted = np.einsum("tab,abxyz->txyz", self._area_in_bin, counts)
        hit = np.einsum("tab,abxyz->txyz", self._hit_in_bin, counts)
        denominator = predicted + self.truth_px
        dice = np.where(denominator > 0, 2 * hit / np.maximum(denominator, 1), 1.0)
        if self.unoutlined and self.unoutlined == sum(self.has_defect):
            dice = np.full(dice.shape, np.nan)  # no defect's pixels are known
        valid = np.ones(dice.shape, bool)
        valid[:, :, 0, 1:] = False
        never = self.min_areas >= NEVER_PX
        valid[:, never, 0, :] = False  # no tier and no area: a rule that flags nothing
        valid[:, :, :, never] = False  # a sure tier from a size no region reaches adds nothing
        return {"detection_rate": detection, "false_alarm_rate": false_alarm, "dice": dice, "valid": valid}

    def grid(self) -> dict[str, np.ndarray]:
        """Detection rate, false-alarm rate and Dice for every (threshold, min area) without a sure tier, (T, A)."""
        real = self.min_areas < NEVER_PX
        return {k: v[:, real, 0, 0] for k, v in self._full_grid().items() if k != "valid"}

    def table(self) -> list[dict[str, float]]:
        """One row per (threshold, min area) without a sure tier, with its rates and Dice."""
        grid = self.grid()
        areas = self.min_areas[self.min_areas < NEVER_PX]
        return [{"threshold": float(t), "min_region_px": int(a),
                 **{k: _clean(v[i, j]) for k, v in grid.items()}}
                for i, t in enumerate(self.thresholds) for j, a in enumerate(areas)]

    def rule_table(self, recipe: Recipe) -> list[dict[str, float]]:
        """One row per threshold with the rates and Dice of the recipe's region rule at it (its minimum area and sure
        tier, which must be on the grid): what the verdicts of inspect would be at each threshold. Dice is of the
        regions at the threshold, not outlined (the outline moves no verdict)."""
        a = int(np.searchsorted(self.min_areas, recipe.min_region_px))
        s = 0 if recipe.sure_score is None else 1 + int(np.searchsorted(self.sure_scores, recipe.sure_score - 1e-12))
        small = int(np.searchsorted(self.min_areas, recipe.sure_min_px)) if s else 0
        on_grid = a < len(self.min_areas) and self.min_areas[a] == recipe.min_region_px and (
            not s or (s <= len(self.sure_scores) and self.min_areas[small] == recipe.sure_min_px))
        if not on_grid:
            raise RecipeError("the recipe's region rule is not on this tuning grid")
        grid = self._full_grid()
        return [{"threshold": float(t), "min_region_px": recipe.min_region_px,
                 **{k: _clean(v[i, a, s, small]) for k, v in grid.items() if k != "valid"}}
                for i, t in enumerate(self.thresholds)]

    @staticmethod
    def _tied_verdicts(feasible: np.ndarray, detection: np.ndarray, false_alarm: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The cells that tie with the best on verdicts (feasible, most detections, then fewest false alarms), and
        each one's distance in grid steps from the nearest end of its run of tied min areas (axis 1; a run: detection
        and false alarms only fall as the min area grows)."""
        detection, false_alarm = np.round(detection, 9), np.round(false_alarm, 9)
        top = detection[feasible].max()
        tied = feasible & (detection == top) & (false_alarm == false_alarm[feasible & (detection == top)].min())
        rows = np.moveaxis(tied, 1, -1).reshape(-1, tied.shape[1])
        margin = np.zeros(rows.shape, np.int64)
        for i in np.flatnonzero(rows.any(axis=1)):
            run = np.flatnonzero(rows[i])
            margin[i, run] = np.minimum(run - run[0], run[-1] - run)
        return tied, np.moveaxis(margin.reshape(np.moveaxis(tied, 1, -1).shape), -1, 1)

    def _order(self, grid: dict[str, np.ndarray], feasible: np.ndarray, detection: np.ndarray,
               false_alarm: np.ndarray, cautious: bool, measured: bool) -> np.ndarray:
        """The grid's cells (flat indices) in best's order of preference, the best first."""
        t, a, s, small = (index.ravel() for index in np.indices(feasible.shape))
        thresholds, areas, smalls = self.thresholds[t], self.min_areas[a], self.min_areas[small]
        sure = s > 0
        # np.lexsort sorts by the last key first; negate what should be largest.
        if cautious:  # the most cautious cell within one standard error of the most detections
            top = detection[feasible].max()
            within = feasible & (detection >= top - math.sqrt(top * (1 - top) / sum(self.has_defect)) - 1e-9)
            order = np.lexsort((-thresholds, -s, -smalls, -areas, sure, np.round(detection, 9).ravel(),
                                np.round(false_alarm, 9).ravel(), ~within.ravel()))
        else:
            tied, margin = self._tied_verdicts(feasible, detection, false_alarm)
            dice = np.where(tied, np.round(np.nan_to_num(grid["dice"], nan=0.0), 6), -1.0)
            nearer_half = np.abs(thresholds - 0.5)
            if measured:
                row_dice = np.broadcast_to(dice.max(axis=1, keepdims=True), dice.shape).ravel()
                order = np.lexsort((nearer_half, -s, -smalls, -areas, -margin.ravel(), -row_dice, sure,
                                    ~tied.ravel()))
            else:  # every part defective: no good images' regions to keep away from, so the best Dice
                order = np.lexsort((nearer_half, smalls, areas, -dice.ravel(), sure, ~tied.ravel()))
        return order

    def best(self, max_false_alarm: float, confidence: float | None = None, cautious: bool = False) -> TuneResult:
        """Highest detection rate with false-alarm rate <= max_false_alarm, then fewest false alarms; of the
        recipes that tie on those verdicts, one without a sure tier where one ties, then the threshold with the
        highest Dice and, at it, the min area midway along the run of tied ones (nearer the larger; then the
        threshold nearer 0.5). The smallest tied area sits at the edge of the regions validation's good images show,
        the largest at the edge of its defects', and a new day's parts vary more than either (where validation's
        good images are clean, every area from 0 ties). Where no image is defect-free (false alarms not measured),
        the tie goes to the highest Dice, then the smaller min area. `goal_met` False when no cell meets the goal.

        A sure tier (sure_score, sure_min_px) also counts a region smaller than the min area whose peak reaches the
        sure score: small defects the model is sure of are kept while larger, fainter marks of good parts are not.

        With `confidence` (e.g. 0.95) the goal applies to the upper confidence bound of the false-alarm rate
        rather than the rate measured on these images, so the recipe keeps the goal on new parts too.
        With `cautious`, of the cells within one standard error of the highest detection rate the most cautious one
        wins (fewest false alarms, then fewest detections, no sure tier, largest min area, highest threshold): for
        detection measured on a stand-in (painted defects), whose small differences say little about real defects,
        while the good parts of a new day vary more than validation's (the one-standard-error rule).
        """
        if not any(self.has_defect):
            raise RecipeError("none of the tuning images has a defect, so detection cannot be measured; "
                              "tune on a split with defective images")
        if confidence is not None and not 0.5 <= confidence < 1.0:
            raise RecipeError(f"confidence must be at least 0.5 and below 1, got {confidence!r}")
        grid = self._full_grid()
        valid = grid["valid"]
        detection = np.nan_to_num(grid["detection_rate"], nan=0.0)
        false_alarm = grid["false_alarm_rate"]
        measured = not np.isnan(false_alarm).all()
        false_alarm = np.nan_to_num(false_alarm, nan=0.0)
        n_clean = len(self.has_defect) - int(sum(self.has_defect))
        bound = (wilson_upper(false_alarm * n_clean, n_clean, confidence or 0.95) if n_clean
                 else np.full_like(false_alarm, np.nan))
        on_bound = confidence is not None and n_clean > 0
        feasible = valid & ((bound if on_bound else false_alarm) <= max_false_alarm + 1e-9)
        goal_met = bool(feasible.any())
        if not goal_met:  # nothing meets the goal: fewest false alarms first
            feasible = valid & (false_alarm <= false_alarm[valid].min() + 1e-9)
        order = self._order(grid, feasible, detection, false_alarm, cautious, measured)
        cell = np.unravel_index(order[0], valid.shape)
        i, j, k = cell[0], cell[1], cell[2]
        return {"threshold": float(self.thresholds[i]), "min_region_px": int(self.min_areas[j]),
                "sure_score": float(self.sure_scores[k - 1]) if k else None,
                "sure_min_px": int(self.min_areas[cell[3]]) if k else 0,
                "detection_rate": _clean(grid["detection_rate"][cell]),
                "false_alarm_rate": _clean(grid["false_alarm_rate"][cell]), "dice": _clean(grid["dice"][cell]),
                "false_alarm_bound": _clean(bound[cell]), "confidence": confidence or 0.95,
                "goal_on": "bound" if on_bound else "measured", "goal_met": goal_met, "cautious": cautious,
                "false_alarms_measured": measured, "max_false_alarm": max_false_alarm,
                "n_images": len(self.has_defect), "n_defective": int(sum(self.has_defect)),
                "n_defect_free": len(self.has_defect) - int(sum(self.has_defect))}


def _clean(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


def collect_stats(predictor: Any, samples: list[Any], thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                  min_areas: Iterable[int] = DEFAULT_MIN_AREAS, sure_scores: Iterable[float] = (),
                  progress: Progress | None = None) -> TuneStats:
    """Predict each sample once and gather the tuning statistics (the grid is then evaluated without the model)."""
    from engine.data import load_pair

    stats = TuneStats(thresholds, min_areas, sure_scores)
    for index, sample in enumerate(samples):
        image, truth = load_pair(sample)
        stats.add(predictor.predict_proba(image), truth, defective=sample.holds_defect(truth), kinds=sample.kinds)
        if progress:
            progress(index + 1, len(samples), "images")
    return stats


def add_outline(best: TuneResult, dice_threshold: float) -> TuneResult:
    """Give a chosen recipe its outline threshold: the run's best-Dice threshold on validation, where that lies below
    the recipe's own (a recipe raised above it to hold false alarms down would otherwise show only the cores of the
    defects it finds). Returns `best`."""
    best["outline_threshold"] = round(dice_threshold, 6) if dice_threshold < best["threshold"] - 1e-9 else None
    return best


def tuned_recipe(best: TuneResult, base: Recipe, context: dict[str, Any] | None = None) -> Recipe:
    """The recipe `tune` saves: the chosen threshold and min area, the base's pixel size, no other rules."""
    tuning = {k: best[k] for k in ("detection_rate", "false_alarm_rate", "false_alarm_bound", "confidence", "goal_on",
                                   "dice", "goal_met", "max_false_alarm", "n_images", "n_defective", "n_defect_free")}
    tuning["cautious"] = best.get("cautious", False)
    for key in ("held_out_false_alarm_rate", "per_kind", "by_size", "goal_detection"):
        if best.get(key) is not None:
            tuning[key] = best[key]
    tuning.update(context or {})
    tuning["tuned_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Recipe(threshold=best["threshold"], min_region_px=best["min_region_px"], px_per_mm=base.px_per_mm,
                  sure_score=best.get("sure_score"), sure_min_px=best.get("sure_min_px") or 0,
                  outline_threshold=best.get("outline_threshold"), source="tuned", tuning=tuning)


def tuning_warnings(best: TuneResult, base: Recipe) -> list[str]:
    """What the user should know about a tuning result: goal not met, false alarms not measurable, rules dropped."""
    notes = []
    if not best["false_alarms_measured"]:
        notes.append("these images hold no defect-free part, so false alarms cannot be measured; "
                     "the setting was picked by detection rate, then Dice")
    elif not best["goal_met"]:
        what = (f"the {best['confidence']:.0%} upper bound of false alarms" if best["goal_on"] == "bound"
                else "false alarms")
        notes.append(f"no setting keeps {what} at or below {best['max_false_alarm']:.3f}; "
                     "picked the fewest false alarms")
    if base.min_region_px_by_shape or base.max_total_defect_fraction is not None:
        notes.append("the per-shape minimum areas and the defect-fraction tolerance of the old recipe were not "
                     "tuned and are dropped")
    return notes


def tune_run(predictor: Any, samples: list[Any], max_false_alarm: float | None = None, confidence: float | None = None,
             thresholds: Iterable[float] = DEFAULT_THRESHOLDS, min_areas: Iterable[int] | None = None,
             context: dict[str, Any] | None = None, save: bool = True,
             progress: Progress | None = None, goal_detection: float | None = None,
             sure_scores: Iterable[float] = DEFAULT_SURE_SCORES) -> tuple[Recipe, TuneResult, list[str]]:
    """Tune a run's recipe on labelled samples and (unless save=False) store it; returns recipe, result, warnings.
    The result's "readiness" says, in words, how the tuning decided the run's readiness, where it does, and its
    "per_kind" and "by_size" the defective images found per kind and size band.
    Without `max_false_alarm` and `goal_detection` the goals are the ones the run was trained to
    (runs.false_alarm_goal, runs.detection_goal); without `min_areas` the grid training tunes on, at the run's scale
    (min_areas_at). Images that
    training saw (data.seen_in_training) are left out, with a warning."""
    from engine.data import seen_in_training

    try:
        record = runs.read_record(predictor.run_dir)
    except EngineError:
        record = RunRecord()
    if max_false_alarm is None:
        max_false_alarm = readiness.false_alarm_goal(record)
    goal_detection = readiness.detection_goal(record) if goal_detection is None else goal_detection
    seen_samples = seen_in_training(record.dataset.path or None, samples)
    seen = {id(s) for s in seen_samples}
    if seen and len(seen) == len(samples):
        raise RecipeError(f"all {len(samples)} tuning images are images training saw (its train and val splits); "
                          "tune on labelled images it did not see, e.g. --split test")
    kept = [s for s in samples if id(s) not in seen]
    min_areas = min_areas_at(predictor.scale) if min_areas is None else min_areas
    stats = collect_stats(predictor, kept, thresholds, min_areas, sure_scores, progress=progress)
    best = add_outline(stats.best(max_false_alarm, confidence), predictor.threshold)
    best["held_out_false_alarm_rate"] = stats.held_out_false_alarm_rate(max_false_alarm, confidence)
    best.update(stats.breakdown(best), goal_detection=goal_detection)
    if best["sure_score"] is not None:  # what a single minimum area would have found, kind by kind
        plain = stats.without_sure_tier().best(max_false_alarm, confidence)
        best["without_sure_tier"] = {"recipe": Recipe(plain["threshold"], plain["min_region_px"]).describe(),
                                     "detection_rate": plain["detection_rate"], **stats.breakdown(plain)}
    base = load_recipe(predictor.run_dir)
    tuned = tuned_recipe(best, base, {**(context or {}), "model": predictor.describe(), "left_out_seen": len(seen)})
    if save:
        save_recipe(predictor.run_dir, tuned)
        best["readiness"] = _judge_by_tuning(predictor.run_dir, best, max_false_alarm,
                                             _tuned_on_kind((context or {}).get("data"), kept))
    named = [s.id for s in seen_samples]
    notes = [f"{len(seen)} of the {len(samples)} tuning images are images training saw (its train and val splits, "
             f"the same bytes); they were left out: {', '.join(named[:5])}{' ...' if len(named) > 5 else ''}"
             ] if seen else []
    return tuned, best, notes + tuning_warnings(best, base)


def _tuned_on_kind(data: str | None, samples: list[Any]) -> str:
    """What a tuning's images are, in words (runstore.images_kind): of the folder tuned on, else of the samples'
    folders (DIR/images/x.png, or a folder of a set sorted by verdict)."""
    from engine import runstore

    if data:
        return runstore.images_kind(data)
    folders = {s.image_path.parent.parent if s.image_path.parent.name == "images" else s.image_path.parent
               for s in samples}
    return " and ".join(sorted({runstore.images_kind(folder) for folder in folders})) or "real images"


def _judge_by_tuning(run_dir: Path, best: TuneResult, max_false_alarm: float,
                     kind: str = "real images") -> str | None:
    """Record a finished run's readiness after a tuning (readiness.after_tuning) in its run.json; returns what it
    is now, in words, or None where the tuning does not decide."""
    from engine import runstore  # the registry is not needed on inspection-only paths

    try:
        record = runs.read_record(run_dir)
    except EngineError:
        return None
    judged = readiness.after_tuning(record, best, max_false_alarm, kind)
    if judged is None:
        return None
    now, tuned_on = judged
    runstore.update(run_dir, ready=now.ready, ready_reason=now.reason, tuned_on=tuned_on)
    before, _ = readiness.verdict(record)
    change = ("still" if before else "now") if now.ready else ("no longer" if before else "not")
    reason = (now.reason or "").removeprefix(f"tuned on {kind}: ")
    return (f"run {run_dir.name} is {change} ready (tuned on {kind})" if now.ready
            else f"run {run_dir.name} is {change} ready (tuned on {kind}): {reason}")
