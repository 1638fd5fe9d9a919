"""TrainConfig: everything that defines a training run, its defaults and its checks; imports no torch, so a page
or a command line can build one without loading the training stack."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.metrics import DETECTION_GOAL, FALSE_ALARM_GOAL
from engine.pacing import VAL_SHARE
from engine.paint import DEFECTS_PER_IMAGE, params_for
from engine.presets import PRESETS
from engine.synth import DEFECT_TYPES

DEFAULT_EPOCHS = 40  # when neither --epochs nor --minutes is given
SUGGESTED_MINUTES = 15.0  # the budget the README and the Train page suggest for a real dataset
# Hard negatives (engine/training/hard_negatives.py) are on by default where painting: a model taught on painted defects flags real
# structures of good parts (KolektorSDD, good parts only: 16 of 69 flagged without hard negatives, 9 with); beside
# real defects alone it was not shown to help, so it is off there.
HARD_SHARE_WHEN_PAINTING = 0.25
# Where the training images hold no labelled defect, painting is the only way to learn one: on by default there.
PAINT_WITHOUT_LABELS = 0.5
# Painted validation measures detection on a stand-in; only its false alarms are real, so the recipe holds the
# goal on their upper confidence bound (with 58 good images: none flagged) rather than on the measured rate.
PAINTED_CONFIDENCE = 0.95


def option(default: Any, help: str, **extra: Any) -> Any:
    """A TrainConfig field with its command-line help (the `train` options are built from these fields)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in run.json. The one place training defaults live."""

    data: str = option("", "dataset folder (DIR/images, DIR/masks, optional manifest.csv)")
    epochs: int | None = option(None, "most epochs (default: until --minutes, or 40 without a budget)")
    minutes: float | None = option(None, "wall-time budget; the learning rate anneals within it")
    preset: str = option("balanced", "UNetTiny size", choices=tuple(PRESETS))
    base: int | None = option(None, "channels of the first level (overrides the preset)")
    depth: int | None = option(None, "down-sampling levels (overrides the preset)")
    batch_size: int = option(16, "crops per step")
    crop: int | None = option(None, "training crop side in px (default: from the image and defect sizes)")
    scale: float | None = option(None, "resize images for training and inference (default: from the image and "
                                       "defect sizes; 0.5 is about 4x faster)")
    train_fraction: float = option(1.0, "train on a seeded subset of the train split")
    init: str = option("auto", "starting weights: auto (the shipped pre-trained ones where the architecture "
                               "matches), pretrained, none, or a run id to fine-tune")
    loss: str = option("bce-crop-dice", "training loss", choices=("bce-crop-dice", "bce-dice", "focal-dice",
                                                                  "bce-tversky"))
    defect_share: float = option(0.5, "share of every batch that is crops centred on a defect")
    hard_share: float | None = option(None, "share of every batch that is crops around hard negatives: spots where "
                                            "the model last flagged a defect-free training image (default: "
                                            f"{HARD_SHARE_WHEN_PAINTING} when painting, else 0)")
    paint: float | None = option(None, "share of defect-free training crops that get defects painted on: the set's "
                                       "own labelled defects, moved, where it has some; else the generator's "
                                       "(engine.paint), so that a set of good images alone can train a model (not "
                                       f"ready until tuned on real defects). Default: {PAINT_WITHOUT_LABELS} where "
                                       "the training images hold no labelled defect, else 0")
    paint_types: str | None = option(None, "the generator's defect types to paint, comma-separated, of "
                                           f"{','.join(DEFECT_TYPES)} (default: all): the kinds your line looks "
                                           "for; where a set has labelled defects, those are moved instead")
    paint_size: float = option(0.0, "size of the painted defects: the side of the square they are drawn to, as a "
                                    "share of the image's short side (0 to 1) or in px of the full-size image (> 1); "
                                    "default 0: each training crop (at validation, each image)")
    paint_count: int = option(DEFECTS_PER_IMAGE, "most painted defects per painted crop or image (1 to this many)")
    val_fraction: float = option(0.15, "share of train used for validation when the set has no val split")
    lr: float = option(3e-3, "peak learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    patience: int = option(10, "stop after this many epochs without a better validation score, counted only "
                               "in the annealed part of the schedule (see --patience-after)")
    patience_after: float = option(0.75, "share of the budget after which patience counts")
    max_false_alarm: float = option(FALSE_ALARM_GOAL, "false-alarm goal of the saved recipe on validation; a run that "
                                          "misses it is marked not ready")
    goal_detection: float = option(DETECTION_GOAL, "detection goal: the share of validation's defective images the "
                                                   "saved recipe must find for the run to be ready")
    val_share: float = option(VAL_SHARE, "most share of the run's wall time spent validating (epochs on a fixed "
                                         "sample of the val split, the best on all of it at the end) and, per "
                                         "epoch, looking for hard negatives")
    steps_per_epoch: int | None = option(None, "steps per epoch (default: one pass over the training images, "
                                               "at least 50)")
    device: str = option("auto", "where to train", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "autocast precision (auto: bf16 where the GPU or CPU does it natively (AMX, "
                                    "AVX-512 BF16), else fp16 on GPUs and fp32 on CPUs)",
                            choices=("auto", "fp32", "bf16", "fp16"))
    threads: int | None = option(None, "CPU threads (default: every core this process may use)")
    workers: int | None = option(None, "data-loading processes (default: 0 on CPU, up to 8 on CUDA)")
    batches: str = option("auto", "where training crops are cut and augmented: on the training device from images "
                                  "held there, or by the CPU loader (auto: the device on CUDA unless painting)",
                          choices=("auto", "device", "loader"))
    nproc: int = option(1, "training processes on this machine: above 1 launches torchrun (DistributedDataParallel, "
                           "gloo on CPUs, NCCL on GPUs); --batch-size stays the batch of the whole group")
    channels_last: bool = option(True, "channels-last memory format")
    seed: int = option(0, "random seed")
    name: str = option("run", "run name (part of the run id)")
    run_id: str | None = option(None, "", hidden=True)
    resume: str | None = option(None, "continue RUN from its last checkpoint")
    command: str = field(default_factory=lambda: " ".join(["python -m engine"] + sys.argv[1:]),
                         metadata={"hidden": True})

    def options(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a command line would have to say), command excluded."""
        default = TrainConfig()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "command" and getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A config written by `jobs.start_training` (JSON of the fields); EngineError if unreadable or unknown."""
        try:
            values = json.loads(Path(path).read_text())
            return cls(**values)
        except (OSError, ValueError, TypeError) as err:
            raise EngineError(f"{path}: not a training config ({err})") from None

    def check(self, processes: int | None = None) -> None:
        """EngineError for options that cannot work together, before any data is read; `processes` is the size
        of the training group (default nproc; under torchrun, every process of every machine)."""
        processes = self.nproc if processes is None else processes
        if processes < 1:
            raise EngineError(f"--nproc must be at least 1 (got {processes})")
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                raise EngineError(f"{flag} must be between {low:g} and {high:g}, got {value:g}" if high < math.inf
                                  else f"{flag} must be at least {low:g}, got {value:g}")
        if not 0 < self.lr <= 10:
            raise EngineError(f"--lr must be above 0 and at most 10, got {self.lr:g}")
        stride = 2 ** (self.depth or PRESETS[self.preset]["depth"]) * PRESETS[self.preset].get("stem", 1)
        if self.crop is not None and self.crop % stride:
            raise EngineError(f"--crop must be a multiple of {stride} (the model halves it {stride.bit_length() - 1} "
                              f"times), got {self.crop}")
        if self.batch_size % processes:
            raise EngineError(f"--batch-size {self.batch_size} does not split evenly over {processes} processes")
        if self.batches == "device" and self.paint:
            raise EngineError("--batches device cannot paint defects (painting runs on the CPU); use --batches loader")
        # an unknown defect type, a size or count that cannot be painted is named now, not after the data is read
        params_for(self.paint_types, size=self.paint_size, count=self.paint_count)

    @property
    def epoch_limit(self) -> int | None:
        """Most epochs to train: as asked, unlimited within a minutes budget, else DEFAULT_EPOCHS."""
        return self.epochs if self.epochs else (None if self.minutes else DEFAULT_EPOCHS)


# (field, lowest, highest) of the numeric options; None (the default picks) is always allowed.
_RANGES = (("epochs", 1, math.inf), ("minutes", 0.01, math.inf), ("base", 1, 512), ("depth", 1, 6),
           ("batch_size", 1, 4096), ("crop", 16, 4096), ("scale", 0.05, 4.0), ("train_fraction", 0.001, 1.0),
           ("defect_share", 0.0, 1.0), ("hard_share", 0.0, 1.0), ("paint", 0.0, 1.0), ("val_fraction", 0.01, 0.9),
           ("weight_decay", 0.0, 10.0), ("patience", 1, math.inf), ("patience_after", 0.0, 1.0),
           ("max_false_alarm", 0.0, 1.0), ("goal_detection", 0.0, 1.0), ("val_share", 0.01, 0.9),
           ("steps_per_epoch", 1, math.inf),
           ("threads", 1, 4096), ("workers", 0, 256))
