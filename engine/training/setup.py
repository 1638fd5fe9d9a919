"""What one run's epochs need, built once: device, model (resumed, fine-tuned, pre-trained or random),
optimizer and the loader of batches."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.exc import SQLAlchemyError

from engine import config, distributed, registry, runs
from engine.compute import autocast_dtype
from engine.errors import EngineError
from engine.model import PRESETS, PRETRAINED_ARCH, UNetTiny, load_checkpoint, load_pretrained
from engine.training.batches import DefectBatchSampler, DeviceBatches
from engine.training.checkpoints import load_resume
from engine.training.config import TrainConfig
from engine.training.hard_negatives import HARD_SCAN_IMAGES
from engine.training.losses import LOSSES
from engine.training.prepare import TrainData, prepare_data, rank_seed

# An epoch is one pass over the training images, but at least this many steps: on a set of a few hundred
# large images a pass is a few seconds, and validating that often would take a third of the budget.
MIN_STEPS_PER_EPOCH = 50


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

