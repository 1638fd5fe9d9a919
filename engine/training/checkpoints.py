"""The one checkpoint a run resumes from: weights, optimizer state and epoch, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from engine.errors import EngineError
from engine.model import UNetTiny
from engine.runfolder import RESUME_FILE
from engine.storage import atomic_write_bytes


def save_resume(folder: Path, epoch: int, model: UNetTiny, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write the one checkpoint `train --resume` starts from (weights, optimizer state, epoch) atomically."""
    buffer = io.BytesIO()
    torch.save({"epoch": epoch, "arch": model.arch,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "meta": meta}, buffer)
    atomic_write_bytes(folder / RESUME_FILE, buffer.getvalue())


def load_resume(folder: Path) -> dict:
    """The resume checkpoint of a run folder; a one-line EngineError if it is missing or unreadable."""
    path = folder / RESUME_FILE
    if not path.is_file():
        raise EngineError(f"run {folder.name} has no {RESUME_FILE} (no finished epoch, or made by an older "
                          f"version); start a new run, or fine-tune from it with --init {folder.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not {"epoch", "arch", "state_dict", "optimizer"} <= set(state):
            raise ValueError("not a resume checkpoint")
    except Exception as err:  # a truncated, corrupt or foreign file
        raise EngineError(f"{path} is unreadable ({type(err).__name__}); the run cannot be resumed, but its "
                          f"epochs can still be used: start a new run with --init {folder.name}") from err
    return state
