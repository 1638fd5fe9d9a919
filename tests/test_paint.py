"""Painting the generator's defects onto real defect-free images (engine.paint), offline and during training."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import config, readiness, recipe, registry, runs, runstore, synth, synthset
from engine.__main__ import main
from engine.errors import DatasetError, EngineError
from engine.evaluate import select_samples
from engine.imageio import read_image, read_mask
from engine.inference import Predictor
from engine.paint import PaintParams, paint, params_for, window_side
from engine.paintset import paint_dataset
from engine.paintset import preview as paint_preview
from engine.synth import DEFECT_TYPES
from engine.training.config import PAINT_WITHOUT_LABELS, PAINTED_CONFIDENCE
from engine.training.prepare import painted_validation
from engine.tuning import tune_run


def good_parts(folder: Path, n: int) -> Path:
    """A folder of n defect-free parts, rendered by the generator at 96 px."""
    folder.mkdir(parents=True)
    for seed in range(n):
        image, _, _ = synth.render_sample(seed, synth.SynthParams(size=96), defect_free=True)
        cv2.imwrite(str(folder / f"part{seed}.png"), image)
    return folder


@pytest.fixture(scope="module")
def surfaces() -> list[np.ndarray]:
    """Real-looking defect-free surfaces: the generator's, rendered without defects, in three shapes."""
    out = []
    for seed, size in ((1, 96), (2, 160), (3, 128)):
        image, _, _ = synth.render_sample(seed, synth.SynthParams(size=size), defect_free=True)
        out.append(image.astype(np.float32) / 255.0)
    out.append(np.ascontiguousarray(np.vstack([out[1], out[1]])[:, :100]))  # tall and narrow, like a line scan
    return out


def test_the_mask_is_exactly_the_painted_pixels(surfaces: list[np.ndarray]) -> None:
    for index, image in enumerate(surfaces):
        for seed in range(6):
            painted, mask, types = paint(image, np.random.default_rng([index, seed]))
            assert types and mask.any() and painted.shape == image.shape and mask.dtype == np.uint8
            changed = painted != image
            assert not (changed & (mask == 0)).any(), "a painted pixel outside the mask"
            assert changed[mask > 0].all(), "a mask pixel the painting left unchanged"
            assert 0.0 <= painted.min() and painted.max() <= 1.0


def test_painting_is_reproducible_and_varies_with_the_seed(surfaces: list[np.ndarray]) -> None:
    image = surfaces[2]
    first = paint(image, np.random.default_rng(7))
    again = paint(image, np.random.default_rng(7))
    other = paint(image, np.random.default_rng(8))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert not np.array_equal(first[1], other[1])


def test_thin_lines_go_down_to_one_pixel(surfaces: list[np.ndarray]) -> None:
    params = PaintParams(defect_weights={"scratch": 1.0}, max_defects=1, difficulty=1.0)
    widths = set()
    for seed in range(40):
        _, mask, _ = paint(surfaces[1], np.random.default_rng(seed), params)
        distance = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        widths.add(round(float(np.median(distance[mask > 0])) * 2 - 1))  # a 1-px line is 1 from its edge
    assert min(widths) <= 1 < max(widths)


def test_only_the_defect_types_asked_for_are_painted(surfaces: list[np.ndarray], capsys) -> None:
    params = params_for("pit, crack")
    assert set(params.defect_weights) == {"pit", "crack"} and set(params_for(None).defect_weights) == set(DEFECT_TYPES)
    drawn = {kind for seed in range(20) for kind in paint(surfaces[1], np.random.default_rng(seed), params)[2]}
    assert drawn == {"pit", "crack"}
    with pytest.raises(EngineError, match="unknown defect type.*scratch"):  # the message lists the known ones
        params_for("scratches")
    # train names a wrong type before it reads any data
    assert main(["train", "--data", "no-such-folder", "--paint", "0.5", "--paint-types", "scratches"]) == 2
    assert "unknown defect type(s) scratches" in capsys.readouterr().err


def test_defect_size_and_count_are_options_in_px_or_a_share_of_the_image(surfaces: list[np.ndarray], tmp_path: Path,
                                                                         capsys) -> None:
    image = surfaces[2]  # 128 x 128
    for size, side in ((40, 40), (0.25, 32)):
        for seed in range(12):
            _, mask, types = paint(image, np.random.default_rng(seed), params_for(None, size=size, count=1))
            ys, xs = np.nonzero(mask)
            assert len(types) == 1 and np.ptp(ys) < side and np.ptp(xs) < side  # all of it inside a square that side
    for size, count in ((-0.5, 2), (5, 2), (0.5, 0)):
        with pytest.raises(EngineError, match="defect size|defects per image"):
            params_for(None, size=size, count=count)
    # Training paints crops of images resized by its scale: px of the full-size image and shares of it follow.
    assert params_for(None, size=200).on_crops(0.5, 500).window == 100
    assert params_for(None, size=0.4).on_crops(0.5, 500).window == 100
    assert params_for(None, size=30).on_crops(0.25, 500).window == 24  # never below what can be painted
    assert params_for(None).on_crops(0.5, 500).window == 0  # the default: each crop's short side
    # generate --onto takes both; train names a size it cannot paint before it reads any data.
    good = tmp_path / "good"
    good.mkdir()
    cv2.imwrite(str(good / "part.png"), np.round(image * 255).astype(np.uint8))
    out = tmp_path / "small-defects"
    capsys.readouterr()
    assert main(["generate", "--onto", str(good), "--out", str(out), "--count", "6", "--defect-free", "0",
                 "--defect-size", "0.25", "--max-defects", "1", "--types", "scratch,pit"]) == 0
    assert "name the kinds" not in capsys.readouterr().out  # they were named
    for mask_path in (out / "masks").iterdir():
        ys, xs = np.nonzero(read_mask(mask_path))
        assert np.ptp(ys) < 32 and np.ptp(xs) < 32
    assert main(["generate", "--out", str(tmp_path / "gen"), "--defect-size", "0.5"]) == 2
    # train paints its crops at the size asked for, brought to its scale, and validation at full size.
    from engine.train import TrainConfig
    from engine.training.prepare import prepare_data

    goods = tmp_path / "good-set"
    synthset.generate_dataset(goods, 6, seed=2, params=synth.SynthParams(size=128, defect_free=1.0), workers=1)
    _, data = prepare_data(TrainConfig(data=str(goods), paint_size=64, paint_count=1, scale=0.5, crop=32))
    on_crops = data.train_set.painter.keywords["params"]
    assert (on_crops.window, on_crops.max_defects) == (32, 1)
    assert main(["train", "--data", "no-such-folder", "--paint", "0.5", "--paint-size", "5"]) == 2
    assert "defect size 5" in capsys.readouterr().err


def test_images_without_room_are_left_unchanged(surfaces: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    for image in (np.full((64, 64), 0.5, np.float32), np.zeros((80, 80), np.float32), surfaces[0][:20, :20]):
        painted, mask, types = paint(image, rng)
        assert np.array_equal(painted, image) and not mask.any() and types == []
    assert window_side((500, 1250), 0) == 500 and window_side((500, 1250), 0.5) == 250
    assert window_side((500, 1250), 96) == 96


def test_generate_onto_reports_a_corrupt_image_and_goes_on(tmp_path: Path, capsys) -> None:
    good = good_parts(tmp_path / "good", 4)
    (good / "part9.png").write_bytes(b"not an image at all")
    out = tmp_path / "painted"
    capsys.readouterr()
    assert main(["generate", "--onto", str(good), "--out", str(out), "--count", "10", "--defect-free", "0.3",
                 "--seed", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("part9.png") == 1  # reported once, then left out
    assert "10 images" in captured.out and "1 unreadable skipped" in captured.out
    assert "name the kinds your line looks for with --types" in captured.out  # every kind was painted
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 10 and {row["synthetic"] for row in rows} == {"0", "1"}
    for source in {row["source"] for row in rows}:  # a part painted twice never sits in two splits
        assert len({row["split"] for row in rows if row["source"] == source}) == 1
    for row in rows:
        image = read_image(out / "images" / f"{row['id']}.png")
        source = read_image(row["source"])
        if row["synthetic"] == "1":
            mask = read_mask(out / "masks" / f"{row['id']}.png")
            changed = np.abs(image - source) > 0
            assert row["defect_types"] and not (changed & (mask == 0)).any() and changed[mask > 0].all()
        else:
            assert not (out / "masks" / f"{row['id']}.png").exists() and np.array_equal(image, source)
    assert any(d.path == str(out.resolve()) and d.source == "painted" for d in registry.list_datasets())


def test_a_labelled_set_is_not_painted_by_default(trained_run) -> None:
    assert runs.read_run_json(runs.run_dir(trained_run))["params"]["paint"] == 0.0


@pytest.mark.slow
def test_train_on_good_images_only_paints_by_default_and_marks_painted_validation(tmp_path: Path, capsys) -> None:
    data = tmp_path / "good-only"
    synthset.generate_dataset(data, 30, seed=5, params=synth.SynthParams(size=64, defect_free=1.0), workers=1)
    assert main(["train", "--data", str(data), "--epochs", "2", "--steps-per-epoch", "4",  # no --paint: the default
                 "--base", "8", "--depth", "2", "--crop", "48", "--batch-size", "8", "--init", "none",
                 "--name", "paint-test"]) == 0
    out = capsys.readouterr().out
    assert "no labelled defect in the" in out
    assert "painting: every kind of the generator's defects; name the kinds your line looks for" in out
    run_id = max((p for p in config.RUNS_DIR.glob("*paint-test*")), key=lambda p: p.stat().st_mtime).name
    info = runs.read_run_json(runs.run_dir(run_id))
    assert info["dataset"]["val_painted"] is True and info["params"]["paint"] == PAINT_WITHOUT_LABELS
    assert info["dataset"]["counts"]["defective"] == 0  # nothing real to learn from but the painted defects
    assert info["status"] == "completed"
    # After the first epoch the model's false alarms on good training images were looked for (hard negatives).
    assert info["hard_negatives"]["epoch"] == 1 and info["hard_negatives"]["images_looked_at"] > 0
    # Validation had painted defects and untouched good images, so image-level AP could be measured.
    validated = [row for row in runs.read_metrics(runs.run_dir(run_id)) if "val_ap" in row]  # within its share
    assert validated and all(np.isfinite(row["val_ap"]) for row in validated)
    # Every real validation image measured false alarms, and the recipe held the goal on their upper bound.
    tuning = recipe.load_recipe(runs.run_dir(run_id)).tuning
    assert tuning["n_defect_free"] == info["dataset"]["counts"]["val"] and tuning["n_defective"] > 0
    assert tuning["goal_on"] == "bound" and tuning["confidence"] == PAINTED_CONFIDENCE
    assert tuning["cautious"]  # painted detections are a stand-in: within noise of the most, the cautious recipe
    # Painted defects alone never make a run ready; the next step says how to decide it.
    assert info["ready"] is False and readiness.verdict(info)[0] is False
    # Nor could its few good validation images show the false-alarm goal, and the reason says that too.
    assert tuning["n_defect_free"] < 16 and "; besides, validation holds" in info["ready_reason"]
    assert "tune" in readiness.next_steps(info)[0]
    # Tables say its Dice was measured on painted defects, not beside real ones as if alike.
    assert next(r for r in runstore.overview() if r["run_id"] == run_id)["validated_on"] == "painted defects"
    capsys.readouterr()
    assert main(["runs"]) == 0 and "on painted defects  (not ready:" in next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith(run_id))
    # Tuning on real labelled images decides, by training's own rule, and says so.
    labelled = tmp_path / "labelled"
    synthset.generate_dataset(labelled, 20, seed=6, params=synth.SynthParams(size=64, defect_free=0.5), workers=1)
    _, best, _ = tune_run(Predictor.from_run(run_id), select_samples(str(labelled), "all"), 0.05)
    ready, _ = readiness.tuning_readiness(best, 0.05)
    after = runs.read_run_json(runs.run_dir(run_id))
    assert after["ready"] is ready and readiness.verdict(after)[0] is ready
    assert ready or after["ready_reason"].startswith("tuned on generated images: ")  # not "real": synth made them
    assert registry.get_run(run_id).ready is ready  # the registry row says the same


def test_painted_validation_keeps_every_good_image_and_adds_painted_copies(surfaces: list[np.ndarray]) -> None:
    pairs = [(image, np.zeros(image.shape, np.uint8)) for image in surfaces * 4]
    val = painted_validation(pairs, seed=3)
    originals, copies = val[:len(pairs)], val[len(pairs):]
    assert all(image is pair[0] and not mask.any() for (image, mask), pair in zip(originals, pairs))
    assert 0 < len(copies) < len(pairs) and all(mask.any() for _, mask in copies)
    again = painted_validation(pairs, seed=3)[len(pairs):]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(copies, again))  # the same every run


def test_generate_page_previews_painted_samples_and_writes_the_set(tmp_path: Path) -> None:
    from tests.test_pages import open_page

    good = good_parts(tmp_path / "good-parts", 5)
    at = open_page("app_pages/1_Generate_Data.py")
    at.selectbox(key="paint_from").set_value("a folder on this machine").run()
    at.text_input(key="paint_folder").set_value(str(good)).run()
    assert not at.exception and not at.error
    captions = [caption for image in at.image for caption in image.captions]
    expected = [", ".join(types) for _, _, types in paint_preview(good, n=4, seed=0)]
    assert expected and all(caption in captions for caption in expected)  # the engine's own painted samples
    # The kinds, size and count asked for are what the preview paints, and what is written.
    at.multiselect(key="paint_types").set_value(["pit"])
    at.number_input(key="paint_size").set_value(32.0)
    at.number_input(key="paint_most").set_value(1).run()
    assert not at.exception and not at.error
    params = params_for("pit", size=32, count=1)
    captions = [caption for image in at.image for caption in image.captions]
    expected = [", ".join(types) for _, _, types in paint_preview(good, n=4, seed=0, params=params)]
    assert expected and set(expected) == {"pit"} and all(caption in captions for caption in expected)
    at.text_input(key="paint_name").set_value("apptest-painted")
    at.number_input(key="paint_count").set_value(6)
    at.button(key="paint_go").click().run()
    assert not at.exception and "apptest-painted" in at.success[0].value
    assert len(list((config.DATA_DIR / "apptest-painted" / "images").iterdir())) == 6
    rows = list(csv.DictReader((config.DATA_DIR / "apptest-painted" / "manifest.csv").open()))
    assert {row["defect_types"] for row in rows if row["synthetic"] == "1"} == {"pit"}
    at.number_input(key="paint_size").set_value(5.0).run()  # neither a share nor enough px: said so, not painted
    assert not at.exception and "defect size 5" in at.error[0].value


def test_uploaded_good_images_are_kept_once_checked_and_corrupt_ones_reported(tmp_path: Path) -> None:
    from engine.imageio import encode_png
    from engine.paintset import good_images, store_good_images

    image, _, _ = synth.render_sample(1, synth.SynthParams(size=64), defect_free=True)
    png = encode_png(image)
    kept, problems = store_good_images([("part-1.png", png), ("truncated.png", png[:40]), ("notes.txt", b"hello"),
                                        ("../../escape.png", png)], tmp_path / "uploads")
    assert [p.name for p in kept] == ["part-1.png", "escape.png"]  # a path in the name never leaves the folder
    assert len(problems) == 2
    assert any("truncated.png" in p for p in problems) and any("notes.txt" in p for p in problems)
    assert [p.name for p in good_images(tmp_path / "uploads")] == ["escape.png", "part-1.png"]
    assert (tmp_path / "uploads" / "part-1.png").read_bytes() == png
    # The uploads are a dataset of good parts: the Train page offers them, to paint as it trains.
    from engine.data import dataset_choices

    assert dataset_choices(trainable=True)["uploads"] == tmp_path / "uploads"


def test_a_painted_set_keeps_each_part_in_one_split_and_gives_val_and_test_one_of_a_few(tmp_path: Path) -> None:
    from engine.paintset import paint_dataset

    good = good_parts(tmp_path / "three-parts", 3)
    paint_dataset(good, tmp_path / "painted", 12, defect_free=0.3, seed=1)
    rows = list(csv.DictReader((tmp_path / "painted" / "manifest.csv").open()))
    sources = {row["source"] for row in rows}
    splits = {source: {row["split"] for row in rows if row["source"] == source} for source in sources}
    assert all(len(found) == 1 for found in splits.values())  # never one part on both sides
    assert sorted(found.pop() for found in splits.values()) == ["test", "train", "val"]


def test_painting_onto_a_dataset_takes_only_its_defect_free_images(tmp_path: Path) -> None:
    from engine.paintset import good_images

    mixed = tmp_path / "mixed"
    synthset.generate_dataset(mixed, 12, seed=4, params=synth.SynthParams(size=64, defect_free=0.5), workers=1)
    clean = {p.stem for p in (mixed / "images").iterdir()} - {p.stem for p in (mixed / "masks").iterdir()}
    assert clean and [p.stem for p in good_images(mixed)] == sorted(clean)  # a real defect has no painted mask
    for mask in (mixed / "masks").iterdir():
        (mixed / "images" / f"{mask.stem}.png").unlink()
        mask.unlink()
    (mixed / "manifest.csv").unlink()
    assert len(good_images(mixed)) == len(clean)
    bad = tmp_path / "all-defective"
    synthset.generate_dataset(bad, 4, seed=4, params=synth.SynthParams(size=64, defect_free=0.0), workers=1)
    with pytest.raises(DatasetError, match="every image of this dataset holds a defect"):
        good_images(bad)


def test_generate_page_offers_uploading_good_images_first() -> None:
    from tests.test_pages import open_page

    at = open_page("app_pages/1_Generate_Data.py")
    assert not at.exception and at.selectbox(key="paint_from").value == "images I upload"
    assert at.get("file_uploader")  # the uploader is shown; nothing is painted before an upload
    assert "paint_go" not in [button.key for button in at.button]


def test_upload_folder_takes_dataset_names_only_and_a_second_upload_rewrites_nothing(tmp_path: Path) -> None:
    from engine.errors import EngineError
    from engine.imageio import encode_png
    from engine.paintset import store_good_images, upload_folder

    assert upload_folder("painted") == config.DATA_DIR / "uploads" / "painted-good"
    with pytest.raises(EngineError, match="not usable"):
        upload_folder("../../elsewhere")
    image, _, _ = synth.render_sample(2, synth.SynthParams(size=64), defect_free=True)
    png = encode_png(image)
    (first,), _ = store_good_images([("part.png", png)], tmp_path)
    stamp = first.stat().st_mtime_ns
    (again,), problems = store_good_images([("part.png", png)], tmp_path)
    assert again == first and not problems and first.stat().st_mtime_ns == stamp


def test_a_defect_bank_moves_the_sets_own_defects_onto_good_images_with_their_masks() -> None:
    from engine.paint import DefectBank

    rng = np.random.default_rng(0)
    surface = (0.5 + 0.05 * rng.standard_normal((64, 64))).astype(np.float32)
    image, mask = surface.copy(), np.zeros((64, 64), np.uint8)
    mask[30:33, 10:50] = 1  # a dark scratch, labelled
    image[mask > 0] -= 0.3
    bank = DefectBank([(image, mask), (surface, np.zeros_like(mask))])
    assert len(bank) == 1  # one labelled region; the good image gives none

    good = (0.6 + 0.05 * np.random.default_rng(1).standard_normal((48, 80))).astype(np.float32)
    painted, label, types = bank.transplant(good, np.random.default_rng(2))
    assert types == ["transplanted"] and label.sum() == mask.sum()  # the whole scratch, as labelled
    near = cv2.dilate(label, np.ones((3, 3), np.uint8)) > 0
    assert np.array_equal(painted[~near], good[~near])  # nothing changed away from the label
    assert painted[label > 0].mean() < good[label > 0].mean() - 0.2  # the scratch is dark on its new surface
    again, label_again, _ = bank.transplant(good, np.random.default_rng(2))
    assert np.array_equal(again, painted) and np.array_equal(label_again, label)  # seeded
    small = good[:20, :20]  # a piece larger than the image is cut to it
    cut, cut_label, _ = bank.transplant(small, np.random.default_rng(3))
    assert cut.shape == small.shape and cut_label.shape == small.shape
    unchanged, empty, none = DefectBank([]).transplant(good, np.random.default_rng(4))
    assert unchanged is good and not empty.any() and none == []


@pytest.mark.slow
def test_train_paint_beside_real_defects_moves_those_defects(tmp_path: Path, capsys) -> None:
    data = tmp_path / "labelled"
    synthset.generate_dataset(data, 20, seed=7, params=synth.SynthParams(size=64, defect_free=0.5), workers=1)
    assert main(["train", "--data", str(data), "--paint", "0.5", "--epochs", "1", "--steps-per-epoch", "3",
                 "--base", "8", "--depth", "2", "--crop", "48", "--batch-size", "8", "--init", "none",
                 "--name", "transplant-test"]) == 0
    out = capsys.readouterr().out
    assert "labelled defects of the training images, moved onto defect-free crops" in out
    assert "defects painted on (marked val_painted" not in out  # real defects validate


def test_generate_onto_never_writes_into_the_good_images_folder(surfaces: list[np.ndarray], tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for index, image in enumerate(surfaces):
        cv2.imwrite(str(good / f"part{index}.png"), np.round(image * 255).astype(np.uint8))
    before = sorted(p.name for p in good.iterdir())
    with pytest.raises(EngineError, match="did not write"):
        paint_dataset(good, good, 3)
    assert sorted(p.name for p in good.iterdir()) == before


@pytest.mark.slow
def test_export_of_a_good_parts_only_run_checks_on_painted_defects(tmp_path: Path) -> None:
    from engine import export

    data = tmp_path / "good-only"
    synthset.generate_dataset(data, 24, seed=9, params=synth.SynthParams(size=64, defect_free=1.0), workers=1)
    assert main(["train", "--data", str(data), "--epochs", "1", "--steps-per-epoch", "3", "--base", "8",
                 "--depth", "2", "--crop", "48", "--batch-size", "8", "--init", "none", "--name", "good-export"]) == 0
    run_id = max((p for p in config.RUNS_DIR.glob("*good-export*")), key=lambda p: p.stat().st_mtime).name
    files = sorted(p.relative_to(data) for p in data.rglob("*"))
    report = export.export_run(run_id, int8=True, calibration_images=4)
    # No image of the set holds a defect: the Dice of the INT8 gate is measured on painted ones, and it says so.
    assert "none of its images holds a labelled defect" in report["check_data"] and report["check_data_is_fallback"]
    assert report["check_data"] in report["messages"]
    checked, painted = map(int, re.search(r"ran on (\d+) of them, (\d+) with defects painted on",
                                          report["check_data"]).groups())
    assert checked == report["artifacts"][0]["metrics"]["n_val_images"] == 24 and 0 < painted < checked
    assert not any("false-alarm pixels only" in line for line in report["messages"])
    assert report["gate"]["fp32_dice"] == report["artifacts"][0]["metrics"]["val_dice"]
    assert not Path(report["dataset"]).exists()  # the painted copies are gone again, the set untouched
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == files
