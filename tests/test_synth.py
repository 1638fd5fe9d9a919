"""Procedural dataset generator: reproducibility, exact masks, manifest and split contract, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import surfaces, synth, synthset
from engine.errors import EngineError
from engine.synth import SynthParams, render_sample
from engine.synthset import generate_dataset


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path: Path) -> None:
    params = SynthParams(size=40, tint=0.3)
    # 70 images: above the pool threshold, so workers=2 really runs a process pool.
    generate_dataset(tmp_path / "a", 70, seed=5, params=params, workers=2)
    generate_dataset(tmp_path / "b", 70, seed=5, params=params, workers=2)
    generate_dataset(tmp_path / "c", 70, seed=5, params=params, workers=1)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert "manifest.csv" in a and len(a) > 70
    assert a == b
    assert a == c
    generate_dataset(tmp_path / "d", 70, seed=6, params=params, workers=1)
    assert _files(tmp_path / "d")["images/000000.png"] != a["images/000000.png"]


@pytest.mark.parametrize("tint", [0.0, 1.0])
def test_mask_covers_exactly_what_was_drawn(tint: float) -> None:
    params = SynthParams(size=96, tint=tint)
    for seed in range(12):
        clean, clean_mask, clean_types = render_sample(seed, params, defect_free=True)
        image, mask, types = render_sample(seed, params, defect_free=False)
        assert clean_types == [] and not clean_mask.any()
        assert types and set(types) <= set(synth.DEFECT_TYPES)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert mask.shape == image.shape[:2] == (96, 96)
        assert image.shape == ((96, 96, 3) if tint else (96, 96))
        diff = np.abs(image.astype(np.int16) - clean.astype(np.int16))
        if diff.ndim == 3:
            diff = diff.max(axis=2)
        inside = diff[mask > 0].mean()
        # Only the optical blur (radius <= 3 px) may carry a defect outside its footprint.
        near = cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0
        assert diff[~near].max() == 0, f"seed {seed}: pixels changed far from the mask"
        outside = diff[near & (mask == 0)].mean()
        assert inside > 3 * outside + 1, f"seed {seed}: inside {inside:.2f} vs outside {outside:.2f}"


def test_hard_thin_scratches_stay_visible() -> None:
    params = SynthParams(size=96, defect_weights={"scratch": 1.0}, max_defects=1, difficulty=1.0)
    widths = []
    for seed in range(20):
        clean, _, _ = render_sample(seed, params, True)
        image, mask, types = render_sample(seed, params, False)
        assert types == ["scratch"]
        clean = clean.astype(np.float32)
        local_noise = (clean - cv2.GaussianBlur(clean, (0, 0), 2)).std()
        contrast = np.abs(image.astype(np.float32) - clean)[mask > 0].mean()
        assert contrast > 1.8 * local_noise, f"seed {seed}: contrast {contrast:.2f}, noise {local_noise:.2f}"
        widths.append(cv2.countNonZero(mask))
    assert min(widths) < max(widths)  # not one fixed geometry


def test_dataset_contract_manifest_masks_and_splits(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    result = generate_dataset(tmp_path, 40, seed=3, params=SynthParams(size=48), workers=1,
                              progress=lambda done, total, what: seen.append((done, total)))
    rows = _manifest(tmp_path)
    assert list(rows[0]) == list(synthset.MANIFEST_COLUMNS)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(40)]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{r['id']}.png" for r in rows]
    for row in rows:
        image = _read(tmp_path / "images" / f"{row['id']}.png")
        mask_path = tmp_path / "masks" / f"{row['id']}.png"
        assert mask_path.exists() == bool(row["defect_types"])
        if mask_path.exists():
            mask = _read(mask_path)
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 255}
            assert float(row["defect_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-5)
        else:
            assert row["defect_fraction"] == "0.00000"
        # The manifest seed re-renders the image exactly.
        again, _, types = render_sample(int(row["seed"]), SynthParams(size=48), not row["defect_types"])
        assert np.array_equal(again, image) and ";".join(types) == row["defect_types"]

    free = [r for r in rows if not r["defect_types"]]
    assert len(free) == 16 == result["defect_free"] and result["defective"] == 24 and result["images"] == 40
    for split in synthset.SPLITS:
        in_split = [r for r in rows if r["split"] == split]
        assert any(r["defect_types"] for r in in_split), split
        assert any(not r["defect_types"] for r in in_split), split
        assert result["per_split"][split] == len(in_split)
    assert result["per_split"]["train"] > result["per_split"]["val"]
    assert seen and seen[-1] == (40, 40) and [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize(("count", "share"), [(10, 0.0), (10, 1.0), (33, 0.37), (25, 0.5)])
def test_defect_free_share_is_exact(tmp_path: Path, count: int, share: float) -> None:
    result = generate_dataset(tmp_path, count, seed=1, params=SynthParams(size=32, defect_free=share), workers=1)
    rows = _manifest(tmp_path)
    expected = round(count * share)
    assert sum(not r["defect_types"] for r in rows) == expected == result["defect_free"]
    assert len(list((tmp_path / "masks").glob("*.png"))) == count - expected


def test_restricting_types_to_scratch(tmp_path: Path) -> None:
    params = SynthParams(size=48, defect_free=0.1, defect_weights={"scratch": 1.0})
    generate_dataset(tmp_path, 20, seed=2, params=params, workers=1)
    drawn = {t for r in _manifest(tmp_path) for t in r["defect_types"].split(";") if t}
    assert drawn == {"scratch"}


def test_regenerating_into_a_used_folder_leaves_no_stale_files(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 30, seed=1, params=SynthParams(size=32, defect_free=0.0), workers=1)
    generate_dataset(tmp_path, 20, seed=2, params=SynthParams(size=32, defect_free=0.5), workers=1)
    rows = _manifest(tmp_path)
    assert len(list((tmp_path / "images").glob("*.png"))) == 20
    masks = sorted(p.stem for p in (tmp_path / "masks").glob("*.png"))
    assert masks == sorted(r["id"] for r in rows if r["defect_types"])
    assert len(masks) == 10


def test_generate_never_writes_into_a_folder_of_other_files(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "images").mkdir(parents=True)
    cv2.imwrite(str(theirs / "images" / "000001.png"), np.full((16, 16), 80, np.uint8))  # a name generate would use
    with pytest.raises(EngineError, match="did not write"):
        generate_dataset(theirs, 3, params=SynthParams(size=32), workers=1)
    assert [p.name for p in theirs.rglob("*")] == ["images", "000001.png"]  # untouched
    assert _read(theirs / "images" / "000001.png").max() == 80


def test_a_failed_generate_leaves_the_earlier_set_as_it_was(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "set"
    generate_dataset(out, 6, seed=1, params=SynthParams(size=32), workers=1)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthset, "_render_all", disk_full)
    with pytest.raises(EngineError, match="no space left|No space left"):
        generate_dataset(out, 10, seed=2, params=SynthParams(size=48), workers=1)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no hidden staging folder left beside it


def test_preview_is_the_dataset_in_memory(tmp_path: Path) -> None:
    params = SynthParams(size=40, tint=0.5, defect_free=0.4)
    samples = synthset.preview(params, n=5, seed=3)
    generate_dataset(tmp_path, 5, seed=3, params=params, workers=1)
    assert len(samples) == 5
    assert sum(not types for _, _, types in samples) == 2
    for i, (image, mask, types) in enumerate(samples):
        assert np.array_equal(image, _read(tmp_path / "images" / f"{i:06d}.png"))
        if types:
            assert np.array_equal(mask, _read(tmp_path / "masks" / f"{i:06d}.png"))
        else:
            assert not mask.any()


def test_surfaces_really_vary() -> None:
    kinds = {surfaces.random_surface(np.random.default_rng(s), 64).kind for s in range(40)}
    assert kinds == set(surfaces.SURFACES)
    means = [render_sample(s, SynthParams(size=48), True)[0].mean() for s in range(10)]
    assert max(means) - min(means) > 20


def test_ensure_sample_folder_creates_once(tmp_path: Path) -> None:
    folder = tmp_path / "procedural_images"
    assert synthset.ensure_sample_folder(folder, count=6) == folder
    images = sorted((folder / "images").glob("*.png"))
    assert len(images) == 6 and (folder / "manifest.csv").exists()
    before = images[0].stat().st_mtime_ns
    synthset.ensure_sample_folder(folder, count=6)
    assert images[0].stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("count", "params", "message"),
    [
        (0, SynthParams(), "count"),
        (5, SynthParams(size=16), "size"),
        (5, SynthParams(defect_free=1.5), "defect_free"),
        (5, SynthParams(defect_free=-0.1), "defect_free"),
        (5, SynthParams(difficulty=2.0), "difficulty"),
        (5, SynthParams(max_defects=0), "max_defects"),
        (5, SynthParams(defect_weights={"rust": 1.0}), "rust"),
        (5, SynthParams(defect_weights={"scratch": 0.0}), "weight"),
    ],
)
def test_bad_arguments_raise_engine_error(tmp_path: Path, count: int, params: SynthParams, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        generate_dataset(tmp_path / "out", count, params=params)
    assert not (tmp_path / "out").exists()  # refused before touching the disk
