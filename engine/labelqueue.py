"""The label queue: a dataset's unlabelled images ranked by how unsure the run is of them, each with why.

Three signs, strongest first: a wrong verdict where the image's truth is known (the Review page's misses and false
alarms); disagreement between the best epoch and an earlier one (their verdicts differ under the recipe); and
the image's top score nearest the recipe's threshold. Where the run validated on no real defect (a run on good
parts), doubt alone fills the queue with good parts near the threshold, while what the fine-tune needs first is
real defects to learn from and to show its detection on (labels.defects_wanted): so the likeliest defects (_likelihood)
come right after the wrong verdicts, as many as it wants. Ranking (rank) is apart from predicting (score_images), so
that it can be checked on hand-made scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import runs
from engine.data import Sample, load_pair, scan_dataset
from engine.errors import DatasetError
from engine.imageio import encode_png
from engine.inference import Predictor
from engine.inspection import inspect
from engine.labels import defects_wanted, labelled_sources
from engine.progress import Progress
from engine.recipe import load_recipe


@dataclass
class Scored:
    """What the run says of one image: its top score and verdict at the best epoch and an earlier one, and its
    truth where the dataset knows it (None: unlabelled)."""

    id: str
    path: str
    top: float
    flagged: bool
    area: int = 0  # pixels of the regions the recipe counts (0 where none does)
    hot_px: int = 0  # pixels at or above the recipe's threshold, counted or not
    earlier_top: float | None = None
    earlier_flagged: bool | None = None
    truth: bool | None = None
    mask_png: bytes | None = field(default=None, repr=False)  # the best epoch's mask under the recipe, when kept


COLUMNS = ("rank", "id", "path", "score", "verdict", "reason")  # what the CLI prints of each image


@dataclass
class QueueItem:
    """One image of the queue: where it is, what the run says, and why it comes at this place."""

    rank: int
    id: str
    path: str
    score: float
    verdict: str
    reason: str
    mask_png: bytes | None = field(default=None, repr=False)  # the run's mask, the Label page's starting point


def _reason(item: Scored, threshold: float, earlier_epoch: int | None, likely: bool,
            defects_wanted: int) -> tuple[tuple, str]:
    """(sort key, reason) of one image: wrong verdicts first, then the likeliest defects where they are wanted, then
    epochs that disagree, then the nearest score."""
    margin = abs(item.top - threshold)
    side = "above" if item.top >= threshold else "below"
    near = f"top score {item.top:.3f} is {margin:.3f} {side} the threshold {threshold:.3f}"
    wrong = item.truth is not None and item.truth != item.flagged
    disagree = item.earlier_flagged is not None and item.earlier_flagged != item.flagged
    if wrong:
        what = "missed a labelled defect" if item.truth else "flagged a part labelled good"
        return (0, margin), f"wrong verdict: the run {what} ({near})"
    if likely:
        seen = (f"flagged, {item.area:,} px counted" if item.flagged
                else f"not flagged, {item.hot_px:,} px at or above the threshold")
        return (1, *_likelihood(item)), (f"likely defect ({seen}, top score {item.top:.3f}): the run validated "
                                            f"on no real defect, and a fine-tune needs {defects_wanted} to learn "
                                            "from and to show its detection")
    if disagree:
        now, then = ("defect" if item.flagged else "ok"), ("defect" if item.earlier_flagged else "ok")
        return (2, margin), (f"epochs disagree: the best says {now} ({item.top:.2f}), epoch {earlier_epoch} said "
                             f"{then} ({item.earlier_top:.2f})")
    return (3, margin), near


def _likelihood(item: Scored) -> tuple[bool, int, int, float]:
    """Sort key of how likely an image holds a defect, likeliest first."""
    return not item.flagged, -item.area, -item.hot_px, -item.top


def _likeliest(scored: list[Scored], n: int) -> set[str]:
    """Ids of the n images likeliest to hold a defect, of those whose truth is unknown: flagged before not, then
    the largest counted area, then the most pixels at or above the threshold (a recipe that flags next to nothing,
    as a run on good parts may choose, still ranks by them), then the top score."""
    unknown = sorted((item for item in scored if item.truth is None), key=lambda item: (*_likelihood(item), item.id))
    return {item.id for item in unknown[:n]}


def rank(scored: list[Scored], threshold: float, top: int | None = None,
         earlier_epoch: int | None = None, defects_wanted: int = 0) -> list[QueueItem]:
    """The queue: images ordered by how unsure the run is (wrong verdict, then the `defects_wanted` likeliest
    defects, then epochs disagreeing, then the score nearest the threshold; ties by id), the first `top` of them."""
    likely = _likeliest(scored, defects_wanted)
    keyed = sorted(((*_reason(item, threshold, earlier_epoch, item.id in likely, defects_wanted), item)
                    for item in scored), key=lambda entry: (entry[0], entry[2].id))
    return [QueueItem(i + 1, item.id, item.path, round(item.top, 4), "defect" if item.flagged else "ok", reason,
                      item.mask_png) for i, (_, reason, item) in enumerate(keyed[:top] if top else keyed)]


def earlier_epoch(run_dir: Path) -> int | None:
    """The saved epoch to compare the best with: the one nearest half-way to the best epoch (None if none)."""
    best = runs.read_record(run_dir).best_epoch
    saved = [e for e in runs.epochs_saved(run_dir) if best is None or e < best]
    if not saved:
        return None
    middle = (best or max(saved)) / 2
    return min(saved, key=lambda e: (abs(e - middle), e))


def candidates(data: str | Path, split: str = "all", exclude: set[str] | None = None) -> list[Sample]:
    """The images of DIR (one split, or all) not already labelled (their resolved paths in `exclude`)."""
    report = scan_dataset(data)
    samples = report.samples if split == "all" else report.split(split)
    samples = [s for s in samples if str(s.image_path.resolve()) not in (exclude or set())]
    if not samples:
        raise DatasetError(f"{data}: no unlabelled image in split '{split}' (splits: {report.counts()})")
    return samples


def score_images(run: str, samples: list[Sample], use_truth: bool = True, progress: Progress | None = None,
                 keep_masks: bool = False) -> tuple[list[Scored], float, int | None]:
    """(scores, the recipe's threshold, the earlier epoch) of each sample by the run's best epoch and an earlier
    one. With use_truth, an image's truth is known where the set labels any defect (a mask, an image-level label or
    a defect folder); else every image counts as unlabelled (a simulation of labelling from scratch). keep_masks
    keeps each image's mask under the recipe, as a PNG (a few kB), so that the page opens the next image at once."""
    run_dir = runs.resolve_run(run)
    recipe = load_recipe(run_dir)
    best = Predictor(run_dir, "best")
    epoch = earlier_epoch(run_dir)
    early = Predictor(run_dir, epoch) if epoch is not None else None
    known = use_truth and any(s.defective for s in samples)
    scored = []
    for i, sample in enumerate(samples):
        image, truth = load_pair(sample)
        probability = best.predict_proba(image)
        inspection = inspect(probability, recipe)
        item = Scored(sample.id, str(sample.image_path.resolve()), float(probability.max()), inspection.flagged,
                      sum(region.area_px for region in inspection.regions),
                      int((probability >= recipe.threshold).sum()),
                      truth=sample.holds_defect(truth) if known else None,
                      mask_png=encode_png(inspection.mask.astype(np.uint8)) if keep_masks else None)
        if early is not None:
            earlier = early.predict_proba(image)
            item.earlier_top, item.earlier_flagged = float(earlier.max()), inspect(earlier, recipe).flagged
        scored.append(item)
        if progress:
            progress(i + 1, len(samples), "images")
    return scored, recipe.threshold, epoch


def label_queue(run: str, data: str | Path, top: int | None = None, split: str = "all",
                labels: str | Path | None = None, use_truth: bool = True,
                progress: Progress | None = None, keep_masks: bool = False) -> list[QueueItem]:
    """The first `top` images of DIR not labelled yet in the labelled dataset `labels`, ranked by how unsure RUN is
    of them and by what a fine-tune of it needs (the CLI's and the page's)."""
    exclude = labelled_sources(labels) if labels else None
    scored, threshold, epoch = score_images(run, candidates(data, split, exclude), use_truth, progress, keep_masks)
    return rank(scored, threshold, top, epoch, defects_wanted(run, labels))


def as_rows(queue: list[QueueItem]) -> list[dict[str, Any]]:
    """The queue as plain rows of COLUMNS (CSV, JSON, tables)."""
    return [{k: v for k, v in asdict(item).items() if k in COLUMNS} for item in queue]
