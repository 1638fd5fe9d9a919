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
