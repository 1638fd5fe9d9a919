"""UNetTiny shapes, presets and the checkpoint round trip."""

import pytest
import torch

from engine.errors import RunNotFound
from engine.model import (
    PRESETS,
    UNetTiny,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_keep_spatial_size(preset: str) -> None:
    model = UNetTiny(in_channels=1, **PRESETS[preset]).eval()
    x = torch.randn(2, 1, 64, 96)
    assert model(x).shape == (2, 1, 64, 96)


def test_fast_preset_is_small() -> None:
    assert count_parameters(UNetTiny(1, **PRESETS["fast"])) < 600_000


def test_checkpoint_round_trip(tmp_path) -> None:
    model = UNetTiny(in_channels=1, base=8, depth=2)
    with torch.no_grad():  # non-default weights and batch-norm statistics
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.encoder[0][1].running_mean.fill_(0.3)
    model.eval()
    meta = {"epoch": 3, "normalisation": {"mean": 0.4, "std": 0.2}, "threshold": 0.45}
    path = save_checkpoint(tmp_path / "model_epoch_3.pth", model, meta)
    loaded, loaded_meta = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert loaded_meta == meta
    assert (loaded.base, loaded.depth) == (8, 2)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_corrupt_checkpoint_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "best.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RunNotFound, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(RunNotFound, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_half_resolution_stem_round_trips_and_older_checkpoints_still_load(tmp_path) -> None:
    lean = UNetTiny(in_channels=1, **PRESETS["lean"]).eval()
    assert lean.stride == 32 and lean.arch["stem"] == 2
    path = save_checkpoint(tmp_path / "lean.pth", lean, {"epoch": 1})
    loaded, _ = load_checkpoint(path)
    x = torch.randn(1, 1, 64, 96)
    assert torch.equal(lean(x), loaded(x)) and loaded.arch == lean.arch
    # A checkpoint written before the stem existed names no stem: it loads as a full-resolution U-Net.
    old = UNetTiny(in_channels=1, base=8, depth=2)
    payload = {"state_dict": old.state_dict(), "arch": {"in_channels": 1, "base": 8, "depth": 2}, "meta": {}}
    torch.save(payload, tmp_path / "old.pth")
    assert load_checkpoint(tmp_path / "old.pth")[0].arch == {"in_channels": 1, "base": 8, "depth": 2}
    with pytest.raises(ValueError, match="stem must be 1 or 2"):
        UNetTiny(stem=4)


def test_half_resolution_costs_a_quarter_of_the_arithmetic() -> None:
    from engine.compute import gflop_per_crop

    full, half = (gflop_per_crop(UNetTiny(1, **PRESETS[p]), 192) for p in ("balanced", "lean"))
    assert half < 0.35 * full  # the U-Net at a quarter of the pixels, plus one light full-resolution convolution
