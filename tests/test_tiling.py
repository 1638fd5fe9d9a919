"""Tiled inference: same answer as whole-image inference, right size on long strips, bounded patch size."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import load_pair, scan_dataset
from engine.inference import (
    TILE,
    TILE_ABOVE,
    Predictor,
    predict_tiled,
    tile_size,
    tile_starts,
    tile_weights,
)


@pytest.fixture(scope="module")
def predictor(trained_run: str) -> Predictor:
    """The fixture run's model on the CPU."""
    return Predictor.from_run(trained_run)


def mosaic(dataset, rows: int, cols: int) -> np.ndarray:
    """A large gray image made of real dataset images side by side (defects and texture included)."""
    images = [load_pair(s)[0] for s in scan_dataset(dataset).samples]
    images = [images[i % len(images)] for i in range(rows * cols)]
    return np.vstack([np.hstack(images[r * cols : (r + 1) * cols]) for r in range(rows)]).astype(np.float32)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 511, 512, 513, 1000, 1600, 2049])
@pytest.mark.parametrize("tile,overlap,stride", [(512, 96, 16), (128, 32, 8), (64, 16, 4), (96, 0, 1)])
def test_tiles_cover_overlap_and_align(length: int, tile: int, overlap: int, stride: int) -> None:
    size = tile_size(length, tile, overlap, stride)
    starts = tile_starts(length, size, overlap, stride)
    assert size <= tile
    assert all(s % stride == 0 for s in starts)
    assert starts[0] == 0 and starts[-1] < length <= starts[-1] + size
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap px
    assert len(starts) <= len(tile_starts(length, tile, overlap, stride))  # shrinking never adds tiles
    weight = np.zeros(length)
    for s in starts:
        n = min(size, length - s)
        weight[s : s + n] += tile_weights(s, n, length, overlap)
    assert weight.min() > 0  # every pixel gets a prediction


def test_bad_tiling_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(1000, 64, 64)
    with pytest.raises(ValueError, match="stride"):
        tile_starts(1000, 40, 32, stride=16)


def test_tiled_equals_whole_image(predictor: Predictor, tiny_dataset) -> None:
    image = mosaic(tiny_dataset, 4, 5)  # 256 x 320: small enough to run whole, large enough for 3x3 tiles
    x = (image - predictor.mean) / predictor.std
    whole = predictor._whole(x)
    tiled = predict_tiled(predictor._whole, x, tile=128, overlap=48, stride=predictor.stride)
    assert tiled.shape == whole.shape
    difference = np.abs(tiled - whole)
    assert difference.mean() < 2e-3
    assert np.quantile(difference, 0.999) < 0.05
    threshold = predictor.threshold
    assert ((tiled >= threshold) != (whole >= threshold)).mean() < 1e-3


def test_long_strip_has_right_size_and_bounded_tiles(predictor: Predictor, tiny_dataset) -> None:
    strip = mosaic(tiny_dataset, 4, 25)  # 256 x 1600, wider than TILE_ABOVE: predict_proba tiles it
    assert strip.shape == (256, 1600) and max(strip.shape) > TILE_ABOVE
    patches: list[tuple[int, int]] = []
    original = predictor._whole

    def recording(patch: np.ndarray) -> np.ndarray:
        patches.append(patch.shape)
        return original(patch)

    predictor._whole = recording  # record what reaches the model; the computation is the real one
    try:
        probability = predictor.predict_proba(strip)
    finally:
        del predictor._whole
    assert probability.shape == strip.shape and probability.dtype == np.float32
    assert np.isfinite(probability).all() and 0 <= probability.min() and probability.max() <= 1
    assert len(patches) > 1 and all(h <= TILE and w <= TILE for h, w in patches)
    whole = predictor._whole((strip - predictor.mean) / predictor.std)
    assert np.abs(probability - whole).mean() < 2e-3


def test_tiling_memory_is_bounded(predictor: Predictor) -> None:
    import tracemalloc

    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (600, 2600)).astype(np.float32)
    seen = []

    def run(patch: np.ndarray) -> np.ndarray:
        seen.append(patch.size)
        return predictor._whole(patch)

    tracemalloc.start()
    try:
        probability = predict_tiled(run, image, TILE, 96, predictor.stride)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert probability.shape == image.shape
    assert max(seen) <= TILE * TILE
    # Two float32 maps of the image (sum and weights) plus per-tile temporaries, never a stack of tiles.
    assert peak < 2 * image.nbytes + 12 * TILE * TILE * 4


@pytest.mark.parametrize("depth", [2, 4])
def test_tiling_matches_whole_image_on_an_untrained_unet(tiny_dataset, depth: int) -> None:
    """The 2-epoch fixture barely varies, so also compare raw logits of a freshly initialised UNetTiny.

    Tiling correctness does not depend on the weights; a random network has the full receptive field of the
    architecture and strong responses everywhere, so seams or misaligned pooling grids would show.
    """
    import torch

    from engine.inference import pad_to_multiple
    from engine.model import UNetTiny

    torch.manual_seed(depth)
    model = UNetTiny(base=8, depth=depth).eval()

    def logits(patch: np.ndarray) -> np.ndarray:
        height, width = patch.shape
        with torch.inference_mode():
            batch = torch.from_numpy(pad_to_multiple(patch, model.stride)[None, None])
            return model(batch)[0, 0, :height, :width].numpy()

    image = mosaic(tiny_dataset, 4, 5)[:250, :310]  # odd sizes: the last tiles start off the plain grid
    x = (image - image.mean()) / image.std()
    whole = logits(x)
    tiled = predict_tiled(logits, x, tile=128, overlap=48, stride=model.stride)
    relative = np.abs(tiled - whole) / whole.std()
    # Before stride-aligned starts and trimmed edges this was mean 3e-3, 99.9th percentile 0.16.
    assert relative.mean() < 1e-4
    assert np.quantile(relative, 0.999) < 1e-3
