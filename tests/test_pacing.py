"""Accuracy per CPU minute: the precision the hardware picks, the arithmetic of a crop, and how a run paces its
validation (engine.compute, engine.pacing)."""

import numpy as np
import pytest
import torch

from engine.compute import autocast_dtype, gflop_per_crop, native_bf16, preset_costs
from engine.model import PRESETS, UNetTiny
from engine.pacing import VAL_SAMPLE_MIN, Clock, plan_validation, size_band, stratified_order


def test_a_probe_that_says_no_native_bf16_picks_fp32_and_one_that_says_yes_picks_bf16() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "auto", probe=lambda device: False) is None  # fp32
    assert autocast_dtype(cpu, "auto", probe=lambda device: True) == torch.bfloat16
    assert autocast_dtype(cuda, "auto", probe=lambda device: False) == torch.float16  # an older GPU: fp16 + scaler
    assert autocast_dtype(cuda, "auto", probe=lambda device: True) == torch.bfloat16
    # An explicit precision is taken as asked, whatever the hardware.
    assert autocast_dtype(cpu, "bf16", probe=lambda device: False) == torch.bfloat16
    assert autocast_dtype(cpu, "fp32", probe=lambda device: True) is None
    # The real probe answers, and `auto` follows it.
    assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if native_bf16(cpu) else None)


def _conv_flops(c_in: int, c_out: int, kernel: int, side: int) -> int:
    """Forward FLOP of one convolution: a multiply-add (two FLOP) per weight per output pixel."""
    return 2 * c_in * c_out * kernel * kernel * side * side


def test_gflop_per_crop_matches_a_hand_count_of_the_fast_presets_convolutions() -> None:
    base, depth, crop = PRESETS["fast"]["base"], PRESETS["fast"]["depth"], 64
    widths = [base * 2**i for i in range(depth + 1)]
    first = _conv_flops(1, widths[0], 3, crop)
    forward = first + _conv_flops(widths[0], widths[0], 3, crop)
    for level in range(1, depth + 1):  # encoder: two 3x3 convolutions per level at 1/2**level of the side
        side = crop >> level
        forward += _conv_flops(widths[level - 1], widths[level], 3, side) + _conv_flops(widths[level], widths[level],
                                                                                          3, side)
    for level in reversed(range(depth)):  # decoder: a 2x2 stride-2 transposed convolution up, then two 3x3
        side = crop >> level
        forward += _conv_flops(widths[level + 1], widths[level], 2, side // 2)  # one 2x2 kernel per input pixel
        forward += _conv_flops(2 * widths[level], widths[level], 3, side) + _conv_flops(widths[level], widths[level],
                                                                                        3, side)
    forward += _conv_flops(widths[0], 1, 1, crop)  # the 1x1 head
    # Backward: the gradients of the weights and of the inputs cost a forward each, but the image needs none.
    hand = 3 * forward - first
    assert gflop_per_crop(UNetTiny(1, base=base, depth=depth), crop) == pytest.approx(hand / 1e9, rel=1e-9)
    # Cost grows with the crop's area, and the presets are ordered by it.
    assert gflop_per_crop(UNetTiny(1, base=base, depth=depth), 2 * crop) == pytest.approx(4 * hand / 1e9, rel=1e-9)


def test_preset_costs_give_every_preset_its_gflop_and_the_speed_it_reaches() -> None:
    rows = preset_costs(32, batch=2, seconds=0.05)
    assert [row["preset"] for row in rows] == list(PRESETS)
    for row in rows:
        model = UNetTiny(1, row["base"], row["depth"], row.get("stem", 1))
        assert row["crop"] == 32 and row["gflop_per_crop"] == pytest.approx(gflop_per_crop(model, 32), abs=1e-3)
        assert row["crops_per_s"] > 0 and row["gflop_per_s"] == pytest.approx(row["gflop_per_crop"] *
                                                                              row["crops_per_s"], rel=0.02, abs=0.01)


def test_every_prefix_of_the_stratified_order_holds_each_kind_in_its_share() -> None:
    fractions = [0.0] * 60 + [0.0005] * 10 + [0.005] * 20 + [0.2] * 30
    bands = [size_band(f) for f in fractions]
    assert sorted(set(bands)) == [0, 1, 2, 4]
    order = stratified_order(bands, seed=1)
    assert sorted(order) == list(range(len(bands))) and order == stratified_order(bands, seed=1)
    for size in (8, 24, 60):
        counts = np.bincount([bands[i] for i in order[:size]], minlength=5)
        expected = np.bincount(bands, minlength=5) * size / len(bands)
        assert np.all(np.abs(counts - expected) <= 1), (size, counts, expected)


def test_a_plan_samples_when_the_whole_split_would_take_more_than_its_share() -> None:
    bands = [0] * 60 + [2] * 60
    # Cheap validation: every epoch on the whole split.
    cheap = plan_validation(bands, 0.1, seconds_per_image=0.001, epoch_seconds=30, wall_seconds=900,
                            epoch_limit=None)
    assert not cheap.sampled and cheap.due(0.1, last_epoch=False)
    # Dear validation: a fixed sample, the whole split at the end, and sampled epochs only as the share allows.
    dear = plan_validation(bands, 0.1, seconds_per_image=0.2, epoch_seconds=30, wall_seconds=900, epoch_limit=None)
    assert dear.sampled and dear.size == VAL_SAMPLE_MIN and dear.sample == dear.order[:VAL_SAMPLE_MIN]
    assert dear.final_seconds() == pytest.approx(0.2 * 120)
    assert not dear.due(0.99, last_epoch=True)  # the final validation covers the last epoch
    validated = 0
    for epoch in range(1, dear.epochs + 1):
        if dear.due(epoch / dear.epochs, last_epoch=False):
            dear.record(0.2 * dear.size, dear.size)
            validated += 1
    assert 0 < validated < dear.epochs
    assert dear.spent + dear.final_seconds() <= 0.1 * 900 + 1e-9


def test_the_clock_adds_up_the_parts_of_a_runs_time() -> None:
    clock = Clock(minutes_before=2.0)
    with clock.part("validate"):
        sum(range(200_000))
    shares = clock.shares()
    assert set(shares) == {"train", "validate", "hard_negatives", "other"}
    assert shares["validate"] > 0 and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert clock.minutes() >= 2.0 and "validate" in clock.line()
