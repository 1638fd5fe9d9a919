"""A run folder's layout: the one place the names of its files are spelled (run.json, metrics, checkpoints,
recipe, export, log). Reading and writing them is runs', runstore's and their owners' job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_JSON = "run.json"
METRICS_FILE = "metrics.csv"
BEST_FILE = "best.pth"
RESUME_FILE = "resume.pth"  # the one checkpoint a run resumes from: weights, optimizer state, epoch
RECIPE_FILE = "recipe.json"
EXPORT_DIR = "export"
REPORT_FILE = "report.json"  # in export/: what export measured, gates included
LOG_FILE = "train.log"
CONFIG_FILE = "train_config.json"  # the TrainConfig a background run was started with
ONNX_FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx"}  # what export writes (INT8 only behind its gate)
# Every backend but torch reads one of those files: ONNX Runtime, or OpenVINO (fp32, bf16 arithmetic, or the INT8
# file), so OpenVINO needs no export step of its own.
MODEL_FILES = {**ONNX_FILES, "openvino": "model.onnx", "openvino-bf16": "model.onnx",
               "openvino-int8": "model.int8.onnx"}
BACKENDS = ("torch", *MODEL_FILES)


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder."""

    path: Path

    @property
    def run_json(self) -> Path:
        """run.json: the run's record."""
        return self.path / RUN_JSON

    @property
    def metrics(self) -> Path:
        """metrics.csv: one row per epoch."""
        return self.path / METRICS_FILE

    @property
    def best(self) -> Path:
        """best.pth: the best validated epoch's weights."""
        return self.path / BEST_FILE

    @property
    def resume(self) -> Path:
        """resume.pth: what `train --resume` starts from."""
        return self.path / RESUME_FILE

    @property
    def recipe(self) -> Path:
        """recipe.json: the verdict rules served."""
        return self.path / RECIPE_FILE

    @property
    def export(self) -> Path:
        """export/: the exported models, their report and gate re-checks."""
        return self.path / EXPORT_DIR

    @property
    def report(self) -> Path:
        """export/report.json."""
        return self.export / REPORT_FILE

    def epoch(self, epoch: int) -> Path:
        """model_epoch_N.pth: one epoch's weights."""
        return self.path / f"model_epoch_{epoch}.pth"

    def exported(self, name: str) -> Path:
        """A file in export/."""
        return self.export / name
