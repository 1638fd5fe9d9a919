"""The training job: one process, one loop. Writes the run folder and the registry as it goes.

Run with `python -m engine train --data DIR ...` (see engine/__main__.py) or start it in the
background with engine.jobs.start_training.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import config, registry, runs
from engine.data import SegmentationDataset, dataset_hash, image_stats, scan_dataset
from engine.errors import DatasetError, EngineError
from engine.metrics import SetMetrics, best_threshold, threshold_sweep
from engine.model import (
    PRESETS,
    UNetTiny,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from engine.recipe import TuneStats, load_recipe, save_recipe, tuned_recipe


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in run.json."""

    data: str
    epochs: int = 40
    minutes: float | None = None  # wall-time budget; the LR schedule anneals within it
    preset: str = "fast"
    base: int | None = None  # overrides the preset
    depth: int | None = None
    batch_size: int = 16
    crop: int = 128
    scale: float = 1.0  # images are resized by this factor for training and inference (< 1 is faster)
    train_fraction: float = 1.0  # use a seeded subset of the training split (data-efficiency studies)
    init: str | None = None  # start from the best weights of this run (fine-tuning) instead of random
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 10  # early stop after this many epochs without a better validation Dice
    # The saved recipe's min region area keeps validation false alarms at or under this. A validation split
    # holds a few dozen defect-free images, so 0.02 would mean "none" and cost many detections; `tune` on a
    # large defect-free set sets a stricter recipe.
    max_false_alarm: float = 0.05
    steps_per_epoch: int | None = None  # default: one pass over the training images
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CPUs with native bf16, fp16 on CUDA; or fp32/bf16/fp16
    threads: int | None = None
    workers: int | None = None  # data-loading processes; None: none on CPU, several on CUDA (see loader_workers)
    channels_last: bool = True
    seed: int = 0
    name: str = "run"
    run_id: str | None = None
    resume: str | None = None
    command: str = field(default_factory=lambda: " ".join(["python -m engine"] + sys.argv[1:]))


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


def reseed_worker(worker_id: int) -> None:
    """Give each loader process its own augmentation stream (a forked copy would repeat the parent's)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(torch.initial_seed() % 2**63)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for training (None = plain fp32); weights and the loss always stay fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native_bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice (computed over the whole batch so defect-free crops do not dominate)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    dice = 1 - (2 * intersection + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def pad_to_stride(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, int, int]:
    """Reflect-pad an NCHW tensor so height and width are multiples of stride; returns original H, W."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % stride, (-width) % stride
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(height, width) > max(pad_h, pad_w) else "replicate")
    return x, height, width


@torch.no_grad()
def validate(model: UNetTiny, dataset: SegmentationDataset, mean: float, std: float, device: torch.device,
             memory_format: torch.memory_format) -> tuple[float, dict, list[np.ndarray], list[np.ndarray]]:
    """Loss and metrics on whole validation images (each at its own size); returns probabilities too."""
    model.eval()
    metrics, losses, probs, truths = SetMetrics(), [], [], []
    for image, mask in dataset.pairs:
        x = torch.from_numpy((image - mean) / std)[None, None].to(device)
        x, height, width = pad_to_stride(x, model.stride)
        logits = model(x.contiguous(memory_format=memory_format))[..., :height, :width]
        target = torch.from_numpy(mask[None, None].astype(np.float32)).to(device)
        losses.append(float(seg_loss(logits.float(), target)))
        prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
        metrics.add(prob >= 0.5, mask)
        probs.append(prob)
        truths.append(mask)
    model.train()
    return float(np.mean(losses)), metrics.result(), probs, truths


def measure_model_speed(model: UNetTiny, batch: torch.Tensor, amp_dtype: torch.dtype | None,
                        seconds: float = 4.0) -> float:
    """Images per second of forward+backward on a fixed in-memory batch: the ceiling for training."""
    model = copy.deepcopy(model).train()  # a copy, so batch-norm statistics of the real model stay untouched

    def step() -> None:
        with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(batch).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: the first passes build the convolution kernels
        step()
    n_images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n_images += len(batch)
    return n_images / (time.perf_counter() - start)


class Stopper:
    """Turns SIGTERM/SIGINT and registry cancel requests into a flag checked after each step."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self.cancelled, self._last_poll = run_id, False, 0.0
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.cancelled = True

    def poll(self) -> bool:
        """Send a heartbeat at most every 2 s and return whether the run should stop."""
        if time.monotonic() - self._last_poll > 2.0:
            self._last_poll = time.monotonic()
            self.cancelled |= registry.heartbeat(self.run_id)
        return self.cancelled


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, Path, dict, int]:
    """The config, folder, run.json and first epoch of this job; a resume keeps the run's own settings."""
    if not cfg.resume:
        run_id = cfg.run_id or runs.new_run_id(cfg.name)
        return replace(cfg, run_id=run_id), config.RUNS_DIR / run_id, {}, 0
    folder = runs.resolve_run(cfg.resume)
    info = runs.read_run_json(folder)
    saved = {k: v for k, v in info["params"].items() if k in TrainConfig.__dataclass_fields__}
    # Keep the architecture and data of the run; take the new epoch/minute budget and device.
    resumed = replace(TrainConfig(**saved), epochs=cfg.epochs, minutes=cfg.minutes, device=cfg.device,
                      resume=info["run_id"], run_id=info["run_id"], command=cfg.command)
    start_epoch = max(runs.epochs_saved(folder), default=0)
    if start_epoch >= resumed.epochs:
        raise EngineError(f"run {resumed.run_id} already has {start_epoch} epochs; pass --epochs above {start_epoch}")
    return resumed, folder, info, start_epoch


def train(cfg: TrainConfig) -> str:
    """Run one training job to the end (or budget, early stop, cancel); returns the run id."""
    cfg, folder, info, start_epoch = resolve_config(cfg)
    try:
        return fit(cfg, folder, info, start_epoch)
    except BaseException as err:
        mark_failed(cfg.run_id, f"{type(err).__name__}: {err}")
        raise


def fit(cfg: TrainConfig, folder: Path, info: dict, start_epoch: int) -> str:
    """The training job proper: data, model, the loop, checkpoints, metrics, registry."""
    # ---- setup -------------------------------------------------------------------------------
    run_id = cfg.run_id
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads or config.cpu_threads())
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    resume_state = None

    report = scan_dataset(cfg.data)
    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    train_samples, val_samples = report.split("train"), report.split("val")
    if cfg.train_fraction < 1.0:
        n_keep = max(1, round(len(train_samples) * cfg.train_fraction))
        keep = np.random.default_rng(cfg.seed).permutation(len(train_samples))[:n_keep]
        train_samples = [train_samples[i] for i in sorted(keep)]
    if not train_samples or not val_samples:
        raise DatasetError(f"{cfg.data}: needs images in both train and val splits (found {report.counts()})")
    folder.mkdir(parents=True, exist_ok=True)
    train_set = SegmentationDataset(train_samples, crop=cfg.crop, augment=True, seed=cfg.seed, scale=cfg.scale)
    val_set = SegmentationDataset(val_samples, crop=cfg.crop, augment=False, scale=cfg.scale)
    mean, std = image_stats([image for image, _ in train_set.pairs])
    data_hash = dataset_hash(report.samples)
    counts = report.counts()
    registry.upsert_dataset(Path(cfg.data).name, str(Path(cfg.data).resolve()), data_hash, counts["images"],
                            counts["defective"], counts["defect_free"], source="training")

    arch = {**PRESETS[cfg.preset]}
    arch.update({k: v for k, v in {"base": cfg.base, "depth": cfg.depth}.items() if v})
    model = UNetTiny(in_channels=1, **arch)
    if cfg.init and not start_epoch:
        model, _ = load_checkpoint(runs.checkpoint_path(runs.resolve_run(cfg.init), "best"))
        arch = {"base": model.base, "depth": model.depth}  # the initial run's architecture wins
    if start_epoch:
        model, _ = load_checkpoint(runs.checkpoint_path(folder, start_epoch))
        resume_path = folder / "resume.pth"
        if resume_path.is_file():
            resume_state = torch.load(resume_path, weights_only=True)
    model = model.to(device).to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume_state and resume_state.get("epoch") == start_epoch:
        optimizer.load_state_dict(resume_state["optimizer"])
    amp_dtype = autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    workers = loader_workers(device, cfg.workers)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda", worker_init_fn=reseed_worker,
                                         generator=torch.Generator().manual_seed(cfg.seed + start_epoch))
    steps_per_epoch = cfg.steps_per_epoch or max(1, len(loader))

    # The ceiling: forward+backward speed on an in-memory batch, measured before training starts.
    probe = torch.randn(cfg.batch_size, 1, cfg.crop, cfg.crop, device=device).to(memory_format=memory_format)
    model_speed = measure_model_speed(model, probe, amp_dtype, seconds=3.0 if device.type == "cpu" else 1.0)

    info.update({
        "run_id": run_id, "name": cfg.name, "status": "running", "params": asdict(cfg),
        "dataset": {"path": str(Path(cfg.data).resolve()), "hash": data_hash, "counts": counts},
        "arch": {"in_channels": 1, **arch}, "parameters": count_parameters(model),
        "normalisation": {"mean": mean, "std": std}, "device": str(device), "pid": os.getpid(),
        "epochs_planned": cfg.epochs, "seed": cfg.seed, "command": cfg.command,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "machine": f"{platform.machine()}, {config.cpu_threads()} cpu threads",
        "created_at": info.get("created_at", datetime.now(timezone.utc).isoformat()),
        "started_at": datetime.now(timezone.utc).isoformat(), "finished_at": None, "error": None,
        "model_images_per_s": round(model_speed, 1),
    })
    info.setdefault("threshold", 0.5)
    runs.write_run_json(folder, info)
    if registry.get_run(run_id) is None:
        registry.create_run(run_id, name=cfg.name, dataset_path=info["dataset"]["path"], dataset_hash=data_hash,
                            device=str(device), epochs_planned=cfg.epochs, params_json=json_dumps(asdict(cfg)))
    registry.update_run(run_id, status="running", pid=os.getpid(), epochs_planned=cfg.epochs,
                        started_at=datetime.now(timezone.utc), heartbeat=datetime.now(timezone.utc),
                        cancel_requested=False, error=None, finished_at=None,
                        # a run created by jobs.start_training has no parameters or hash yet
                        dataset_path=info["dataset"]["path"], dataset_hash=data_hash, device=str(device),
                        params_json=json_dumps(asdict(cfg)))
    stopper = Stopper(run_id)
    history = [row for row in runs.read_metrics(folder) if row["epoch"] <= start_epoch]
    best_dice = max((row["val_dice"] for row in history), default=-1.0)
    best_epoch = info.get("best_epoch") if history else None
    stale_epochs = 0
    best_val_stats: TuneStats | None = None
    print(f"run {run_id}: {count_parameters(model):,} parameters, {len(train_set)} train / {len(val_set)} val "
          f"images, device {device}, model alone {model_speed:.1f} img/s", flush=True)

    # ---- the loop ------------------------------------------------------------------------------
    budget_s = cfg.minutes * 60 if cfg.minutes else None
    total_steps = (cfg.epochs - start_epoch) * steps_per_epoch
    started = time.monotonic()
    train_seconds, train_images, step, stop_reason = 0.0, 0, 0, "completed"
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        epoch_start, epoch_images, losses = time.monotonic(), 0, []
        batches = iter(loader)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, file=sys.stdout,
                   mininterval=2.0, disable=None)
        for _ in bar:
            try:
                images, masks = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, masks = next(batches)
            # Cosine schedule over steps or wall time, whichever runs out first, after a short warm-up.
            progress = step / total_steps
            if budget_s:
                progress = max(progress, (time.monotonic() - started) / budget_s)
            warmup = min(1.0, (step + 1) / 30)
            lr = cfg.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in optimizer.param_groups:
                group["lr"] = lr

            images = ((images - mean) / std).to(device, non_blocking=True).to(memory_format=memory_format)
            masks = masks.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = seg_loss(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            losses.append(loss.item())
            step += 1
            epoch_images += len(images)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
            if stopper.poll():
                stop_reason = "cancelled"
                break
            if budget_s and time.monotonic() - started > budget_s:
                stop_reason = "budget"
                break
        bar.close()
        epoch_train_s = time.monotonic() - epoch_start
        train_seconds += epoch_train_s
        train_images += epoch_images
        if stop_reason == "cancelled":
            epoch -= 1  # the interrupted epoch is not saved
            break

        val_loss, val, val_probs, val_truths = validate(model, val_set, mean, std, device, memory_format)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
               "val_dice": val["dice"], "val_iou": val["iou"], "lr": lr,
               "seconds": time.monotonic() - epoch_start, "images_per_s": epoch_images / epoch_train_s}
        history.append(row)
        meta = {"run_id": run_id, "epoch": epoch, "normalisation": {"mean": mean, "std": std},
                "threshold": info["threshold"], "train_crop": cfg.crop, "scale": cfg.scale,
                "val_dice": val["dice"]}
        save_checkpoint(folder / f"model_epoch_{epoch}.pth", model, meta)
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict()}, folder / "resume.pth.tmp")
        os.replace(folder / "resume.pth.tmp", folder / "resume.pth")
        if val["dice"] > best_dice:
            best_dice, best_epoch, stale_epochs = val["dice"], epoch, 0
            info["threshold"] = best_threshold(threshold_sweep(val_probs, val_truths))
            save_checkpoint(folder / "best.pth", model, {**meta, "threshold": info["threshold"]})
            best_val_stats = TuneStats([info["threshold"]])  # for the recipe's min region area, at the end
            for probability, truth in zip(val_probs, val_truths):
                best_val_stats.add(probability, truth)
            info.update(best_epoch=epoch, best_dice=val["dice"], best_iou=val["iou"], best_val=val)
        else:
            stale_epochs += 1
        runs.write_metrics(folder, history)
        info.update(epochs_done=epoch, train_images_per_s=round(train_images / train_seconds, 1))
        runs.write_run_json(folder, info)
        registry.record_epoch(run_id, epoch, **{k: v for k, v in row.items() if k != "epoch"})
        registry.update_run(run_id, epochs_done=epoch, best_epoch=best_epoch, best_dice=info.get("best_dice"),
                            best_iou=info.get("best_iou"), threshold=info["threshold"])
        print(f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
              f"dice {val['dice']:.4f}  iou {val['iou']:.4f}  {row['images_per_s']:.1f} img/s  "
              f"{row['seconds']:.1f}s", flush=True)
        if stop_reason != "completed":
            break
        if stale_epochs >= cfg.patience:
            stop_reason = "early stop"
            break
        if budget_s and time.monotonic() - started > budget_s:
            stop_reason = "budget"
            break

    # ---- finish --------------------------------------------------------------------------------
    if best_val_stats is not None:
        # Threshold: best validation Dice (a higher one would cost Dice). Min region area: most detections
        # within the false-alarm budget.
        chosen = best_val_stats.best(cfg.max_false_alarm)
        context = {"data": str(Path(cfg.data).resolve()), "split": "val", "epoch": best_epoch, "by": "training"}
        info["recipe"] = save_recipe_for(folder, chosen, context)
        print(f"recipe: threshold {chosen['threshold']:.2f}, min region {chosen['min_region_px']} px "
              f"(val detection {chosen['detection_rate']}, false alarms {chosen['false_alarm_rate']})", flush=True)
    status = "cancelled" if stop_reason == "cancelled" else "completed"
    info.update(status=status, stop_reason=stop_reason, finished_at=datetime.now(timezone.utc).isoformat(),
                train_images_per_s=round(train_images / max(train_seconds, 1e-9), 1),
                wall_seconds=round(time.monotonic() - started, 1))
    runs.write_run_json(folder, info)
    registry.update_run(run_id, status=status, finished_at=datetime.now(timezone.utc), pid=None)
    print(f"finished ({stop_reason}): best epoch {best_epoch}, val dice {info.get('best_dice') or 0:.4f}, "
          f"threshold {info['threshold']:.2f}; training {info['train_images_per_s']} img/s vs model alone "
          f"{model_speed:.1f} img/s", flush=True)
    return run_id


def save_recipe_for(folder: Path, chosen: dict, context: dict) -> dict:
    """Save the inspection recipe picked on validation data; returns it as a dict."""
    recipe = tuned_recipe(chosen, load_recipe(folder), context)
    save_recipe(folder, recipe)
    return recipe.as_dict()


def json_dumps(obj: object) -> str:
    """Compact JSON for registry columns."""
    return json.dumps(obj, default=str)


def mark_failed(run_id: str, error: str) -> None:
    """Record a crash in run.json and the registry so it is not shown as running."""
    folder = config.RUNS_DIR / run_id
    if (folder / "run.json").is_file():
        info = runs.read_run_json(folder)
        info.update(status="failed", error=error, finished_at=datetime.now(timezone.utc).isoformat())
        runs.write_run_json(folder, info)
    if registry.get_run(run_id) is not None:
        registry.update_run(run_id, status="failed", error=error, finished_at=datetime.now(timezone.utc), pid=None)
