"""Importing datasets: our folder layout, MVTec-AD, class-map masks; re-imports, atomicity, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import config, database, registry
from engine.__main__ import main
from engine.data import scan_dataset
from engine.errors import DatasetError
from engine.importer import import_dataset


@pytest.fixture(autouse=True)
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test imports into its own data folder and registry."""
    monkeypatch.setattr(config, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")
    yield tmp_path
    database.dispose_engines()


def texture(seed: int, size: tuple[int, int] = (32, 40)) -> np.ndarray:
    """A small random 8-bit image (different content for each seed)."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def make_mvtec(root: Path) -> Path:
    """An MVTec-AD category: 20 train/good, test/good (2), test/crack (3 + 1 without mask), test/scratch (1)."""
    for i in range(20):
        write(root / "train" / "good" / f"{i:03d}.png", texture(i))
    for i in range(2):
        write(root / "test" / "good" / f"{i:03d}.png", texture(100 + i))
    for i in range(4):
        write(root / "test" / "crack" / f"{i:03d}.png", texture(200 + i))
        if i < 3:
            mask = np.zeros((32, 40), np.uint8)
            mask[5 : 10 + i, 8:20] = 255
            write(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    write(root / "test" / "scratch" / "000.png", texture(300))
    mask = np.zeros((32, 40), np.uint8)
    mask[2:4, :] = 255
    write(root / "ground_truth" / "scratch" / "000_mask.png", mask)
    return root


def manifest(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def test_mvtec_import(tmp_path: Path) -> None:
    src = make_mvtec(tmp_path / "bottle")
    seen = []
    report = import_dataset(src, "bottle", progress=lambda done, total, what: seen.append((done, total)))
    target = config.DATA_DIR / "bottle"
    assert report.path == target and report.layout == "mvtec" and not report.already_imported_as
    assert report.counts == {"images": 26, "defective": 4, "defect_free": 22, "train": 18, "val": 2, "test": 6}
    assert report.per_type == {"crack": 3, "scratch": 1}
    assert report.sizes == {"40x32": 26}
    expected = np.mean([(5 + i) * 12 / 1280 for i in range(3)] + [80 / 1280])
    assert report.defect_fraction == pytest.approx(expected, abs=1e-6)
    assert any("test/crack/003.png" in p and "no ground_truth" in p for p in report.problems)
    assert seen[-1] == (26, 26)
    rows = manifest(target)
    assert rows["test_crack_001"]["defect_types"] == "crack" and rows["test_crack_001"]["split"] == "test"
    assert rows["test_good_000"]["defect_types"] == "" and rows["test_good_000"]["defect_fraction"] == "0.000000"
    assert Path(rows["train_good_000"]["source_path"]) == (src / "train/good/000.png").resolve()
    assert (target / "images" / "test_crack_001.png").read_bytes() == (src / "test/crack/001.png").read_bytes()
    stored = cv2.imread(str(target / "masks" / "test_crack_001.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(stored)) == {0, 255} and (stored > 0).sum() == 6 * 12
    scanned = scan_dataset(target)
    assert scanned.counts() == report.counts and not scanned.problems
    (dataset,) = registry.list_datasets()
    assert dataset.name == "bottle" and dataset.source == "imported" and dataset.content_hash == report.content_hash
    assert dataset.n_defective == 4 and dataset.details["layout"] == "mvtec"
    assert not [p for p in config.DATA_DIR.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_reimport_is_recognised_and_val_split_is_deterministic(tmp_path: Path) -> None:
    src = make_mvtec(tmp_path / "bottle")
    first = import_dataset(src, "bottle")
    assert first.lines()[-1].endswith(f"train with --data {first.path}")
    # The name alone is not a folder here, but the message says which one it is.
    with pytest.raises(DatasetError, match=f"imported as bottle is --data {config.DATA_DIR / 'bottle'}"):
        scan_dataset("bottle")
    val_ids = {k for k, row in manifest(first.path).items() if row["split"] == "val"}
    again = import_dataset(src, "bottle-again", link=True)  # linked images have the same content
    assert again.already_imported_as == "bottle" and again.path == first.path.resolve()
    assert again.lines()[-1].startswith("already imported as bottle")
    assert again.lines()[-1].endswith(f"not registered again as bottle-again: train with --data {first.path.resolve()}")
    assert not (config.DATA_DIR / "bottle-again").exists() and len(registry.list_datasets()) == 1
    assert {k for k, row in manifest(first.path).items() if row["split"] == "val"} == val_ids


def test_link_import_symlinks_images(tmp_path: Path) -> None:
    src = make_mvtec(tmp_path / "screw")
    report = import_dataset(src, "screw", link=True)
    image = report.path / "images" / "train_good_003.png"
    assert image.is_symlink() and image.resolve() == (src / "train/good/003.png").resolve()
    assert not (report.path / "masks" / "test_crack_000.png").is_symlink()  # masks are always written binary
    assert report.lines()[-1].startswith("screw (") and "linked" in report.lines()[-1]


def make_class_map_folder(root: Path, with_classes: bool) -> Path:
    """Our folder layout with class-map masks (0 background, 1..3 defect classes) and a meta.csv."""
    for i in range(6):
        write(root / "images" / f"p{i}.png", texture(400 + i, (24, 24)))
    masks = {"p0": {1: (2, 6)}, "p1": {2: (4, 9), 3: (12, 14)}, "p2": {3: (0, 3)}, "p3": {1: (5, 6), 3: (8, 9)}}
    for image_id, classes in masks.items():
        mask = np.zeros((24, 24), np.uint8)
        for class_id, (start, stop) in classes.items():
            mask[start:stop, 2:20] = class_id
        write(root / "masks" / f"{image_id}.png", mask)
    write(root / "masks" / "p4.png", np.zeros((24, 24), np.uint8))  # an empty mask: defect-free
    (root / "meta.csv").write_text("id,split\np0,train\np1,train\np2,val\np3,test\np4,train\np5,bogus\n")
    if with_classes:
        (root / "classes.txt").write_text("background\nscratch\npit\ndent\n")
    return root


def test_class_map_import_with_names(tmp_path: Path) -> None:
    src = make_class_map_folder(tmp_path / "plates", with_classes=True)
    report = import_dataset(src, "plates")
    assert report.class_map and report.classes == ["scratch", "pit", "dent"]
    assert report.counts["defective"] == 4 and report.counts["defect_free"] == 2
    assert report.per_type == {"scratch": 2, "pit": 1, "dent": 3}
    rows = manifest(report.path)
    assert rows["p1"]["defect_types"] == "pit;dent" and rows["p3"]["defect_types"] == "scratch;dent"
    assert rows["p0"]["split"] == "train" and rows["p2"]["split"] == "val" and rows["p4"]["defect_types"] == ""
    assert rows["p5"]["split"] in ("train", "val", "test")
    assert any("unknown split 'bogus'" in p for p in report.problems)
    assert any("1 empty mask" in p for p in report.problems)
    binary = cv2.imread(str(report.path / "masks" / "p1.png"), cv2.IMREAD_UNCHANGED)
    original = cv2.imread(str(report.path / "class_masks" / "p1.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(binary)) == {0, 255} and set(np.unique(original)) == {0, 2, 3}
    assert ((binary > 0) == (original > 0)).all()
    assert not (report.path / "masks" / "p4.png").exists()
    assert (report.path / "classes.txt").read_text().split() == ["scratch", "pit", "dent"]


def test_class_map_import_without_names_and_binary_masks_stay_binary(tmp_path: Path) -> None:
    report = import_dataset(make_class_map_folder(tmp_path / "plates", with_classes=False), "plates")
    assert report.class_map and report.classes == ["class_1", "class_2", "class_3"]
    assert manifest(report.path)["p1"]["defect_types"] == "class_2;class_3"

    binary = tmp_path / "binary"
    for i in range(3):
        write(binary / "images" / f"b{i}.png", texture(500 + i, (16, 16)))
        mask = np.zeros((16, 16), np.uint8)
        mask[i : i + 4, 3:9] = 255
        write(binary / "masks" / f"b{i}.png", mask)
    (binary / "manifest.csv").write_text("id,split,defect_types\nb0,train,scratch\nb1,val,pit+scratch\nb2,test,\n")
    plain = import_dataset(binary, "binary")
    assert not plain.class_map and plain.per_type == {"scratch": 2, "pit": 1}
    assert manifest(plain.path)["b1"]["defect_types"] == "pit+scratch"


def test_bad_pairs_are_reported_and_skipped(tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    write(src / "images" / "a.png", texture(1))
    write(src / "images" / "b.png", texture(2))
    write(src / "masks" / "b.png", np.zeros((10, 10), np.uint8) + 255)  # wrong size
    (src / "images" / "c.png").write_bytes(b"garbage")
    write(src / "masks" / "orphan.png", np.zeros((32, 40), np.uint8))
    report = import_dataset(src, "mixed")
    assert report.counts["images"] == 1
    text = "\n".join(report.problems)
    assert "b.png: mask is 10x10 but image is 40x32" in text and "c.png: not a readable PNG" in text
    assert "orphan.png has no image" in text


def test_failed_import_leaves_nothing_behind(tmp_path: Path) -> None:
    src = tmp_path / "junk"
    (src / "images").mkdir(parents=True)
    for i in range(3):
        (src / "images" / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="no usable images"):
        import_dataset(src, "junk")
    assert list(config.DATA_DIR.iterdir()) == [] and registry.list_datasets() == []


def test_existing_name_with_other_content_is_refused(tmp_path: Path) -> None:
    import_dataset(make_mvtec(tmp_path / "a"), "parts")
    other = make_class_map_folder(tmp_path / "b", with_classes=False)
    with pytest.raises(DatasetError, match="already exists with other content"):
        import_dataset(other, "parts")
    assert len(registry.list_datasets()) == 1
    assert [p.name for p in config.DATA_DIR.iterdir()] == ["parts"]


def test_registering_a_folder_already_in_place(tmp_path: Path) -> None:
    src = make_class_map_folder(config.DATA_DIR / "inplace", with_classes=False)
    report = import_dataset(src, "inplace")
    assert report.in_place and report.path == src.resolve() and report.counts["images"] == 6
    assert registry.list_datasets()[0].path == str(src.resolve())


def test_import_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_mvtec(tmp_path / "bottle")
    assert main(["import", str(src), "--name", "bottle"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bottle (") and "26 images (4 defective, 22 defect-free" in last
    assert main(["import", str(src)]) == 0  # default name: the folder name; same content
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("already imported as bottle")

    assert main(["import", str(tmp_path / "missing"), "--name", "x"]) == 2
    assert main(["import", str(src), "--name", "../escape"]) == 2
    (tmp_path / "mvtec_root" / "bottle").mkdir(parents=True)
    make_mvtec(tmp_path / "mvtec_root" / "bottle")
    assert main(["import", str(tmp_path / "mvtec_root"), "--name", "root"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--name", "empty"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    assert "no such folder" in errors[0] and "not allowed" in errors[1]
    assert "MVTec-AD root" in errors[2] and "import one category" in errors[2]
    assert "not a dataset folder" in errors[3]


@pytest.mark.skipif(not Path("/work/shared/data/neu_seg/meta.csv").is_file(), reason="NEU-Seg not present")
def test_neu_seg_meta_is_kept(tmp_path: Path) -> None:
    """The real NEU-Seg folder (if present) imports with its own splits and defect types (linked, a subset)."""
    import shutil

    source = Path("/work/shared/data/neu_seg")
    subset = tmp_path / "neu_subset"
    (subset / "images").mkdir(parents=True)
    (subset / "masks").mkdir()
    lines = (source / "meta.csv").read_text().splitlines()
    picked = [lines[0]] + lines[1::150]
    for line in picked[1:]:
        image_id = line.split(",")[0]
        (subset / "images" / f"{image_id}.png").symlink_to(source / "images" / f"{image_id}.png")
        shutil.copy(source / "masks" / f"{image_id}.png", subset / "masks")
    (subset / "meta.csv").write_text("\n".join(picked) + "\n")
    report = import_dataset(subset, "neu-subset", link=True)
    assert report.counts["images"] == len(picked) - 1 and report.counts["defect_free"] == 0
    assert not report.class_map and set(report.per_type) <= {"inclusion", "patches", "scratches"}
    rows = manifest(report.path)
    for line in picked[1:]:
        image_id, types, split = line.split(",")[:3]
        assert rows[image_id]["split"] == split and rows[image_id]["defect_types"] == types


def test_a_plain_folder_of_good_parts_and_a_few_defects_imports_with_defects_in_val(tmp_path: Path) -> None:
    src = tmp_path / "line"
    for i in range(30):
        write(src / f"part{i:02d}.jpg", texture(i))
    defect = np.zeros((32, 40), np.uint8)
    defect[10:14, 5:30] = 255
    for i in (3, 7, 11, 19):  # a handful of labelled defects, masks beside the images
        write(src / "masks" / f"part{i:02d}.png", defect)
    report = import_dataset(src, "line")
    assert report.layout == "flat" and report.counts["images"] == 30 and report.counts["defective"] == 4
    samples = scan_dataset(report.path).samples
    defective_splits = [s.split for s in samples if s.defective]
    assert "val" in defective_splits and "test" in defective_splits  # never all in train
    assert {s.split for s in samples if not s.defective} >= {"train", "val", "test"}


def test_an_image_that_declares_a_huge_size_is_skipped_with_its_size(tmp_path: Path) -> None:
    import struct
    import zlib

    src = tmp_path / "line"
    for i in range(4):
        write(src / "images" / f"part{i}.png", texture(i))
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)  # 3.6 gigapixels declared, a few bytes of data
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    (src / "images" / "bomb.png").write_bytes(bomb)
    report = import_dataset(src, "line")
    assert report.counts["images"] == 4
    assert any("bomb.png: declares 60000x60000 px" in problem and problem.endswith("skipped")
               for problem in report.problems), report.problems


def test_a_folder_sorted_by_verdict_is_imported_as_it_is_for_tuning_not_training(tmp_path: Path) -> None:
    src = tmp_path / "bins"
    for i in range(4):
        write(src / "good" / f"g{i}.png", texture(i))
    for i in range(3):
        write(src / "crack" / f"c{i}.png", texture(10 + i))
    write(src / "dent" / "d0.png", texture(20))
    (src / "crack" / "broken.png").write_bytes(b"not an image")
    report = import_dataset(src, "bins")
    assert report.layout == "sorted" and report.counts["defective"] == 4 and report.counts["defect_free"] == 4
    assert report.per_type == {"crack": 3, "dent": 1}
    assert any("broken.png" in problem for problem in report.problems)  # reported, the others imported
    assert "not for training" in report.lines()[-1] and "train 0" not in report.lines()[-1]
    scanned = scan_dataset(report.path)
    assert scanned.sorted_by_folder and {s.defect_types for s in scanned.samples if s.defective} == {"crack", "dent"}
    assert registry.find_dataset_by_hash(report.content_hash).name == "bins"
    assert main(["train", "--data", str(report.path), "--epochs", "1"]) == 2  # no masks: a clear refusal


def test_masks_beside_sorted_bins_are_never_taken_for_defective_parts(tmp_path: Path) -> None:
    src = tmp_path / "bins"
    write(src / "good" / "g0.png", texture(0))
    write(src / "crack" / "c0.png", texture(1))
    write(src / "masks" / "c0.png", np.full((32, 40), 255, np.uint8))
    with pytest.raises(DatasetError, match="no images found"):
        scan_dataset(src)
