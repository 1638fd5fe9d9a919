"""Which epoch is the run's best: validate on the plan's sample, keep the best checkpoint, and validate the finalists
on the whole val split so that their probabilities choose the recipe."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import readiness
from engine.metrics import best_threshold, threshold_sweep
from engine.model import UNetTiny, load_checkpoint, save_checkpoint
from engine.pacing import Clock
from engine.runfolder import RunFolder
from engine.training.config import TrainConfig
from engine.training.pace import Pace
from engine.training.prepare import TrainData
from engine.training.record import training_recipe
from engine.training.setup import Trainer
from engine.training.validation import set_metrics, upsample, validate


@dataclass
class Validation:
    """One validation of a model: on which val images, its figures, and the recipe training would choose on them."""

    indices: list[int]
    loss: float
    metrics: dict
    probs: list[np.ndarray]
    truths: list[np.ndarray]
    kinds: list[tuple[str, ...]] | None  # each image's defect kinds; None on painted validation
    threshold: float  # the best-Dice threshold
    chosen: dict  # training_recipe on these images
    ready: bool  # whether that recipe meets the readiness bars
    seconds: float

    def fields(self) -> dict:
        """Its columns of metrics.csv."""
        return {"val_loss": self.loss, "val_dice": self.metrics["dice"], "val_iou": self.metrics["iou"],
                "val_ap": self.metrics["average_precision"], "val_score": self.metrics["score"],
                "val_images": len(self.indices), "val_detection": self.chosen["detection_rate"],
                "val_false_alarm": self.chosen["false_alarm_rate"], "val_ready": float(self.ready)}


def run_validation(cfg: TrainConfig, t: Trainer, indices: list[int], clock: Clock,
                   model: UNetTiny | None = None) -> Validation:
    """Validate `model` (default the one training) on the val images at `indices`, counted as validation time."""
    with clock.part("validate"):
        start = time.monotonic()
        loss, metrics, probs, truths = validate(model or t.model, t.data.val_set, t.data.mean, t.data.std, t.device,
                                                t.memory_format, indices)
        threshold = best_threshold(threshold_sweep(probs, truths))
        kinds = None if t.data.val_painted else [t.data.val_set.samples[i].kinds for i in indices]
        chosen = training_recipe(probs, truths, threshold, cfg.max_false_alarm, painted=t.data.val_painted,
                                 kinds=kinds, goal_detection=cfg.goal_detection)
        ready = ready_on(chosen, t.data, cfg.max_false_alarm, cfg.goal_detection)
    return Validation(list(indices), loss, metrics, probs, truths, kinds, threshold, chosen, ready,
                      time.monotonic() - start)


def ready_on(chosen: dict, data: TrainData, max_false_alarm: float, goal_detection: float) -> bool:
    """Whether a recipe chosen on (part of) validation would make the run ready (readiness.of_training) where the
    whole val split holds images enough to show it."""
    n_defective = len(data.val_set.defective)
    whole = {**chosen, "n_defective": n_defective, "n_defect_free": len(data.val_set) - n_defective}
    return readiness.of_training(whole, data.val_painted, max_false_alarm, goal_detection).ready


def epoch_meta(cfg: TrainConfig, info: dict, data: TrainData, epoch: int) -> dict:
    """What a checkpoint of `epoch` records beside its weights."""
    return {"run_id": cfg.run_id, "epoch": epoch, "normalisation": {"mean": data.mean, "std": data.std},
            "threshold": info["threshold"], "train_crop": cfg.crop, "scale": cfg.scale}


def keep_best(folder: Path, info: dict, model: UNetTiny, meta: dict, v: Validation, best: dict, score: float,
              full: bool) -> None:
    """Make the validated model the run's best: best.pth, its threshold and figures; `score` is what later epochs
    are compared with, and its probabilities choose the recipe where they cover the whole val split (`full`)."""
    info["threshold"] = v.threshold
    save_checkpoint(RunFolder(folder).best, model, {**meta, "threshold": v.threshold, "val_dice": v.metrics["dice"]})
    best.update(score=score, epoch=meta["epoch"], probs=v.probs if full else None, truths=v.truths if full else None,
                kinds=v.kinds if full else None, indices=v.indices if full else None)
    info.update(best_epoch=meta["epoch"], best_dice=v.metrics["dice"], best_iou=v.metrics["iou"],
                best_score=v.metrics["score"], best_val=v.metrics)


def validate_finalists(cfg: TrainConfig, folder: Path, info: dict, t: Trainer, history: list[dict], best: dict,
                       pace: Pace) -> None:
    """Where the last epoch was not validated on the whole val split: validate it there, and the epoch that leads
    on the sample too where that is another one; the better one on the whole split becomes the run's best (its
    probabilities choose the recipe). Each epoch's row then holds the largest validation it had."""
    plan, last = pace.plan, history[-1]
    if last.get("val_images") == len(plan.order):
        return
    v = run_validation(cfg, t, plan.order, pace.clock)
    plan.record(v.seconds, len(plan.order), final=True)
    on_sample = set_metrics(v.probs[: plan.size], v.truths[: plan.size])["score"]
    last.update(v.fields())
    meta = epoch_meta(cfg, info, t.data, last["epoch"])
    leader = best["epoch"]
    if leader is None or on_sample >= best["score"]:
        keep_best(folder, info, t.model, meta, v, best, on_sample, full=True)
    elif best["probs"] is None and leader > pace.start_epoch:  # an earlier epoch leads on the sample: look at it too
        model, _ = load_checkpoint(RunFolder(folder).epoch(leader), device=str(t.device))
        w = run_validation(cfg, t, plan.order, pace.clock, model.to(memory_format=t.memory_format))
        next(row for row in history if row["epoch"] == leader).update(w.fields())
        if w.metrics["score"] >= v.metrics["score"]:
            keep_best(folder, info, model, epoch_meta(cfg, info, t.data, leader), w, best, best["score"], full=True)
        else:
            keep_best(folder, info, t.model, meta, v, best, on_sample, full=True)
    print(f"final validation on all {len(plan.order)} val images: epoch {last['epoch']} AP "
          f"{_figure(v.metrics['average_precision'])}, score {v.metrics['score']:.4f}; best epoch {best['epoch']}",
          flush=True)


def validate_best(cfg: TrainConfig, folder: Path, t: Trainer, best: dict, pace: Pace) -> None:
    """Validate the best epoch's checkpoint on the whole val split, so that its probabilities choose the recipe.

    Needed where the best epoch is from before a resume and the resumed epochs did not beat it: the record then
    holds whatever the run was left with (a kill leaves "training failed" and no recipe), and readiness must be
    decided from the best epoch as it is, not carried over."""
    model, _ = load_checkpoint(RunFolder(folder).best, device=str(t.device))
    v = run_validation(cfg, t, pace.plan.order, pace.clock, model.to(memory_format=t.memory_format))
    best.update(probs=v.probs, truths=v.truths, kinds=v.kinds, indices=v.indices)
    print(f"best epoch {best['epoch']} (from before this resume) validated on all {len(pace.plan.order)} val "
          f"images: score {v.metrics['score']:.4f}", flush=True)


def at_image_size(best: dict, data: TrainData) -> None:
    """Bring the best epoch's validation to the images' own size, as they are served: its probabilities upsampled
    the way the Predictor does, with the masks as labelled. The recipe is then chosen where it is applied; at the
    training scale a thin defect's mask loses the pixels less than half covered, and the areas only approximate."""
    if data.val_masks is None or best.get("probs") is None:
        return
    masks = [data.val_masks[i] for i in best["indices"]]
    best["probs"] = [upsample(p, mask.shape) for p, mask in zip(best["probs"], masks)]
    best["truths"] = masks


def _figure(value: float | None) -> str:
    """A metric with four decimals, or n/a."""
    return "n/a" if value is None else f"{value:.4f}"

