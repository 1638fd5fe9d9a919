"""A run's clocks and plan: its budget, where its wall time goes, when it validates, and the lines that say so."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.compute import precision_name
from engine.model import count_parameters
from engine.pacing import Clock, ValidationPlan, forecast_epochs, plan_validation, size_band
from engine.training.config import TrainConfig
from engine.training.hard_negatives import HARD_SCAN_IMAGES
from engine.training.schedule import Budget
from engine.training.setup import Trainer


@dataclass
class Pace:
    """A run's clocks: its budget (what the learning rate follows), where its wall time goes, and how it validates
    (process 0 alone validates: the others have no plan)."""

    budget: Budget
    clock: Clock
    plan: ValidationPlan | None
    start_epoch: int
    gflop: float  # per crop, forward + backward


def plan_for(cfg: TrainConfig, t: Trainer, model_speed: float, pace: Pace) -> ValidationPlan:
    """The run's validation plan, from the training speed of the model alone. Validation is a forward pass (a third
    of a training step's arithmetic per pixel) in fp32 on whole images, each of its own size (new kernels): on
    Magnetic Tile it ran at 0.4 of bf16 training's pixel rate. Each validation's measured time replaces this guess
    as the run goes."""
    val = t.data.val_set
    bands = [size_band(float(np.count_nonzero(mask)) / max(mask.size, 1)) for _, mask in val.pairs]
    crops_per_image = float(np.mean([image.size for image, _ in val.pairs])) / (cfg.crop**2 * (
        2.0 if t.amp_dtype is None else 0.4))
    per_image = crops_per_image / max(model_speed, 1e-9)
    epoch_seconds = t.steps_per_epoch * cfg.batch_size / max(model_speed, 1e-9)
    if cfg.hard_share:
        epoch_seconds += per_image * min(HARD_SCAN_IMAGES, len(t.data.train_set) - len(t.data.train_set.defective))
    epochs = cfg.epoch_limit - pace.start_epoch if cfg.epoch_limit else None
    return plan_validation(bands, cfg.val_share, per_image, epoch_seconds, cfg.minutes * 60 if cfg.minutes else None,
                           epochs, cfg.seed, crops_per_image)


def reforecast(cfg: TrainConfig, info: dict, pace: Pace) -> None:
    """After the first epoch, say again how many epochs the budget gives where its measured time (loading crops
    included) differs from the model alone's by more than a quarter."""
    plan, expected = pace.plan, info["epochs_forecast"]
    if not cfg.minutes:
        return
    left = cfg.minutes * 60 - pace.budget.elapsed()
    epochs = 1 + forecast_epochs(left, plan) if left > 0 else 1
    if cfg.epoch_limit:
        epochs = min(epochs, cfg.epoch_limit - pace.start_epoch)
    if abs(epochs - expected) > 0.25 * expected:
        print(f"budget: at the {plan.epoch_seconds:.0f} s the first epoch's training took, {cfg.minutes:g} min "
              f"give about {epochs} epochs", flush=True)
        info["epochs_forecast"] = epochs


def print_start(cfg: TrainConfig, info: dict, t: Trainer, model_speed: float, init_note: str, pace: Pace) -> None:
    """The lines that open a run's log: data and model, the arithmetic per crop and the speed it reaches here, and
    how many epochs the budget gives with its validation plan (recorded in run.json too)."""
    painted = f" ({len(t.data.val_set.defective)} of them painted copies)" if t.data.val_painted else ""
    print(f"run {cfg.run_id}: {count_parameters(t.model):,} parameters ({init_note}), {len(t.data.train_set)} train "
          f"({len(t.data.train_set.defective)} with a defect) / {len(t.data.val_set)} val images{painted}, device "
          f"{t.device}, model alone {model_speed:.1f} img/s", flush=True)
    native = " (native here)" if t.amp_dtype == torch.bfloat16 else ""
    print(f"compute: {pace.gflop:.2f} GFLOP per {cfg.crop} px crop (forward + backward), {precision_name(t.amp_dtype)}"
          f"{native}; the model alone reaches {model_speed * pace.gflop:.0f} GFLOP/s", flush=True)
    plan = pace.plan
    if cfg.minutes:
        epochs = forecast_epochs(cfg.minutes * 60, plan)
        if cfg.epoch_limit:
            epochs = min(epochs, cfg.epoch_limit - pace.start_epoch)
        budget = f"{cfg.minutes:g} min give about {epochs} epoch{'s' * (epochs != 1)}"
    else:
        epochs = cfg.epoch_limit - pace.start_epoch
        budget = f"{epochs} epochs take about {plan.wall_seconds / 60:.1f} min"
    print(f"budget: {budget} of {t.steps_per_epoch} steps (~{plan.epoch_seconds:.0f} s each at the model's speed; "
          f"loading crops adds to it)", flush=True)
    print(plan.describe(), flush=True)
    info.update(gflop_per_crop=round(pace.gflop, 3), model_gflop_per_s=round(model_speed * pace.gflop, 1),
                precision=precision_name(t.amp_dtype), epochs_forecast=epochs,
                validation_plan={"sample": plan.size, "of": len(plan.order), "share": plan.share})

