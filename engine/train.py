"""The training job: one process, one loop. Writes the run folder and the registry as it goes.

Run with `python -m engine train --data DIR ...` (see engine/__main__.py) or start it in the
background with engine.jobs.start_training.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sqlalchemy.exc import SQLAlchemyError

from engine import config, distributed, readiness, registry, runs, runstore, storage
from engine.compute import autocast_dtype, gflop_per_crop, measure_model_speed, precision_name
from engine.data import (
    DefectBatchSampler,
    DeviceBatches,
    SegmentationDataset,
    auto_geometry,
    dataset_hash,
    image_stats,
    load_pair,
    scan_dataset,
)
from engine.errors import DatasetError, EngineError
from engine.metrics import (
    best_threshold,
    threshold_sweep,
)
from engine.model import (
    PRESETS,
    PRETRAINED_ARCH,
    UNetTiny,
    count_parameters,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from engine.pacing import Clock, ValidationPlan, forecast_epochs, plan_validation, size_band
from engine.paint import EVERY_KIND, DefectBank, PaintParams, paint, params_for
from engine.runfolder import RunFolder
from engine.training.checkpoints import load_resume, save_resume
from engine.training.config import HARD_SHARE_WHEN_PAINTING, PAINT_WITHOUT_LABELS, TrainConfig
from engine.training.losses import LOSSES
from engine.training.record import (
    CURVE_FIELDS,
    PAINTED_CONFIDENCE,
    recipe_line,
    save_recipe_for,
    time_to_ready,
    time_to_ready_line,
    training_recipe,
)
from engine.training.schedule import Budget, Patience, get_lr
from engine.training.validation import image_logits, set_metrics, validate
from engine.tuning import at_scale

# An epoch is one pass over the training images, but at least this many steps: on a set of a few hundred
# large images a pass is a few seconds, and validating that often would take a third of the budget.
MIN_STEPS_PER_EPOCH = 50
# Hard negatives: after each epoch this many defect-free training images are looked at (a rotating slice: about
# 2 s at KolektorSDD's size on 2 CPU cores), and up to HARD_SPOTS_PER_IMAGE regions above HARD_THRESHOLD (below
# the 0.5 of the default recipe, as tuned recipes often are) become crops of the next epochs (the share of the
# batch they take: HARD_SHARE_WHEN_PAINTING in engine/training/config.py).
HARD_SCAN_IMAGES = 48
HARD_SCAN_MIN = 8  # the fewest looked at when their time is bounded (--val-share of the epoch's training time)
HARD_SPOTS_PER_IMAGE = 4
HARD_THRESHOLD = 0.25


def pick_device(device: str) -> torch.device:
    """Resolve auto/cpu/cuda to a torch device, refusing cuda when there is none."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def loader_workers(device: torch.device, requested: int | None) -> int:
    """Data-loading processes: as asked, else 0 on CPU (the model needs every core) and up to 8 on CUDA."""
    if requested is not None:
        return max(0, int(requested))
    return 0 if device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))


def batch_path(cfg: TrainConfig, device: torch.device) -> str:
    """Where batches are made: `device` (crops cut and augmented where the model trains) or the CPU `loader`."""
    if cfg.batches != "auto":
        return cfg.batches
    return "device" if device.type == "cuda" and not cfg.paint else "loader"


def reseed_worker(worker_id: int) -> None:
    """Give each loader process its own augmentation stream (a forked copy would repeat the parent's)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(torch.initial_seed() % 2**63)


def hard_scan_slice(dataset: SegmentationDataset, epoch: int, rank: int = 0, world_size: int = 1,
                    count: int = HARD_SCAN_IMAGES) -> list[int]:
    """The defect-free training images to look at for hard negatives after `epoch`: the next `count` of them in turn
    (each process of a group its own part of those)."""
    good = [i for i, pixels in enumerate(dataset.defect_pixels) if not len(pixels)]
    n = min(len(good), count)
    return [good[((epoch - 1) * n + k) % len(good)] for k in range(n)][rank::world_size]


@torch.no_grad()
def find_hard_spots(model: UNetTiny, data: TrainData, indices: list[int], device: torch.device,
                    memory_format: torch.memory_format) -> dict[int, list[tuple[int, int]]]:
    """Where the model flags these defect-free training images: image index -> the (y, x) centres of up to
    HARD_SPOTS_PER_IMAGE regions above HARD_THRESHOLD, most confident first (empty where nothing is flagged)."""
    model.eval()
    spots = {}
    for index in indices:
        image, _ = data.train_set.pairs[index]
        prob = torch.sigmoid(image_logits(model, image, data.mean, data.std, device, memory_format).float())
        prob = prob[0, 0].cpu().numpy()
        count, labels, _, centres = cv2.connectedComponentsWithStats((prob > HARD_THRESHOLD).astype(np.uint8))
        peak = np.zeros(count, np.float32)
        np.maximum.at(peak, labels.ravel(), prob.ravel())
        peaks = sorted(range(1, count), key=lambda k: -peak[k])[:HARD_SPOTS_PER_IMAGE]
        spots[index] = [(int(round(centres[k][1])), int(round(centres[k][0]))) for k in peaks]
    model.train()
    return spots


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


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, Path, dict, int]:
    """The config, folder, run.json and first epoch of this job; a resume keeps the run's own settings."""
    if not cfg.resume:
        run_id = cfg.run_id or runs.new_run_id(cfg.name)
        folder = config.RUNS_DIR / run_id
        info = runs.read_run_json(folder) if RunFolder(folder).run_json.is_file() else {}
        if info and info.get("status") != "queued":  # only a run queued by jobs.start_training is taken over
            raise EngineError(f"run {run_id} already exists; resume it with --resume {run_id} or pick another id")
        return replace(cfg, run_id=run_id), folder, info, 0
    folder = runs.resolve_run(cfg.resume)
    info = runs.read_run_json(folder)
    other = runstore.trained_elsewhere(info)
    if other:
        raise EngineError(f"run {info['run_id']} is training now (process {other}); wait for it to finish, or stop "
                          f"it with `python -m engine cancel {info['run_id']}`")
    saved = {k: v for k, v in info["params"].items() if k in TrainConfig.__dataclass_fields__}
    # Keep the architecture and data of the run; take the new epoch/minute budget and device.
    resumed = replace(TrainConfig(**saved), epochs=cfg.epochs, minutes=cfg.minutes, device=cfg.device,
                      nproc=cfg.nproc, resume=info["run_id"], run_id=info["run_id"], command=cfg.command)
    start_epoch = int(load_resume(folder)["epoch"])
    if resumed.epoch_limit is not None and start_epoch >= resumed.epoch_limit:
        raise EngineError(f"run {resumed.run_id} already has {start_epoch} epochs; pass --epochs above "
                          f"{start_epoch} or --minutes")
    info = runstore.queue(folder)  # remembers the state it leaves, for a resume that fails before an epoch
    return resumed, folder, info, start_epoch


def train(cfg: TrainConfig) -> str:
    """Run one training job to the end (or budget, early stop, cancel); returns the run id.

    A failure is recorded with its cause in run.json and the registry before it is raised (a resume that failed
    before its first new epoch leaves the run as it was); a full disk gives the record its reserved space first.
    Under torchrun, process 0 does all of that and the others only train (a failure of one ends them all).
    """
    group = distributed.join(pick_device(cfg.device))
    if group.active and "--nproc" not in cfg.command:  # record what ran: torchrun, directly or through --nproc
        n_nodes = group.world_size // group.local_world_size
        nodes = f"--nnodes {n_nodes} " if n_nodes > 1 else ""
        cfg = replace(cfg, nproc=group.local_world_size, command=cfg.command.replace(
            "python -m engine", f"torchrun {nodes}--nproc-per-node {group.local_world_size} -m engine", 1))
    try:
        if not group.is_main:
            cfg, folder, start_epoch = group.share(None)  # the run process 0 resolved
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # one log: process 0's
                run_id = fit(cfg, Path(folder), {}, start_epoch, group)
        else:
            cfg, folder, info, start_epoch = resolve_config(cfg)
            group.share((cfg, str(folder), start_epoch))
            with runstore.beating(cfg.run_id):  # from now on, whatever the loop does (validation, tuning)
                run_id = _fit_recorded(cfg, folder, info, start_epoch, group)
        group.wait()  # every process leaves together, once process 0 has written the end of the run
        return run_id
    finally:
        group.leave()


def _fit_recorded(cfg: TrainConfig, folder: Path, info: dict, start_epoch: int, group: distributed.Group) -> str:
    """fit, with the cause of a failure recorded in run.json and the registry before it is raised."""
    try:
        with storage.Reserve(folder) as reserve:
            try:
                return fit(cfg, folder, info, start_epoch, group)
            except BaseException:
                reserve.release()  # the failure record must fit on a full disk
                raise
    except BaseException as err:
        cause = str(err) if isinstance(err, EngineError) else f"{type(err).__name__}: {err}".rstrip(": ")
        try:
            runstore.fail(folder, cause)
        except EngineError as record_err:  # run.json unwritable: the registry alone has the record
            raise EngineError(f"{cause} (recorded in the registry only: {record_err})") from err
        raise


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
    train_samples, val_samples, carved = report.training_splits(cfg.val_fraction)
    if carved:
        print(f"note: {cfg.data} has no val split; using {len(val_samples)} of its train images for validation "
              f"({sum(s.defective for s in val_samples)} with a defect), chosen by id, the same every run",
              flush=True)
    if cfg.train_fraction < 1.0:
        n_keep = max(1, round(len(train_samples) * cfg.train_fraction))
        keep = np.random.default_rng(cfg.seed).permutation(len(train_samples))[:n_keep]
        train_samples = [train_samples[i] for i in sorted(keep)]
    if not train_samples or not val_samples:
        raise DatasetError(f"{cfg.data}: needs at least 2 training images (found {report.counts()})")
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
    return cfg, TrainData(train_set, val_set, mean, std, report.counts(), dataset_hash(report.samples), carved,
                          val_painted)


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


def build_model(cfg: TrainConfig, folder: Path, start_epoch: int) -> tuple[UNetTiny, dict, str]:
    """The model to train: resumed, fine-tuned from a run, pre-trained or random; returns it, its architecture
    and a note on where its weights came from."""
    arch = {**PRESETS[cfg.preset]}
    arch.update({k: v for k, v in {"base": cfg.base, "depth": cfg.depth}.items() if v})
    model = UNetTiny(in_channels=1, **arch)
    if start_epoch:
        state = load_resume(folder)
        model = UNetTiny(**state["arch"])
        model.load_state_dict(state["state_dict"])
        return model, model.arch, f"resumed from epoch {start_epoch}"
    init = cfg.init or "auto"
    if init == "none":
        return model, model.arch, "random"
    if init == "auto" and {"in_channels": 1, **arch} != PRETRAINED_ARCH:
        return model, model.arch, "random (the pre-trained weights are for the balanced preset)"
    if init in ("auto", "pretrained"):
        meta = load_pretrained(model)
        return model, model.arch, f"pre-trained on generated images ({meta.get('note') or 'engine/pretrained'})"
    model, _ = load_checkpoint(runs.checkpoint_path(runs.resolve_run(init), "best"))
    return model, model.arch, f"fine-tuned from run {init}"


@dataclass
class Trainer:
    """What one epoch of training needs, built once by `setup`."""

    model: UNetTiny
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DeviceBatches | torch.utils.data.DataLoader  # yields (images, masks) batches
    loss_fn: Any
    data: TrainData
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    steps_per_epoch: int
    group: distributed.Group  # this process's place in the training group (a group of one without torchrun)
    net: torch.nn.Module  # what the loop calls: the model, or DistributedDataParallel around it in a group
    local_batch: int  # crops per step in this process (the batch split over the group)
    sampler: DefectBatchSampler  # what the loader cuts next; told the hard negatives after each epoch
    hard_scan: int = HARD_SCAN_IMAGES  # defect-free training images looked at for hard negatives after an epoch


def setup(cfg: TrainConfig, folder: Path, start_epoch: int, group: distributed.Group
          ) -> tuple[TrainConfig, Trainer, dict, str]:
    """Seeds, data, model (resumed optimizer state included) and the loader; returns the config with every
    automatic value resolved, the trainer, the model's architecture and where its weights came from."""
    cfg.check(group.world_size)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process of a group
    np.random.seed(cfg.seed)
    device = group.device
    torch.set_num_threads(cfg.threads or max(1, config.cpu_threads() // group.local_world_size))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    cfg, data = prepare_data(cfg, group.rank)
    if group.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            registry.note_trained_on(Path(cfg.data).resolve().name, str(Path(cfg.data).resolve()), data.data_hash,
                                     data.counts["images"], data.counts["defective"], data.counts["defect_free"])
        except SQLAlchemyError as err:  # the run's own record is run.json; `registry rebuild` restores the row
            print(f"warning: dataset not registered ({err.__class__.__name__})", file=sys.stderr)
    model, arch, init_note = build_model(cfg, folder, start_epoch)
    model = model.to(device).to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if start_epoch:
        optimizer.load_state_dict(load_resume(folder)["optimizer"])
    amp_dtype = autocast_dtype(device, cfg.precision)
    steps_per_epoch = cfg.steps_per_epoch or max(MIN_STEPS_PER_EPOCH, len(data.train_set) // cfg.batch_size)
    local_batch = cfg.batch_size // group.world_size
    sampler = DefectBatchSampler(data.train_set, local_batch, steps_per_epoch, cfg.defect_share,
                                 seed=rank_seed(cfg.seed + start_epoch, group.rank), hard_share=cfg.hard_share)
    cfg = replace(cfg, batches=batch_path(cfg, device))
    if cfg.batches == "device":
        loader = DeviceBatches(data.train_set, sampler, device)
    else:
        workers = loader_workers(device, cfg.workers)
        loader = torch.utils.data.DataLoader(data.train_set, batch_sampler=sampler, num_workers=workers,
                                             persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                             worker_init_fn=reseed_worker)
    trainer = Trainer(model, optimizer, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                      loader, LOSSES[cfg.loss], data, device, amp_dtype, memory_format, steps_per_epoch, group,
                      group.wrap(model), local_batch, sampler)
    return cfg, trainer, arch, init_note


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


@dataclass
class Pace:
    """A run's clocks: its budget (what the learning rate follows), where its wall time goes, and how it validates
    (process 0 alone validates: the others have no plan)."""

    budget: Budget
    clock: Clock
    plan: ValidationPlan | None
    start_epoch: int
    gflop: float  # per crop, forward + backward


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


def start_run_record(cfg: TrainConfig, folder: Path, info: dict, data: TrainData, arch: dict, model: UNetTiny,
                     device: torch.device, model_speed: float, init_note: str, processes: int = 1) -> dict:
    """Write run.json and the registry row for a run that starts (or resumes) now; returns run.json's dict."""
    now = datetime.now(timezone.utc)
    info.update({
        "run_id": cfg.run_id, "name": cfg.name, "status": "running", "params": asdict(cfg),
        "dataset": {"path": str(Path(cfg.data).resolve()), "hash": data.data_hash, "counts": data.counts,
                    "val_carved_from_train": data.val_carved, "val_painted": data.val_painted},
        "arch": {"in_channels": 1, **arch}, "parameters": count_parameters(model), "init": init_note,
        "normalisation": {"mean": data.mean, "std": data.std}, "device": str(device),
        **runstore.process_fields(os.getpid()),
        "epochs_planned": cfg.epoch_limit or 0, "seed": cfg.seed, "command": cfg.command,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "machine": f"{platform.machine()}, {config.cpu_threads()} cpu threads",
        "created_at": info.get("created_at", now.isoformat()), "started_at": now.isoformat(),
        "finished_at": None, "error": None, "model_images_per_s": round(model_speed, 1), "processes": processes,
    })
    info.setdefault("threshold", 0.5)
    info.setdefault("ready", None)  # decided at the end; a resumed run keeps its verdict until then
    info.setdefault("ready_reason", None)
    return runstore.save(folder, info)


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
                kinds=v.kinds if full else None)
    info.update(best_epoch=meta["epoch"], best_dice=v.metrics["dice"], best_iou=v.metrics["iou"],
                best_score=v.metrics["score"], best_val=v.metrics)


def epoch_line(row: dict, improved: bool | None) -> str:
    """The log line of one epoch: its loss, and its validation where it had one."""
    line = f"epoch {row['epoch']}  loss {row['train_loss']:.4f}"
    if improved is not None:
        ap = "n/a" if row["val_ap"] is None else f"{row['val_ap']:.4f}"
        detection = "n/a" if row["val_detection"] is None else f"{row['val_detection']:.0%}"
        line += (f"  val loss {row['val_loss']:.4f}  dice {row['val_dice']:.4f}  image AP {ap}  detection {detection}"
                 f"  score {row['val_score']:.4f} ({row['val_images']} images){'  *' if improved else ''}")
    return f"{line}  {row['images_per_s']:.1f} img/s  {row['seconds']:.1f}s  at {row['minutes']:.1f} min"


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
        model, _ = load_checkpoint(folder / f"model_epoch_{leader}.pth", device=str(t.device))
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
    best.update(probs=v.probs, truths=v.truths, kinds=v.kinds)
    print(f"best epoch {best['epoch']} (from before this resume) validated on all {len(pace.plan.order)} val "
          f"images: score {v.metrics['score']:.4f}", flush=True)


def _figure(value: float | None) -> str:
    """A metric with four decimals, or n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def finish_run(cfg: TrainConfig, folder: Path, info: dict, best: dict, stop_reason: str, pace: Pace,
               model_speed: float, history: list[dict]) -> None:
    """Choose the recipe on validation, decide readiness, close run.json and the registry row, say why it stopped
    and where the time went."""
    judged = readiness.stopped("no epoch finished")
    if best["probs"] is not None:
        chosen = training_recipe(best["probs"], best["truths"], info["threshold"], cfg.max_false_alarm,
                                 painted=info["dataset"].get("val_painted", False), kinds=best.get("kinds"),
                                 goal_detection=cfg.goal_detection)
        # Validation ran at the training scale; the recipe is applied to images at their own size.
        chosen["min_region_px"] = at_scale(chosen["min_region_px"], cfg.scale)
        chosen["sure_min_px"] = at_scale(chosen.get("sure_min_px") or 0, cfg.scale)
        context = {"data": str(Path(cfg.data).resolve()), "split": "val", "epoch": best["epoch"], "by": "training"}
        info["recipe"] = save_recipe_for(folder, chosen, context)
        judged = readiness.of_training(chosen, info["dataset"].get("val_painted", False), cfg.max_false_alarm,
                                       cfg.goal_detection)
        print(recipe_line(chosen), flush=True)
    status = "cancelled" if stop_reason == "cancelled" else "completed"
    if status == "cancelled":
        judged = readiness.stopped("training was cancelled")
    info.pop("before_resume", None)
    info.pop("tuned_on", None)  # readiness is training's again, until the next tuning
    info.update(status=status, stop_reason=stop_reason, finished_at=datetime.now(timezone.utc).isoformat(),
                wall_seconds=round(pace.clock.elapsed(), 1), ready=judged.ready, ready_reason=judged.reason,
                ready_note=judged.note, pid=None, pid_started=None, time_shares=pace.clock.shares(),
                time_to_ready=time_to_ready(history),
                curve=[{k: row.get(k) for k in CURVE_FIELDS} for row in history if "val_score" in row])
    runstore.save(folder, info, history)
    print(pace.clock.line(), flush=True)
    print(time_to_ready_line(info["time_to_ready"], info["dataset"].get("val_painted", False)), flush=True)
    print(f"finished: {stop_reason}; best epoch {best['epoch']}, val dice {info.get('best_dice') or 0:.4f} at "
          f"threshold {info['threshold']:.2f} (verdicts use the recipe's); training "
          f"{info.get('train_images_per_s', 0)} img/s vs model alone {model_speed:.1f} img/s", flush=True)
    now = readiness.judge(info)  # as recorded: the reason and next steps every reader of the run gets
    if now.ready:
        print(f"ready: {cfg.run_id}" + (f" (provisional: {now.note})" if now.note else ""), flush=True)
    else:
        print(f"NOT READY: {now.reason}", flush=True)
        for step in now.next_steps:
            print(f"  next: {step}", flush=True)


