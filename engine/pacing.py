"""Where a training run's wall time goes, and how much of it validation may take.

Validation on whole images costs as much as a third of an epoch on a CPU (Magnetic Tile: 115 images of a few
hundred px each). A run gives it a bounded share of its wall time (`--val-share`, 10 % by default): epochs are
validated on a fixed sample of the val split, spread over defect-free images and defects of every size, as often
as the share allows, and the best candidates on the whole split at the end, so that the recipe and readiness are
still chosen on all of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

VAL_SHARE = 0.10  # the default bound on validation's share of a run's wall time
# The fewest images a sampled validation looks at: on fewer, image AP moves by a whole image's rank.
VAL_SAMPLE_MIN = 24
# Defects by their share of the image (evaluate's bands), so that a sample holds small and large ones alike.
SIZE_BANDS = (0.001, 0.01, 0.1)
PARTS = ("train", "validate", "hard_negatives")


class Clock:
    """A run's wall time by part (train, validate, hard_negatives; the rest is `other`), from its start."""

    def __init__(self, minutes_before: float = 0.0) -> None:
        self.started = time.monotonic()
        self.minutes_before = minutes_before  # a resumed run's clock goes on from its last epoch
        self.seconds = dict.fromkeys(PARTS, 0.0)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Count the time spent inside the block to part `name`."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] += time.monotonic() - start

    def elapsed(self) -> float:
        """Seconds since this process started the run."""
        return time.monotonic() - self.started

    def minutes(self) -> float:
        """Minutes the run has spent so far, a resumed run's earlier ones included."""
        return self.minutes_before + self.elapsed() / 60

    def shares(self) -> dict[str, float]:
        """Each part's share of the wall time so far (train, validate, hard_negatives, other), adding up to 1."""
        wall = max(self.elapsed(), 1e-9)
        shares = {name: round(seconds / wall, 4) for name, seconds in self.seconds.items()}
        shares["other"] = round(max(0.0, 1 - sum(shares.values())), 4)
        return shares

    def line(self) -> str:
        """The log line that says where the time went."""
        shares = self.shares()
        parts = ", ".join(f"{name.replace('_', ' ')} {share:.0%}" for name, share in shares.items())
        return f"time: {parts} of {self.elapsed() / 60:.1f} min"


def size_band(defect_fraction: float) -> int:
    """0 for a defect-free image, else 1.. by the defect's share of the image (SIZE_BANDS)."""
    return 0 if defect_fraction <= 0 else 1 + int(np.searchsorted(SIZE_BANDS, defect_fraction))


def stratified_order(bands: list[int], seed: int = 0) -> list[int]:
    """Indices of images in an order whose every prefix holds each band (size_band) about in its share of the
    whole: shuffled within a band (seeded), then interleaved, the band furthest behind its share first."""
    rng = np.random.default_rng([seed, 20261207])
    groups = {band: list(rng.permutation([i for i, b in enumerate(bands) if b == band]))
              for band in sorted(set(bands))}
    share = {band: len(group) / len(bands) for band, group in groups.items()}
    taken = dict.fromkeys(groups, 0)
    order = []
    for position in range(1, len(bands) + 1):
        band = min((b for b in groups if taken[b] < len(groups[b])),
                   key=lambda b: (taken[b] - share[b] * position, b))
        order.append(int(groups[band][taken[band]]))
        taken[band] += 1
    return order


@dataclass
class ValidationPlan:
    """Which validation images an epoch is validated on and when, within `share` of the run's wall time."""

    order: list[int]  # the val split in stratified order; an epoch's sample is its first `size`
    size: int
    share: float
    seconds_per_image: float  # measured, updated after every validation
    epoch_seconds: float  # an epoch's training (and hard negatives), measured
    wall_seconds: float  # the run's projected wall time
    epochs: int  # the epochs forecast
    spent: float = 0.0  # seconds of sampled validations so far
    crops_per_image: float = 0.0  # what validating an image costs in training crops: the guess until one is timed
    measured: bool = False  # whether seconds_per_image was measured on a validation

    @property
    def sampled(self) -> bool:
        """Whether epochs are validated on part of the split only (the best candidates on all of it at the end)."""
        return self.size < len(self.order)

    @property
    def sample(self) -> list[int]:
        """The val images an epoch is validated on."""
        return self.order[: self.size]

    def final_seconds(self) -> float:
        """What the validation of the last epoch on the whole split costs (every plan ends with one)."""
        return self.seconds_per_image * len(self.order)

    def allowance(self) -> float:
        """Seconds the epochs' validations may take over the run, the final one on the whole split set aside."""
        return self.share * self.wall_seconds - self.final_seconds()

    def due(self, progress: float, last_epoch: bool) -> bool:
        """Whether to validate the epoch that ends at `progress` (0..1 of the budget): when the allowance earned by
        the end of the next epoch still covers it. The last epoch is validated on the whole split: at once where
        that is the plan's sample, else by the final validation."""
        if last_epoch:
            return not self.sampled
        earned = self.allowance() * min(1.0, progress + 1 / max(self.epochs, 1))
        return self.spent + self.seconds_per_image * self.size <= earned + 1e-9

    def record(self, seconds: float, images: int, final: bool = False) -> None:
        """Note what a validation of `images` images took; an epoch's counts against the allowance (the final one
        on the whole split was set aside)."""
        self.seconds_per_image, self.measured = seconds / max(images, 1), True
        if not final:
            self.spent += seconds

    def pace_training(self, epoch_seconds: float, crops_per_s: float) -> None:
        """Note an epoch's training time and speed: until a validation is timed, its cost follows that speed."""
        self.epoch_seconds = epoch_seconds
        if not self.measured and self.crops_per_image and crops_per_s > 0:
            self.seconds_per_image = self.crops_per_image / crops_per_s

    def describe(self) -> str:
        """The log line that says how this run validates."""
        every = self.allowance() / max(self.seconds_per_image * self.size * self.epochs, 1e-9)
        often = ("every epoch" if every >= 1 else f"about every {math.ceil(1 / every)} epochs"
                 if every * self.epochs >= 2 else "at the end only")
        if not self.sampled:
            return (f"validation: all {self.size} val images, {often} (~{self.seconds_per_image * self.size:.0f} s "
                    f"each), within {self.share:.0%} of the run's time")
        return (f"validation: a fixed sample of {self.size} of the {len(self.order)} val images (defect-free and "
                f"defects of every size in their shares), {often} (~{self.seconds_per_image * self.size:.0f} s "
                f"each); the best candidates on all of them at the end (~{self.final_seconds():.0f} s), within "
                f"{self.share:.0%} of the run's time where that allows")


def plan_validation(bands: list[int], share: float, seconds_per_image: float, epoch_seconds: float,
                    wall_seconds: float | None, epoch_limit: int | None, seed: int = 0,
                    crops_per_image: float = 0.0) -> ValidationPlan:
    """The validation plan of a run: the largest fixed sample (at least VAL_SAMPLE_MIN images, at most the whole
    split) that the share lets every epoch validate, given measured costs; `wall_seconds` is the budget (None:
    epoch_limit epochs of `epoch_seconds` each, plus their validation)."""
    full = len(bands)
    wall = wall_seconds or (epoch_limit or 1) * epoch_seconds / (1 - share)
    epochs = max(1, int(wall // max(epoch_seconds, 1e-9)))
    if epoch_limit:
        epochs = min(epochs, epoch_limit)
    # Images each epoch may validate, one validation of the whole split at the end set aside.
    fit = (share * wall - seconds_per_image * full) / (epochs * seconds_per_image)
    size = int(max(VAL_SAMPLE_MIN, fit))
    # A sample pays for itself only well below the whole split (its best candidates are validated again on all);
    # above that, the whole split is validated as often as the share allows.
    if fit >= full or size > full // 2:
        size = full
    return ValidationPlan(stratified_order(bands, seed), max(1, size), share, seconds_per_image, epoch_seconds, wall,
                          epochs, crops_per_image=crops_per_image)


def forecast_epochs(wall_seconds: float, plan: ValidationPlan) -> int:
    """Epochs a budget of `wall_seconds` gives at the plan's training time per epoch, with its validations (the
    last epoch ends with the budget, so a started one counts)."""
    validating = plan.allowance() / max(plan.epochs, 1) if plan.allowance() > 0 else 0.0
    return max(1, math.ceil(wall_seconds / (plan.epoch_seconds + validating)))
