"""The label loop: labelled datasets (sources, image-level labels, the lock), the queue, fine-tuning on labels."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import config, labelqueue, labels, recipe, runs, tuning
from engine.__main__ import main
from engine.data import load_pair, scan_dataset
from engine.errors import EngineError
from engine.evaluate import evaluate
from engine.importer import import_dataset
from engine.inference import Predictor
from engine.inspection import inspect
from engine.labelqueue import Scored

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A folder of six unlabelled 40x48 images, as a line hands them over."""
    rng = np.random.default_rng(7)
    for i in range(6):
        write(tmp_path / "line" / f"part{i}.png", rng.integers(0, 256, (40, 48), dtype=np.uint8))
    return tmp_path / "line"


def a_mask(shape: tuple[int, int] = (40, 48)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[10:14, 20:30] = 1
    return mask


def test_queue_orders_wrong_verdicts_then_disagreement_then_nearest_score() -> None:
    scored = [
        Scored("far", "far.png", top=0.95, flagged=True),
        Scored("near", "near.png", top=0.52, flagged=True),
        Scored("nearer", "nearer.png", top=0.49, flagged=False),
        Scored("changed", "changed.png", top=0.9, flagged=True, earlier_top=0.2, earlier_flagged=False),
        Scored("missed", "missed.png", top=0.1, flagged=False, truth=True),
        Scored("right", "right.png", top=0.02, flagged=False, truth=False),
        Scored("false_alarm", "fa.png", top=0.8, flagged=True, truth=False),
    ]
    queue = labelqueue.rank(scored, threshold=0.5, earlier_epoch=3)
    assert [item.id for item in queue] == ["false_alarm", "missed", "changed", "nearer", "near", "far", "right"]
    assert [item.rank for item in queue] == list(range(1, 8))
    assert queue[0].reason.startswith("wrong verdict: the run flagged a part labelled good")
    assert queue[1].reason.startswith("wrong verdict: the run missed a labelled defect")
    assert "epoch 3 said ok" in queue[2].reason
    assert queue[3].reason == "top score 0.490 is 0.010 below the threshold 0.500"
    assert [item.id for item in labelqueue.rank(scored, 0.5, top=2)] == ["false_alarm", "missed"]


def test_where_a_fine_tune_wants_real_defects_the_likeliest_come_after_the_wrong_verdicts() -> None:
    scored = [
        Scored("near", "near.png", top=0.52, flagged=True, area=40),
        Scored("faint", "faint.png", top=0.49, flagged=False),
        Scored("spread", "spread.png", top=0.51, flagged=False, hot_px=30),
        Scored("speck", "speck.png", top=0.95, flagged=False, hot_px=4),
        Scored("big", "big.png", top=0.97, flagged=True, area=900),
        Scored("small", "small.png", top=0.99, flagged=True, area=60),
        Scored("missed", "missed.png", top=0.1, flagged=False, truth=True),
        Scored("changed", "changed.png", top=0.45, flagged=False, earlier_top=0.9, earlier_flagged=True),
    ]
    queue = labelqueue.rank(scored, threshold=0.5, earlier_epoch=3, defects_wanted=5)
    # a known truth is never "likely": it is already known, and wrong; then flagged by counted area, then the most
    # pixels over the threshold; then doubt
    assert [item.id for item in queue] == ["missed", "big", "small", "near", "spread", "speck", "changed", "faint"]
    assert queue[4].reason.startswith("likely defect (not flagged, 30 px at or above the threshold")
    assert queue[1].reason.startswith("likely defect (flagged, 900 px counted, top score 0.970)")
    assert "needs 5 to learn from and to show its detection" in queue[1].reason
    assert queue[6].reason.startswith("epochs disagree") and queue[7].reason.startswith("top score 0.490")
    # none wanted: doubt alone, as before
    assert [item.id for item in labelqueue.rank(scored, 0.5, defects_wanted=0)][1:3] == ["changed", "faint"]


def test_manifest_records_each_source_and_the_source_folder_is_untouched(source: Path, tmp_path: Path) -> None:
    before = hashes(source)
    out = tmp_path / "labels"
    labels.save_label(out, source / "part0.png", "drawn", a_mask(), defect_types="scratch")
    labels.save_label(out, source / "part1.png", "accepted", a_mask())
    labels.save_label(out, source / "part2.png", "good")
    labels.save_label(out, source / "part3.png", "image_level")
    assert hashes(source) == before
    rows = labels.read_labels(out)
    assert {i: r["label_source"] for i, r in rows.items()} == {
        "part0": "drawn", "part1": "accepted", "part2": "good", "part3": "image_level"}
    assert all(r["labelled_at"] and r["source_path"] == str((source / f"{i}.png").resolve()) for i, r in rows.items())
    assert (out / "images" / "part0.png").read_bytes() == (source / "part0.png").read_bytes()
    assert cv2.imread(str(out / "masks" / "part2.png"), cv2.IMREAD_UNCHANGED).max() == 0  # good: all zero
    assert not (out / "masks" / "part3.png").exists()
    saved = cv2.imread(str(out / "masks" / "part0.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(saved > 0, a_mask() > 0)
    # An ordinary dataset: the image-level label is a defect without pixels, the good part is defect-free.
    samples = {s.id: s for s in scan_dataset(out).samples}
    assert samples["part3"].defective and not samples["part3"].outlined
    assert not samples["part2"].defective and samples["part0"].defective and samples["part0"].outlined
    # Labelling an image again replaces its label (and its mask).
    labels.save_label(out, source / "part0.png", "image_level")
    assert labels.read_labels(out)["part0"]["label_source"] == "image_level"
    assert not (out / "masks" / "part0.png").exists()
    assert hashes(source) == before


def test_bad_labels_are_refused_with_one_line(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    for source_name, mask, words in [("drawn", np.zeros((40, 48), np.uint8), "no defect pixel"),
                                     ("drawn", a_mask((20, 20)), "needs a mask of the image's size 48x40"),
                                     ("painted", None, "unknown label source")]:
        with pytest.raises(EngineError, match=words) as err:
            labels.save_label(out, source / "part0.png", source_name, mask)
        assert "\n" not in str(err.value)
    assert not (out / "manifest.csv").exists()


def test_saving_into_a_dataset_being_imported_is_refused_and_nothing_is_half_written(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")
    target = labels.labels_folder("incoming")
    refusals: list[str] = []

    def label_meanwhile(done: int, total: int, unit: str) -> None:
        try:
            labels.save_label(target, source / "part5.png", "good")
        except EngineError as err:
            refusals.append(str(err))

    import_dataset(source, "incoming", progress=label_meanwhile)
    assert refusals and all("being imported by process" in r and "\n" not in r for r in refusals)
    assert "label_source" in labels.read_labels(target)["part5"]  # the import's own manifest, not a label's
    assert labels.read_labels(target)["part5"]["label_source"] == ""
    # Another process labelling: the import is refused in turn, and a later label goes through.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from engine.storage import folder_lock\n"
        f"with folder_lock({str(tmp_path / 'data' / 'other')!r}, 'labelled'):\n"
        "    print('held', flush=True); time.sleep(60)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EngineError, match="being labelled by process") as err:
            import_dataset(source, "other")
        assert "\n" not in str(err.value) and not (tmp_path / "data" / "other").exists()
    finally:
        holder.kill()
        holder.wait()
    import_dataset(source, "other")  # a lock its holder left behind by dying is taken over
    labels.save_label(target, source / "part5.png", "good")
    assert labels.read_labels(target)["part5"]["label_source"] == "good"


def test_image_level_labels_count_in_detection_tuning_and_import(trained_run: str, tiny_dataset: Path,
                                                                 tmp_path: Path) -> None:
    test = scan_dataset(tiny_dataset).split("test")
    defective = [s for s in test if s.defective][:2]
    good = [s for s in test if not s.defective][:2]
    out = tmp_path / "labels"
    for sample in defective:
        labels.save_label(out, sample.image_path, "image_level")
    for sample in good:
        labels.save_label(out, sample.image_path, "good")
    samples = scan_dataset(out).samples
    predictor = Predictor(runs.resolve_run(trained_run))
    result = evaluate(predictor, samples)
    assert (result["n_defective"], result["n_defect_free"]) == (2, 2)
    assert result["n_outlined_defective"] == 0 and result["average_precision"] is not None
    flagged = {row["id"]: row["flagged"] for row in result["per_image"]}
    assert result["n_detected"] == sum(flagged[s.id] for s in defective)
    stats = tuning.collect_stats(predictor, samples)
    assert sum(stats.has_defect) == 2
    _, best, _ = tuning.tune_run(predictor, samples, save=False)
    assert (best["n_defective"], best["n_defect_free"]) == (2, 2)
    # Imported, it stays a defect without pixels; and training leaves it out.
    config.DATA_DIR.mkdir(parents=True, exist_ok=True)
    imported = scan_dataset(import_dataset(out, f"labels-{tmp_path.name}"[:60]).path)
    assert sum(s.defective and not s.outlined for s in imported.samples) == 2
    train, val, _ = imported.training_splits()
    assert all(s.outlined for s in train + val)


def test_label_queue_cli_csv_and_json(trained_run: str, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    first = scan_dataset(tiny_dataset).split("test")[0]
    labels.save_label(out, first.image_path, "good")
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["label-queue", "--run", trained_run, "--data", str(tiny_dataset), "--split", "test",
                     "--top", "3", "--labels", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3] and all(r["reason"] for r in rows)
    assert first.id not in {r["id"] for r in rows}
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["label-queue", "--run", trained_run, "--data", str(tiny_dataset), "--split", "test",
                     "--top", "3", "--labels", str(out), "--json"]) == 0
    assert [r["id"] for r in json.loads(buffer.getvalue())] == [r["id"] for r in rows]
    assert list(rows[0]) == list(labelqueue.COLUMNS)
    # The masks the page opens with, kept from the ranking: the run's mask under its recipe.
    assert labels.defects_wanted(trained_run) == 0  # its validation holds real defects: doubt alone ranks
    kept = labelqueue.label_queue(trained_run, tiny_dataset, 2, split="test", keep_masks=True)
    run_dir = runs.resolve_run(trained_run)
    for item in kept:
        image, _ = load_pair(next(s for s in scan_dataset(tiny_dataset).samples if s.id == item.id))
        expected = inspect(Predictor(run_dir).predict_proba(image), recipe.load_recipe(run_dir)).mask > 0
        assert np.array_equal(cv2.imdecode(np.frombuffer(item.mask_png, np.uint8), cv2.IMREAD_UNCHANGED) > 0, expected)


def test_fine_tune_on_labels_records_init_and_keeps_the_runs_validation(trained_run: str, tiny_dataset: Path,
                                                                         tmp_path: Path) -> None:
    out = labels.labels_folder(f"labels-{tmp_path.name}"[:60])
    extra = tmp_path / "extra"
    rng = np.random.default_rng(1)
    image = write(extra / "new.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 10:40] = 1
    labels.save_label(out, image, "drawn", mask)
    own = scan_dataset(tiny_dataset).samples
    in_train, in_val = next(s for s in own if s.split == "train"), next(s for s in own if s.split == "val")
    labels.save_label(out, in_train.image_path, "image_level")
    labels.save_label(out, in_val.image_path, "good")
    combined = scan_dataset(labels.training_set(out, trained_run))
    ids = {s.id: s for s in combined.samples}
    assert ids["new"].split == "train" and ids["new"].defective
    assert f"run-{in_train.id}" not in ids and ids[in_train.id].split == "train"  # labelled once, as labelled
    assert ids[in_val.id].split == "val"  # a label on a validation image stays in validation
    assert len(combined.split("val")) == len(scan_dataset(tiny_dataset).split("val"))
    run_id = labels.start_fine_tune(out, trained_run, minutes=0.1)
    folder = runs.run_dir(run_id)
    deadline = time.time() + 300
    while runs.read_run_json(folder).get("status") not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, "the fine-tune did not end within 5 minutes"
        time.sleep(2)
    info = runs.read_run_json(folder)
    log = folder / "train.log"
    assert info["status"] == "completed", log.read_text()[-2000:] if log.exists() else info
    assert info["params"]["init"] == trained_run and trained_run in info["init"]
    rows = labels.before_after(out, trained_run, run_id)
    assert [(r["set"], r["run"].split()[0]) for r in rows] == [
        ("labelled set", "before"), ("labelled set", "after"), ("the run's validation", "before"),
        ("the run's validation", "after"), ("readiness", "before"), ("readiness", "after")]
    assert rows[0]["detected"].endswith(" of 2") and rows[0]["false alarms"].endswith(" of 1")
    n_val = len(scan_dataset(tiny_dataset).split("val"))
    val = [r for r in rows if r["set"] == "the run's validation"]
    assert all(int(r["detected"].split(" of ")[1]) + int(r["false alarms"].split(" of ")[1]) == n_val for r in val)


def test_label_page_saves_a_good_part_as_an_all_zero_mask_then_trains_on_the_labels(trained_run: str,
                                                                                     tiny_dataset: Path) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120).run()
    at.switch_page("app_pages/7_Label.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.selectbox(key="label_run").set_value(trained_run).run()
    at.selectbox(key="label_data").set_value(tiny_dataset.name).run()
    at.text_input(key=f"label_name_{tiny_dataset.name}").set_value("labels-page-test").run()
    next(b for b in at.button if b.label == "Rank images").click().run()
    assert not at.exception, [e.value for e in at.exception]
    first = at.session_state.label_queue["items"][0]
    assert any("Why this image" in str(i.value) for i in at.info)
    next(b for b in at.button if b.label == "Good part").click().run()
    assert not at.exception, [e.value for e in at.exception]
    out = labels.labels_folder("labels-page-test")
    row = labels.read_labels(out)[first["id"]]
    assert row["label_source"] == "good" and row["source_path"] == str(Path(first["path"]).resolve())
    saved = cv2.imread(str(out / "masks" / f"{first['id']}.png"), cv2.IMREAD_UNCHANGED)
    assert saved is not None and saved.shape == cv2.imread(first["path"], cv2.IMREAD_UNCHANGED).shape[:2]
    assert not saved.any()
    assert any(f"{first['id']} saved as good" in str(s.value) for s in at.success)
    assert at.session_state.label_queue["items"][0]["id"] != first["id"]  # the next image comes up
    # Train on my labels: a background fine-tune from this run; once it completed, before and after.
    at.number_input(key="label_minutes").set_value(0.1).run()
    next(b for b in at.button if b.label == "Train on my labels").click().run()
    assert not at.exception, [e.value for e in at.exception]
    before, after = at.session_state.label_tuned
    assert before == trained_run and runs.read_run_json(runs.run_dir(after))["params"]["init"] == trained_run
    deadline = time.time() + 300
    while runs.read_run_json(runs.run_dir(after)).get("status") not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, "the fine-tune did not end within 5 minutes"
        time.sleep(2)
    at.run()
    next(b for b in at.button if b.label == "Show before / after").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[-1].value
    assert list(table["set"]) == ["labelled set", "labelled set", "the run's validation", "the run's validation",
                                  "readiness", "readiness"]
    assert all(value.endswith(" of 1") for value in list(table["false alarms"])[:2])  # the one good part labelled


def test_strokes_map_back_to_the_full_resolution_tile_and_erase() -> None:
    shape = (1250, 500)
    grid = labels.tiles(shape)
    assert grid[0] == (0, 512, 0, 500) and grid[-1] == (1024, 1250, 0, 500) and len(grid) == 3
    tile = grid[1]  # rows 512-1024
    scale = labels.canvas_scale(tile)
    assert scale >= 1
    height, width = round((tile[1] - tile[0]) * scale), round((tile[3] - tile[2]) * scale)
    layer = np.zeros((height, width, 4), np.uint8)
    # A 1 px brush of the image (scale canvas px wide) along image row 700, columns 100-300.
    row = round((700 - tile[0]) * scale)
    stroke = max(1, round(scale))
    layer[row:row + stroke, round(100 * scale):round(300 * scale)] = (*labels.PAINT, 255)
    mask = labels.apply_strokes(np.zeros(shape, np.uint8), layer, tile)
    ys, xs = np.nonzero(mask)
    assert abs(ys.min() - 700) <= 2 and abs(ys.max() - 700) <= 2
    assert abs(xs.min() - 100) <= 2 and abs(xs.max() - 299) <= 2
    assert not mask[:512].any() and not mask[1024:].any()
    erase = np.zeros_like(layer)
    erase[:, : round(200 * scale)] = (*labels.ERASE, 255)
    erased = labels.apply_strokes(mask, erase, tile)
    assert not erased[:, :199].any() and erased[700, 250] == 1
    assert labels.source_of(mask, mask) == "accepted" and labels.source_of(mask, erased) == "drawn"
    assert labels.source_of(mask, np.zeros_like(mask)) == "good"


def test_a_save_cut_short_never_leaves_a_part_counted_as_good(source: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from engine.storage import WriteError, atomic_write_bytes

    out = tmp_path / "labels"
    labels.save_label(out, source / "part1.png", "good")

    def full_disk_for_images(path: Path, data: bytes, durable: bool = True) -> Path:
        if Path(path).parent.name == "images":
            error = WriteError(f"no space left on device while writing {path}; the disk is full")
            error.errno = errno.ENOSPC
            raise error
        return atomic_write_bytes(path, data, durable)

    monkeypatch.setattr(labels, "atomic_write_bytes", full_disk_for_images)
    with pytest.raises(WriteError):
        labels.save_label(out, source / "part0.png", "drawn", a_mask())
    report = scan_dataset(out)
    assert [s.id for s in report.samples] == ["part1"]
    assert any("part0.png has no image" in problem for problem in report.problems)
    monkeypatch.undo()
    labels.save_label(out, source / "part0.png", "drawn", a_mask())  # the next save completes it
    assert {s.id: s.defective for s in scan_dataset(out).samples} == {"part0": True, "part1": False}


def test_label_page_ranks_a_typed_folder_and_says_in_one_line_when_it_holds_no_image(trained_run: str,
                                                                                    source: Path) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120).run()
    at.switch_page("app_pages/7_Label.py").run()
    at.selectbox(key="label_run").set_value(trained_run).run()
    at.text_input(key="label_folder").set_value(str(source.parent / "nothing-here")).run()
    next(b for b in at.button if b.label == "Rank images").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] and all("\n" not in e.value and "nothing-here" in e.value for e in at.error)
    at.text_input(key="label_folder").set_value(str(source)).run()
    next(b for b in at.button if b.label == "Rank images").click().run()
    assert not at.exception, [e.value for e in at.exception]
    queue = at.session_state.label_queue["items"]
    assert sorted(item["id"] for item in queue) == [f"part{i}" for i in range(6)]
    assert at.text_input(key="label_name_line").value == "labels-line"


def test_labelled_defects_validate_in_turn_where_the_run_validated_on_none() -> None:
    rows = {f"p{k}": {"id": f"p{k}", "label_source": "drawn", "defect_fraction": "0.01", "source_path": f"/x/p{k}",
                      "labelled_at": f"2026-12-07T10:00:0{k}+00:00"} for k in range(5)}
    rows["good"] = {"id": "good", "label_source": "good", "defect_fraction": "", "source_path": "/x/good",
                    "labelled_at": "2026-12-07T10:00:01+00:00"}
    rows["flat"] = {"id": "flat", "label_source": "image_level", "defect_fraction": "", "source_path": "/x/flat",
                    "labelled_at": "2026-12-07T10:00:09+00:00"}
    rows["held"] = {"id": "held", "label_source": "drawn", "defect_fraction": "0.2", "source_path": "/x/held",
                    "labelled_at": "2026-12-07T10:00:00+00:00"}
    # labelling order p0 p1 p2 p3 p4 flat (good is no defect, held is already in the run's test split)
    assert labels.validating_labels(rows, {"/x/held": "test"}) == {"p1", "p3", "flat"}
    # four defects: every other one, then the latest of the rest up to three, the first one trains
    four = {k: rows[k] for k in ("p0", "p1", "p2", "p3")}
    assert labels.validating_labels(four, {}) == {"p1", "p2", "p3"}
    assert labels.validating_labels({k: rows[k] for k in ("p0", "p1")}, {}) == {"p1"}


@pytest.mark.slow
def test_a_fine_tune_of_a_good_parts_run_validates_on_every_other_labelled_defect(tiny_dataset: Path,
                                                                                 tmp_path: Path) -> None:
    from engine.train import TrainConfig, train

    good = tmp_path / "good"
    (good / "images").mkdir(parents=True)
    samples = scan_dataset(tiny_dataset).samples
    for sample in (s for s in samples if not s.defective):
        (good / "images" / sample.image_path.name).symlink_to(sample.image_path)
    run = train(TrainConfig(data=str(good), epochs=1, base=8, depth=2, crop=32, batch_size=8, steps_per_epoch=2,
                            name="good-parts"))
    out = labels.labels_folder(f"labels-{tmp_path.name}"[:60])
    # the queue leads with the likeliest defects, as many as a fine-tune wants (3 to validate, 3 to learn from)
    assert labels.defects_wanted(run, out) == 6
    queue = labelqueue.label_queue(run, tiny_dataset, 7, split="train", labels=out, use_truth=False)
    assert [item.reason.startswith("likely defect") for item in queue] == [True] * 6 + [False]
    defective = [s for s in samples if s.defective and s.split == "train"][:4]
    labels.save_label(out, defective[0].image_path, "drawn", load_pair(defective[0])[1])
    assert labels.defects_wanted(run, out) == 5
    for sample in defective:
        labels.save_label(out, sample.image_path, "drawn", load_pair(sample)[1])
    assert labels.defects_wanted(run, out) == 2  # 3 to validate and 1 to learn from are there
    combined = scan_dataset(labels.training_set(out, run))
    validating = sorted(s.id for s in combined.split("val") if not s.id.startswith("run-"))
    assert len(validating) == 3 and validating == sorted(s.image_path.stem for s in defective)[1:]
    assert all(s.defective for s in combined.split("val") if s.id in validating)
    assert [s.id for s in combined.split("train") if s.defective] == [sorted(s.image_path.stem for s in defective)[0]]
