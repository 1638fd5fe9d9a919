"""The schedule of a run: its learning rate, its budget of epochs or minutes, and when patience ends it."""

from __future__ import annotations

import math
import time


def get_lr(step: int, progress: float, base_lr: float, warmup_steps: int = 30) -> float:
    """Learning rate: linear warm-up over the first steps, then cosine from base_lr to 0 as progress goes 0 -> 1."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return base_lr * warmup * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Patience:
    """Early stopping that waits for the schedule: epochs without improvement count only once `after` of the
    budget is spent, so a plateau at a high learning rate never ends a run that has minutes left."""

    def __init__(self, patience: int, after: float) -> None:
        self.patience, self.after, self.stale = patience, after, 0

    def converged(self, improved: bool, progress: float) -> bool:
        """Record one epoch; True once `patience` counted epochs in a row brought no improvement."""
        self.stale = 0 if improved else self.stale + (progress >= self.after)
        return self.stale >= self.patience


class Budget:
    """How far a run is through its epochs or minutes, whichever runs out first."""

    def __init__(self, epoch_limit: int | None, start_epoch: int, steps_per_epoch: int, minutes: float | None) -> None:
        self.total_steps = (epoch_limit - start_epoch) * steps_per_epoch if epoch_limit else None
        self.seconds = minutes * 60 if minutes else None
        self.started = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since training started."""
        return time.monotonic() - self.started

    def progress(self, step: int, elapsed: float | None = None) -> float:
        """Fraction of the budget used, 0..1 (what the LR schedule follows), at `elapsed` seconds (default now)."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        parts = [step / self.total_steps if self.total_steps else 0.0, elapsed / self.seconds if self.seconds else 0.0]
        return min(1.0, max(parts))

    def time_up(self, elapsed: float | None = None) -> bool:
        """Whether the wall-time budget is spent at `elapsed` seconds (default now)."""
        return self.seconds is not None and (self.elapsed() if elapsed is None else elapsed) > self.seconds
