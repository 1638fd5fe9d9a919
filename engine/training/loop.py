"""The loop: set up, then epochs of training steps, each checkpointed and validated where the plan says so,
until the budget, patience or a cancel ends them; then the recipe and the verdict."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import SQLAlchemyError

from engine import distributed, registry, runs, runstore
from engine.compute import gflop_per_crop, measure_model_speed
from engine.model import save_checkpoint
from engine.pacing import Clock
from engine.runfolder import RunFolder
from engine.training.checkpoints import save_resume
from engine.training.config import TrainConfig
from engine.training.hard_negatives import HARD_SCAN_IMAGES, HARD_SCAN_MIN, find_hard_spots, hard_scan_slice
from engine.training.pace import Pace, plan_for, print_start, reforecast
from engine.training.record import finish_run, start_run_record
from engine.training.schedule import Budget, Patience, get_lr
from engine.training.selection import (
    at_image_size,
    epoch_meta,
    keep_best,
    run_validation,
    validate_best,
    validate_finalists,
)
from engine.training.setup import Trainer, setup


def fit(cfg: TrainConfig, folder: Path, info: dict, start_epoch: int, group: distributed.Group) -> str:
    """The training job proper: set up, then epochs until the budget, patience or a cancel ends it.

    In a group, every process trains; process 0 alone validates, decides when to stop and writes."""
    # Signals are caught from here on: the run is marked running (and so sent SIGTERM by a cancel) only later.
    stopper = Stopper(folder, watch_registry=group.is_main)
    history = [row for row in runs.read_metrics(folder) if row["epoch"] <= start_epoch] if group.is_main else []
    clock = Clock(minutes_before=max((row.get("minutes", 0.0) for row in history), default=0.0))
    cfg, t, arch, init_note = setup(cfg, folder, start_epoch, group)
    # The ceiling: forward+backward speed on an in-memory batch, measured before training starts (in a group,
    # every process at once, added up).
    probe = torch.randn(t.local_batch, 1, cfg.crop, cfg.crop, device=t.device).to(memory_format=t.memory_format)
    model_speed = group.total(measure_model_speed(t.model, probe, t.amp_dtype,
                                                  seconds=3.0 if t.device.type == "cpu" else 1.0))
    pace = Pace(Budget(cfg.epoch_limit, start_epoch, t.steps_per_epoch, cfg.minutes), clock, None, start_epoch,
                gflop_per_crop(t.model, cfg.crop))
    validated = [row for row in history if "val_score" in row or "val_dice" in row]
    best = {"score": max((row.get("val_score", row.get("val_dice")) for row in validated), default=-1.0),
            "epoch": info.get("best_epoch") if validated else None, "probs": None, "truths": None}
    if group.is_main:
        info = start_run_record(cfg, folder, info, t.data, arch, t.model, t.device, model_speed, init_note,
                                group.world_size)
        pace.plan = plan_for(cfg, t, model_speed, pace)
        print_start(cfg, info, t, model_speed, init_note, pace)
    if cfg.hard_share and start_epoch:  # a resumed run looks again, so its first epoch trains on hard negatives too
        update_hard_negatives(t, start_epoch, info)
    stop_reason, epoch = train_epochs(cfg, folder, info, t, stopper, pace, history, best)
    if group.is_main:
        if stop_reason != "cancelled" and epoch > start_epoch:
            validate_finalists(cfg, folder, info, t, history, best, pace)
        if stop_reason != "cancelled" and best["probs"] is None and best["epoch"] is not None:
            validate_best(cfg, folder, t, best, pace)
        at_image_size(best, t.data)
        finish_run(cfg, folder, info, best, stop_reason or f"all {epoch} epochs done", pace, model_speed, history)
    return cfg.run_id


def train_epochs(cfg: TrainConfig, folder: Path, info: dict, t: Trainer, stopper: Stopper, pace: Pace,
                 history: list[dict], best: dict) -> tuple[str | None, int]:
    """Epochs until the budget, patience or a cancel ends them; returns why they stopped and the last epoch saved."""
    patience = Patience(cfg.patience, cfg.patience_after)
    step, stop_reason, epoch, train_seconds, train_images = 0, None, pace.start_epoch, 0.0, 0
    while stop_reason is None and (cfg.epoch_limit is None or epoch < cfg.epoch_limit):
        epoch += 1
        with pace.clock.part("train"):
            epoch_start = time.monotonic()
            losses, lr, step, stop_reason = train_epoch(cfg, t, pace.budget, stopper, step)
            epoch_train_s = time.monotonic() - epoch_start
        train_seconds += epoch_train_s
        train_images += len(losses) * cfg.batch_size
        if stop_reason == "cancelled":
            epoch -= 1  # the interrupted epoch is not saved
            break
        if t.group.is_main:
            last = stop_reason is not None or epoch == cfg.epoch_limit
            improved = end_of_epoch(cfg, folder, info, t, epoch, losses, lr, epoch_start, epoch_train_s, history,
                                    best, pace, step, last)
            info.update(epochs_done=epoch, train_images_per_s=round(train_images / max(train_seconds, 1e-9), 1))
            info["train_gflop_per_s"] = round(info["train_images_per_s"] * pace.gflop, 1)
            if epoch == pace.start_epoch + 1 and stop_reason is None:
                reforecast(cfg, info, pace)
            runstore.save(folder, info, history)
            if stop_reason is None and improved is not None and patience.converged(improved,
                                                                                  pace.budget.progress(step)):
                stop_reason = (f"converged: no better validation score for {cfg.patience} validated epochs in the "
                               f"annealed part of the schedule")
            elif stop_reason is None and pace.budget.time_up():
                stop_reason = f"time budget of {cfg.minutes:g} min spent"
        stop_reason = t.group.share(stop_reason)
        if cfg.hard_share and stop_reason is None and epoch != cfg.epoch_limit:  # look again for the next epoch
            with pace.clock.part("hard_negatives"):
                update_hard_negatives(t, epoch, info, epoch_train_s * cfg.val_share)
    return stop_reason, epoch


def train_epoch(cfg: TrainConfig, t: Trainer, budget: Budget, stopper: Stopper, step: int
                ) -> tuple[list[float], float, int, str | None]:
    """One pass of the loader: (losses, last learning rate, step reached, why it stopped early or None).

    In a group, every process follows the group's clock and stops at the same step (distributed.Group.agree)."""
    losses, lr = [], cfg.lr
    elapsed, _ = t.group.agree(budget.elapsed(), False)
    for images, masks in t.loader:
        lr = get_lr(step, budget.progress(step, elapsed), cfg.lr)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        images = ((images - t.data.mean) / t.data.std).to(t.device, non_blocking=True).to(memory_format=t.memory_format)
        with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
            logits = t.net(images)
        loss = t.loss_fn(logits.float(), masks.to(t.device, non_blocking=True))
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        losses.append(loss.item())
        step += 1
        elapsed, cancelled = t.group.agree(budget.elapsed(), stopper.poll())
        if cancelled:
            return losses, lr, step, "cancelled"
        if budget.time_up(elapsed):
            return losses, lr, step, f"time budget of {cfg.minutes:g} min spent"
    return losses, lr, step, None


def end_of_epoch(cfg: TrainConfig, folder: Path, info: dict, t: Trainer, epoch: int, losses: list[float], lr: float,
                 epoch_start: float, epoch_train_s: float, history: list[dict], best: dict, pace: Pace, step: int,
                 last: bool) -> bool | None:
    """Checkpoint and record one epoch, validated where the plan says so; keeps `best` up to date and returns whether
    it improved (None where the epoch was not validated)."""
    row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr,
           "images_per_s": len(losses) * cfg.batch_size / max(epoch_train_s, 1e-9)}
    meta = epoch_meta(cfg, info, t.data, epoch)
    save_checkpoint(RunFolder(folder).epoch(epoch), t.model, meta)
    save_resume(folder, epoch, t.model, t.optimizer, meta)
    plan, improved, progress = pace.plan, None, pace.budget.progress(step)
    plan.pace_training(epoch_train_s, row["images_per_s"])
    plan.epochs = max(epoch - pace.start_epoch, round((epoch - pace.start_epoch) / max(progress, 1e-9)))
    if plan.due(progress, last):
        v = run_validation(cfg, t, plan.sample, pace.clock)
        plan.record(v.seconds, len(v.indices))
        row.update(v.fields())
        improved = v.metrics["score"] > best["score"]
        if improved:
            keep_best(folder, info, t.model, meta, v, best, v.metrics["score"], full=not plan.sampled)
    row.update(seconds=time.monotonic() - epoch_start, minutes=pace.clock.minutes())
    history.append(row)
    print(epoch_line(row, improved), flush=True)
    return improved


def epoch_line(row: dict, improved: bool | None) -> str:
    """The log line of one epoch: its loss, and its validation where it had one."""
    line = f"epoch {row['epoch']}  loss {row['train_loss']:.4f}"
    if improved is not None:
        ap = "n/a" if row["val_ap"] is None else f"{row['val_ap']:.4f}"
        detection = "n/a" if row["val_detection"] is None else f"{row['val_detection']:.0%}"
        line += (f"  val loss {row['val_loss']:.4f}  dice {row['val_dice']:.4f}  image AP {ap}  detection {detection}"
                 f"  score {row['val_score']:.4f} ({row['val_images']} images){'  *' if improved else ''}")
    return f"{line}  {row['images_per_s']:.1f} img/s  {row['seconds']:.1f}s  at {row['minutes']:.1f} min"


def update_hard_negatives(t: Trainer, epoch: int, info: dict, seconds: float | None = None) -> None:
    """Look for hard negatives after `epoch` and give them to the sampler; process 0 records and prints how many
    of the images looked at (by the whole group) the model still flags. With `seconds`, the next look is sized to
    take about that long (between HARD_SCAN_MIN and HARD_SCAN_IMAGES images) at this look's speed."""
    start = time.monotonic()
    indices = hard_scan_slice(t.data.train_set, epoch, t.group.rank, t.group.world_size, t.hard_scan)
    spots = find_hard_spots(t.model, t.data, indices, t.device, t.memory_format)
    if seconds is not None:  # every process of a group asks, process 0's answer counts
        per_image = (time.monotonic() - start) / max(len(indices), 1)
        fits = int(seconds / max(per_image, 1e-9)) * t.group.world_size
        t.hard_scan = t.group.share(min(HARD_SCAN_IMAGES, max(HARD_SCAN_MIN, fits)))
    t.sampler.set_hard_spots(spots)
    flagged, looked = (int(t.group.total(n)) for n in (sum(map(bool, spots.values())), len(spots)))
    if t.group.is_main and looked:
        info["hard_negatives"] = {"epoch": epoch, "images_flagged": flagged, "images_looked_at": looked}
        print(f"  hard negatives: the model flags {flagged} of {looked} defect-free training images looked at; "
              f"their spots are trained on next", flush=True)


class Stopper:
    """Turns SIGTERM/SIGINT and registry cancel requests into a flag checked after each step (only the writing
    process, the first of a group, sends heartbeats and reads cancel requests)."""

    def __init__(self, folder: Path, watch_registry: bool = True) -> None:
        self.folder, self.cancelled, self._last_poll = folder, False, 0.0
        self.watch_registry = watch_registry
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.cancelled = True

    def poll(self) -> bool:
        """Send a heartbeat at most every 2 s and return whether the run should stop."""
        if self.watch_registry and time.monotonic() - self._last_poll > 2.0:
            self._last_poll = time.monotonic()
            try:
                cancel = registry.heartbeat(self.folder.name)
            except SQLAlchemyError:  # an unwritable registry must not stop training; run.json keeps the record
                cancel = False
            if cancel is None:  # the registry lost the run (deleted or replaced): register it again
                runstore.mirror(self.folder)
            self.cancelled |= bool(cancel)
        return self.cancelled

