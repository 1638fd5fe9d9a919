"""A run's data: scan and decode the dataset, carve validation, resolve scale and crop, choose what is painted."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from engine.data import dataset_hash, load_pair, scan_dataset
from engine.errors import DatasetError, EngineError
from engine.paint import EVERY_KIND, DefectBank, PaintParams, paint, params_for
from engine.training.batches import SegmentationDataset, auto_geometry, image_stats
from engine.training.config import HARD_SHARE_WHEN_PAINTING, PAINT_WITHOUT_LABELS, PAINTED_CONFIDENCE, TrainConfig


@dataclass
class TrainData:
    """The decoded training and validation sets of a run and what was learnt about them."""

    train_set: SegmentationDataset
    val_set: SegmentationDataset
    mean: float
    std: float
    counts: dict
    data_hash: str
    val_carved: bool
    val_painted: bool = False  # validation holds no real defect, so defects were painted on its good images
    val_masks: list[np.ndarray] | None = None  # validation's masks at the images' own size, where scale is not 1


def prepare_data(cfg: TrainConfig, rank: int = 0) -> tuple[TrainConfig, TrainData]:
    """Scan and decode the dataset, carve val if needed, fill in automatic scale and crop; returns the config
    with every automatic value resolved (what run.json stores) and the data. Each process of a group (rank)
    augments with its own random stream."""
    report = scan_dataset(cfg.data)
    if report.sorted_by_folder:
        raise DatasetError(f"{cfg.data} is sorted into good and defect folders without masks: that tunes and evaluates "
                           "a run (`tune`, `evaluate`), but training needs masks; train on its good folder alone "
                           "(defects are painted on), then tune the run on the whole folder")
    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    train_samples, val_samples, carved = report.trainable_splits(cfg.val_fraction)
    if carved:
        print(f"note: {cfg.data} has no val split; using {len(val_samples)} of its train images for validation "
              f"({sum(s.defective for s in val_samples)} with a defect), chosen by id, the same every run",
              flush=True)
    if cfg.train_fraction < 1.0:
        n_keep = max(1, round(len(train_samples) * cfg.train_fraction))
        keep = np.random.default_rng(cfg.seed).permutation(len(train_samples))[:n_keep]
        train_samples = [train_samples[i] for i in sorted(keep)]
    train_pairs = [load_pair(s) for s in train_samples]
    if cfg.paint is None:
        cfg = replace(cfg, paint=0.0 if any(mask.any() for _, mask in train_pairs) else PAINT_WITHOUT_LABELS)
        if cfg.paint:
            if cfg.batches == "device":
                raise EngineError("the training images hold no labelled defect, so defects are painted on, which "
                                  "--batches device cannot do; use --batches loader")
            print(f"note: no labelled defect in the {len(train_pairs)} training images, so defects are painted on "
                  f"{cfg.paint:.0%} of the crops (--paint {cfg.paint:g}); the run stays not ready until it is tuned "
                  "on a few real labelled defects", flush=True)
    if cfg.scale is None or cfg.crop is None:
        scale, crop = auto_geometry(train_pairs)
        cfg = replace(cfg, scale=cfg.scale or scale, crop=cfg.crop or crop)
        print(f"training geometry: scale {cfg.scale:g}, crop {cfg.crop} px (from image and defect sizes)", flush=True)
    if cfg.hard_share is None:
        cfg = replace(cfg, hard_share=HARD_SHARE_WHEN_PAINTING if cfg.paint else 0.0)
    paint_params = params_for(cfg.paint_types, size=cfg.paint_size, count=cfg.paint_count)  # full-size images
    on_crops = paint_params.on_crops(cfg.scale, float(np.median([min(image.shape) for image, _ in train_pairs])))
    train_set = SegmentationDataset(train_samples, crop=cfg.crop, augment=True, seed=rank_seed(cfg.seed, rank),
                                    scale=cfg.scale, pairs=train_pairs, paint_share=cfg.paint,
                                    painter=partial(paint, params=on_crops))
    if cfg.paint:
        choose_painter(cfg, train_set)
    val_pairs = [load_pair(s) for s in val_samples]
    val_painted = cfg.paint > 0 and not any(mask.any() for _, mask in val_pairs)
    if val_painted:
        val_pairs = painted_validation(val_pairs, cfg.seed, paint_params)
        print(f"note: no real defect in the {len(val_samples)} validation images, so validation adds copies of about "
              f"half of them with defects painted on (marked val_painted in run.json); the recipe holds the "
              f"false-alarm goal at {PAINTED_CONFIDENCE:.0%} confidence on the real ones; check the model on real "
              f"defects with `evaluate`", flush=True)
    val_set = SegmentationDataset(val_samples, crop=cfg.crop, augment=False, scale=cfg.scale, pairs=val_pairs)
    mean, std = image_stats([image for image, _ in train_set.pairs])
    val_masks = [mask for _, mask in val_pairs] if cfg.scale != 1.0 else None  # the final recipe is chosen on them
    return cfg, TrainData(train_set, val_set, mean, std, report.counts(), dataset_hash(report.samples), carved,
                          val_painted, val_masks)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank` of a group; process 0 (and a job alone) keeps the run's own seed."""
    return seed + 1_000_003 * rank


def choose_painter(cfg: TrainConfig, train_set: SegmentationDataset) -> None:
    """Paint the set's own labelled defects, moved, where it has some (they look like its defects; the generator's
    may not); else keep the generator's, and say so where every kind of them is painted."""
    if train_set.defective:
        bank = DefectBank([train_set.pairs[i] for i in train_set.defective])
        train_set.painter = bank.transplant
        print(f"painting: the {len(bank)} labelled defects of the training images, moved onto defect-free crops",
              flush=True)
    elif not cfg.paint_types:
        print("painting: every kind of the generator's defects; name the kinds your line looks for with "
              f"--paint-types (e.g. scratch,crack): {EVERY_KIND}", flush=True)


def painted_validation(pairs: list[tuple[np.ndarray, np.ndarray]], seed: int,
                       params: PaintParams | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validation pairs for a set without real defects: every image as it is (the real good images measure false
    alarms, all of them) and, for every other one by a seeded draw, a painted copy (detection), the same every run."""
    rng = np.random.default_rng([seed, 20261203])
    painted = []
    for image, _ in pairs:
        if rng.random() < 0.5:
            copy, mask, _ = paint(image, rng, params)
            painted.append((copy, mask))
    return list(pairs) + painted

