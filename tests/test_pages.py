"""Every Streamlit page through AppTest with a real interaction, on real runs, datasets and the registry."""

from __future__ import annotations

import json
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_pages.ui import epoch_label
from engine import config, data, jobs, readiness, registry, registry_sync, runs, runstore, synth, synthset
from engine.drawing import mask_difference
from engine.errors import EngineError, RunNotFound
from engine.evaluate import evaluate, select_samples
from engine.imageio import encode_png, read_image, read_mask
from engine.inference import Predictor
from engine.metrics import dice_score, iou_score
from engine.recipe import RECIPE_FILE, load_recipe, save_recipe
from engine.tuning import tune_run
from tests.timing import slowness

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60  # first runs import torch and load models on a busy 2-core machine


def open_page(page: str | None = None) -> AppTest:
    """Start at Home (as a user does), then switch to `page`; returns the AppTest after the page's first run."""
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    """The shown value of the metric with this label (anywhere on the page)."""
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return values[0]


def texts(at: AppTest) -> str:
    """All markdown, captions, alerts and subheaders of the page as one string."""
    parts = [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.success, *at.subheader]
    return "\n".join(str(p.value) for p in parts)


@pytest.fixture
def restore_recipe(trained_run: str):
    """The trained run's folder; its recipe.json is put back as it was once the test is done."""
    path = runs.run_dir(trained_run) / RECIPE_FILE
    before = path.read_bytes() if path.is_file() else None
    yield path.parent
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)


def sample_with_mask(run_id: str) -> data.Sample:
    """The image Inspect opens for a run: the first labelled defect of the test split of the run's own dataset."""
    trained_on = runs.read_run_json(runs.run_dir(run_id))["dataset"]["path"]
    return next(s for s in data.scan_dataset(trained_on, validate=False).samples if s.defective and s.split == "test")


# ---------------------------------------------------------------------------------------- Home


def test_home_creates_sample_folder_and_lists_runs(trained_run: str) -> None:
    at = open_page()
    assert (config.SAMPLE_DIR / "images").is_dir() and any((config.SAMPLE_DIR / "images").iterdir())
    assert any(d.name == "procedural_images" for d in registry.list_datasets())
    assert int(metric(at, "Runs")) == len(runstore.overview()) >= 1
    assert int(metric(at, "Datasets")) == len(registry.list_datasets())
    # Recipes are registry artifacts too (training saves one), but they are not exports.
    assert any(a.kind == "recipe" for a in registry.list_artifacts())
    assert int(metric(at, "Exports")) == len(registry.list_exports())
    assert all(a.kind in ("onnx", "int8") and Path(a.path).is_file() for a in registry.list_exports())
    run_table = at.dataframe[1].value
    assert trained_run in set(run_table["run_id"])
    # Whether each run may be served, and why not, where a user looks first.
    row = run_table.set_index("run_id").loc[trained_run]
    info = runs.read_run_json(runs.run_dir(trained_run))
    assert row["ready"] == ("yes" if info["ready"] else "no") and row["ready_reason"] == info["ready_reason"]
    links = {link.proto.page for link in at.get("page_link")}
    assert {"Generate_Data", "Train", "Inspect", "Runs", "Review"} <= links


# ---------------------------------------------------------------------------------------- Generate


def test_generate_previews_then_writes_and_registers(session_home: Path) -> None:
    at = open_page("app_pages/1_Generate_Data.py")
    assert len(at.image) == 6  # the preview grid
    at.text_input(key="gen_name").set_value("apptest-gen")
    at.number_input(key="gen_count").set_value(12)
    at.select_slider(key="gen_size").set_value(64)
    at.slider(key="gen_w_crack").set_value(0.0)
    at.run()
    at.button(key="gen_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = config.DATA_DIR / "apptest-gen"
    report = data.scan_dataset(out)
    assert report.counts()["images"] == 12
    assert all("crack" not in s.defect_types for s in report.samples)
    row = next(d for d in registry.list_datasets() if d.name == "apptest-gen")
    assert row.content_hash == data.dataset_hash(report.samples) and row.n_images == 12
    assert "apptest-gen" in at.success[0].value


def test_generate_refuses_bad_name_with_a_message() -> None:
    at = open_page("app_pages/1_Generate_Data.py")
    at.text_input(key="gen_name").set_value("../escape").run()
    assert not at.exception
    assert "not usable" in at.error[0].value
    assert "gen_go" not in {b.key for b in at.button}  # nothing can be written under a bad name


def test_import_section_imports_and_registers_a_folder(tiny_dataset: Path) -> None:
    at = open_page("app_pages/1_Generate_Data.py")
    at.text_input(key="import_src").set_value(str(tiny_dataset))
    at.text_input(key="import_name").set_value("apptest-import")
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    row = next(d for d in registry.list_datasets() if d.content_hash and d.path.endswith(("apptest-import", "tiny")))
    assert row.n_images == 40
    assert any("40" in s.value for s in at.success)


def test_cli_generate_registers_through_the_shared_function(session_home: Path) -> None:
    from engine.__main__ import main

    out = config.DATA_DIR / "cli-gen"
    assert main(["generate", "--out", str(out), "--count", "4", "--size", "64"]) == 0
    row = next(d for d in registry.list_datasets() if d.name == "cli-gen")
    assert row.content_hash == data.dataset_hash(data.scan_dataset(out).samples)


# ---------------------------------------------------------------------------------------- Train


def test_train_page_offers_the_engines_defaults() -> None:
    from engine.training.config import DEFAULT_EPOCHS, SUGGESTED_MINUTES, TrainConfig

    defaults = TrainConfig()
    at = open_page("app_pages/2_Train.py")
    assert at.radio(key="train_stop_by").value == "minutes"
    assert at.number_input(key="train_minutes").value == SUGGESTED_MINUTES
    assert at.number_input(key="train_batch").value == defaults.batch_size
    assert at.number_input(key="train_lr").value == pytest.approx(defaults.lr)
    assert at.number_input(key="train_seed").value == defaults.seed
    assert at.selectbox(key="train_preset").value == defaults.preset
    assert at.number_input(key="train_nproc").value == defaults.nproc == 1
    at.radio(key="train_stop_by").set_value("epochs").run()
    assert at.number_input(key="train_epochs").value == DEFAULT_EPOCHS


@pytest.mark.slow
def test_train_starts_a_background_run_that_finishes(tiny_dataset: Path) -> None:
    at = open_page("app_pages/2_Train.py")
    at.selectbox(key="train_dataset").set_value(tiny_dataset.name)
    at.text_input(key="train_name").set_value("apptest-train")
    at.radio(key="train_stop_by").set_value("epochs").run()
    at.number_input(key="train_epochs").set_value(1)
    at.select_slider(key="train_crop").set_value(32)
    at.number_input(key="train_batch").set_value(4)
    at.number_input(key="train_steps").set_value(2)
    at.select_slider(key="train_paint").set_value(0.2).run()
    at.multiselect(key="train_paint_types").set_value(["pit", "crack"])
    at.number_input(key="train_paint_size").set_value(0.5)
    at.run()
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = next(r for r in registry.list_runs() if r.name == "apptest-train")
    assert at.query_params.get("run") in (run.id, [run.id])
    assert any(f"Started run {run.id}" in m.value for m in at.success)
    # Drawn right after the start with the run active: a second click finds the button disabled (issue 39).
    if registry.get_run(run.id).status in registry.ACTIVE_STATUSES:
        assert at.button(key="train_start").disabled
    deadline = time.monotonic() + 90 * slowness()
    while registry.get_run(run.id).status in registry.ACTIVE_STATUSES and time.monotonic() < deadline:
        time.sleep(1)
    final = registry.get_run(run.id)
    assert final.status == "completed", (final.status, final.error, jobs.log_tail(run.id))
    assert final.epochs_done == 1 and len(registry.epoch_metrics(run.id)) == 1
    assert final.params["crop"] == 32 and final.params["steps_per_epoch"] == 2
    assert final.params["paint"] == 0.2 and final.params["paint_types"] == "pit,crack"
    assert final.params["paint_size"] == 0.5
    at.run()
    assert not at.exception
    assert "completed: epoch 1/1" in at.get("progress")[0].proto.text
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["xaxis"]["dtick"] == spec["layout"]["xaxis2"]["dtick"] == 1  # whole epochs only
    # The run selector names runs only: a status in its label went stale while the run progressed.
    assert run.id in at.selectbox(key="train_watch").options
    assert not any("[" in option for option in at.selectbox(key="train_watch").options)
    assert [b for b in at.button if b.key == f"resume_{run.id}"]  # resume is offered


def test_train_asks_which_defects_to_paint_up_front_for_a_set_of_good_parts(tiny_dataset: Path) -> None:
    import shutil

    folder = config.DATA_DIR / "train-all-good"
    synthset.generate_dataset(folder, 6, seed=9, params=synth.SynthParams(size=64, defect_free=1.0), workers=1)
    try:
        at = open_page("app_pages/2_Train.py")
        at.selectbox(key="train_dataset").set_value("train-all-good").run()
        assert not at.exception
        # Nothing labelled: the kinds to paint are the first choice, beside the dataset, not under Advanced.
        assert "train_paint_types" not in [m.key for m in at.expander[0].multiselect]
        assert "train_paint_types" in [m.key for m in at.multiselect]
        assert any("Name the kinds your line looks for" in c.value for c in at.caption)
        assert at.text_input(key="train_name").value == "train-all-good"  # the run is named after the set picked
        at.selectbox(key="train_dataset").set_value(tiny_dataset.name).run()  # labelled defects: under Advanced
        assert at.text_input(key="train_name").value == tiny_dataset.name
        assert "train_paint_types" in [m.key for m in at.expander[0].multiselect]
        assert not any("Name the kinds your line looks for" in c.value for c in at.caption)
        at.text_input(key="train_name").set_value("my-run").run()  # a name the user gives stays
        at.selectbox(key="train_dataset").set_value("train-all-good").run()
        assert at.text_input(key="train_name").value == "my-run"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_train_refuses_a_batch_that_does_not_split_over_the_processes(tiny_dataset: Path) -> None:
    at = open_page("app_pages/2_Train.py")
    at.selectbox(key="train_dataset").set_value(tiny_dataset.name)
    at.text_input(key="train_name").set_value("apptest-uneven")
    at.number_input(key="train_batch").set_value(16)
    at.number_input(key="train_nproc").set_value(3)
    at.run()
    at.button(key="train_start").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["--batch-size 16 does not split evenly over 3 processes"]
    assert not [r for r in registry.list_runs() if r.name == "apptest-uneven"]  # nothing was queued


def test_train_offers_the_set_the_newest_run_trained_on_and_keeps_minutes_over_a_reload(
        trained_run: str, tiny_dataset: Path) -> None:
    held_out = config.DATA_DIR / "zz-held-out"  # registered after the training set, as the README's synth-test is
    synthset.generate_and_register(held_out, 6, seed=5, params=synth.SynthParams(size=64), workers=1)
    try:
        at = open_page("app_pages/2_Train.py")
        newest_run = next(r for r in registry.list_runs() if r.dataset_path and Path(r.dataset_path).is_dir())
        assert at.selectbox(key="train_dataset").value == Path(newest_run.dataset_path).name
        at.number_input(key="train_minutes").set_value(3.5).run()
        assert at.query_params.get("minutes") in ("3.5", ["3.5"])
        reloaded = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=TIMEOUT)  # a reload: new session
        reloaded.query_params["minutes"] = "3.5"
        reloaded.run().switch_page("app_pages/2_Train.py").run()
        assert not reloaded.exception
        assert reloaded.number_input(key="train_minutes").value == 3.5
    finally:
        shutil.rmtree(held_out, ignore_errors=True)


def test_train_keeps_watching_a_run_shown_failed_only_for_want_of_a_heartbeat(runs_dir: Path) -> None:
    run_id = "apptest-silent"
    (runs_dir / run_id).mkdir(parents=True, exist_ok=True)
    # Its record says it trains, on another machine, whose heartbeat has not come for longer than the limit.
    runstore.save(runs_dir / run_id, {"run_id": run_id, "name": run_id, "status": "running", "pid": 1,
                                      "host": "another-machine", "epochs_done": 1, "epochs_planned": 4,
                                      "started_at": "2026-01-01T00:00:00+00:00"})
    old = registry.utcnow() - timedelta(seconds=registry.STALE_AFTER_S + 60)
    registry.update_run(run_id, heartbeat=old)
    try:
        state = jobs.progress(run_id)
        assert state["status"] == "failed" and not state["settled"]  # not final: it may beat again
        at = open_page("app_pages/2_Train.py")
        at.selectbox(key="train_watch").set_value(run_id).run()
        assert not at.exception
        assert not at.error and any("Still watching" in w.value for w in at.warning), texts(at)
        assert "epoch 1/4" in at.get("progress")[0].proto.text and at.get("progress")[0].proto.value < 100
        registry.update_run(run_id, heartbeat=registry.utcnow())  # it beats again: running, never drawn failed
        assert jobs.progress(run_id)["status"] == "running"
    finally:
        registry.update_run(run_id, heartbeat=old)  # silent again, so that it may be deleted
        runs.delete_run(run_id)


def test_train_shows_why_a_run_failed(runs_dir: Path) -> None:
    run_id = "apptest-failed"
    (runs_dir / run_id).mkdir(parents=True, exist_ok=True)
    runstore.save(runs_dir / run_id, {"run_id": run_id, "name": run_id, "status": "failed",
                                      "error": "DatasetError: no val split"})
    (runs_dir / run_id / jobs.LOG_NAME).write_text("loading data\nTraceback: the reason is here\n")
    at = open_page("app_pages/2_Train.py")
    at.selectbox(key="train_watch").set_value(run_id).run()
    assert not at.exception
    assert "no val split" in at.error[0].value
    assert any("the reason is here" in c.value for c in at.code)
    runs.delete_run(run_id)


# ---------------------------------------------------------------------------------------- Inspect


def test_inspect_dice_equals_engine_dice(trained_run: str) -> None:
    at = open_page("app_pages/4_Inspect.py")
    at.sidebar.selectbox(key="inspect_run").set_value(trained_run).run()
    at.sidebar.select_slider[0].set_range(2, 2)
    at.sidebar.slider[0].set_value(0.3)
    at.run()
    assert not at.exception
    sample = sample_with_mask(trained_run)  # a run opens on its own dataset's test split, not the sample folder
    assert at.selectbox(key="inspect_folder").value == Path(runs.read_run_json(runs.run_dir(trained_run))[
        "dataset"]["path"]).name != config.SAMPLE_DIR.name
    assert at.selectbox(key="inspect_sample").value == sample.id
    predictor = Predictor(runs.run_dir(trained_run), 2)
    pred = predictor.predict_proba(read_image(sample.image_path)) >= 0.3
    truth = read_mask(sample.mask_path)
    assert metric(at, "Dice (epoch 2)") == f"{dice_score(pred, truth):.4f}"
    assert metric(at, "IoU (epoch 2)") == f"{iou_score(pred, truth):.4f}"
    assert len(at.image) >= 4  # input, ground truth, heatmap, overlay


def test_inspect_and_review_start_at_the_recipe_threshold(trained_run: str, restore_recipe: Path) -> None:
    save_recipe(restore_recipe, load_recipe(restore_recipe).with_overrides(threshold=0.33))
    at = open_page("app_pages/4_Inspect.py")
    at.sidebar.selectbox(key="inspect_run").set_value(trained_run).run()
    assert at.sidebar.slider(key=f"inspect_thr_{trained_run}").value == 0.33
    at.switch_page("app_pages/6_Review.py").run()
    at.sidebar.selectbox(key="review_run").set_value(trained_run).run()
    assert at.sidebar.slider(key=f"review_thr_{trained_run}").value == 0.33


def test_inspect_threshold_reuses_probabilities(trained_run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page("app_pages/4_Inspect.py")
    at.sidebar.selectbox(key="inspect_run").set_value(trained_run).run()
    calls = []
    original = Predictor.predict_proba
    # A spy around the real method: counts network runs, changes nothing.
    monkeypatch.setattr(Predictor, "predict_proba",
                        lambda self, image, **kw: calls.append(1) or original(self, image, **kw))
    for value in (0.2, 0.6):
        at.sidebar.slider[0].set_value(value).run()
        assert not at.exception
    assert calls == [], "moving the threshold ran the network again"
    monkeypatch.undo()
    sample = sample_with_mask(trained_run)
    epoch = at.sidebar.select_slider[0].value[0]
    probability = Predictor(runs.run_dir(trained_run), epoch).predict_proba(read_image(sample.image_path))
    expected = dice_score(probability >= 0.6, read_mask(sample.mask_path))
    assert metric(at, f"Dice (epoch {epoch})") == f"{expected:.4f}"


def test_inspect_compares_two_epochs(trained_run: str) -> None:
    at = open_page("app_pages/4_Inspect.py")
    at.sidebar.selectbox(key="inspect_run").set_value(trained_run).run()
    at.sidebar.select_slider[0].set_range(1, 2)
    at.sidebar.slider[0].set_value(0.4)
    at.run()
    assert not at.exception
    assert {"Dice (epoch 1)", "Dice (epoch 2)"} <= {m.label for m in at.metric}
    assert "Difference: epoch 1 vs epoch 2" in texts(at)
    sample = sample_with_mask(trained_run)
    image = read_image(sample.image_path)
    masks = [Predictor(runs.run_dir(trained_run), e).predict_proba(image) >= 0.4 for e in (1, 2)]
    expected = mask_difference(*masks)
    shown = at.table[-1].value  # the difference counts come last
    assert list(shown["count"]) == [expected["only_a"], expected["only_b"], expected["both"]]


def test_inspect_upload_without_mask_and_unreadable_upload(trained_run: str) -> None:
    at = open_page("app_pages/4_Inspect.py")
    at.radio(key="inspect_source").set_value("Upload").run()
    assert "Upload a PNG" in at.info[0].value
    image = (np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8)
    at.file_uploader(key="inspect_upload").set_value(("part.png", encode_png(image), "image/png")).run()
    assert not at.exception and not at.error
    assert any("no ground-truth mask" in i.value for i in at.info)
    assert not [m for m in at.metric if m.label.startswith("Dice")]
    at.file_uploader(key="inspect_upload").set_value(("broken.png", b"not an image at all", "image/png")).run()
    assert not at.exception
    assert "Cannot use this image" in at.error[0].value and "not a readable" in at.error[0].value


def test_inspect_tells_when_the_chosen_run_is_gone(trained_run: str) -> None:
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/4_Inspect.py")
    at.session_state["inspect_run"] = "20200101-000000-deleted-0000"
    at.run()
    assert not at.exception
    assert "no longer exists" in at.warning[0].value


# ---------------------------------------------------------------------------------------- Review


def on_the_sample_folder(at: AppTest) -> AppTest:
    """Review the sample folder, all of it (a run starts on its own dataset's test split)."""
    at.sidebar.selectbox(key="review_folder").set_value(config.SAMPLE_DIR.name)
    return at.sidebar.selectbox(key="review_split").set_value("all").run()


def test_review_matches_engine_and_opens_image_in_inspect(trained_run: str, tiny_dataset: Path) -> None:
    at = open_page("app_pages/6_Review.py")
    at.sidebar.selectbox(key="review_run").set_value(trained_run).run()
    # The run's own dataset, on images training did not see, not the synthetic sample folder.
    assert at.sidebar.selectbox(key="review_folder").value == tiny_dataset.name
    assert at.sidebar.selectbox(key="review_split").value == "test"
    on_the_sample_folder(at)
    at.sidebar.select_slider[0].set_range(2, 2).run()
    assert not at.exception
    folder = runs.run_dir(trained_run)
    threshold = load_recipe(folder).threshold  # the sliders start at the recipe's threshold
    expected = evaluate(Predictor(folder, 2), select_samples(config.SAMPLE_DIR, "all"), threshold)
    assert metric(at, "Dice") == f"{expected['dice']:.3f}"
    assert metric(at, "IoU") == f"{expected['iou']:.3f}"
    table = at.dataframe(key="review_table").value
    assert len(table) == expected["n_images"]
    assert list(table["dice"]) == sorted(table["dice"])  # worst first
    worst = str(table.iloc[0]["id"])
    at.session_state["review_table"] = {"selection": {"rows": [0], "columns": []}}
    at.run()
    assert f"Image {worst}" in texts(at)
    captions = [caption for image in at.image for caption in image.captions]
    verdicts = [caption.rsplit(": ", 1)[1] for caption in captions if caption.startswith(epoch_label(2))]
    assert verdicts == [table.iloc[0]["verdict"]]  # the picture's caption and the table give one verdict
    at.button(key="review_open").click().run()
    assert not at.exception
    assert at.title[0].value.endswith("Inspect")
    assert at.selectbox(key="inspect_sample").value == worst
    assert at.selectbox(key="inspect_run").value == trained_run


def test_review_says_when_the_minimum_region_rule_dropped_every_region(trained_run: str,
                                                                     restore_recipe: Path) -> None:
    from engine.recipe import Recipe

    save_recipe(restore_recipe, Recipe(threshold=0.05, min_region_px=10**6, source="manual"))  # nothing that big
    at = open_page("app_pages/6_Review.py")
    at.sidebar.selectbox(key="review_run").set_value(trained_run).run()
    assert not at.exception
    table = at.dataframe(key="review_table").value
    reached = table["max_score"] >= 0.05
    assert reached.any() and (table["verdict"] == "ok").all()
    # Scores over the threshold with verdict "ok": the table says why, as Inspect does for one image.
    assert table.loc[reached, "dropped"].str.contains("not counted by the rule").all()
    assert table.loc[reached, "dropped"].str.contains("1000000 px").all()  # the rule, in the recipe's own words
    assert table.loc[~reached, "dropped"].isna().all()


def test_review_of_a_run_whose_dataset_has_no_test_split_starts_on_the_sample_folder(trained_run: str,
                                                                                    tiny_dataset: Path) -> None:
    import shutil

    folder = config.DATA_DIR / "no-test-split"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image in sorted((tiny_dataset / "images").glob("*.png"))[:3]:
        shutil.copy(image, folder / "images" / image.name)
    (folder / "manifest.csv").write_text("id,split\n" + "".join(
        f"{p.stem},train\n" for p in (folder / "images").glob("*.png")))
    run_id = "20200103-000000-apptest-no-test-0000"
    run_folder = config.RUNS_DIR / run_id
    shutil.copytree(runs.run_dir(trained_run), run_folder, ignore=shutil.ignore_patterns("export"))
    info = runs.read_run_json(run_folder)
    runs.write_run_json(run_folder, {**info, "run_id": run_id, "dataset": {**info["dataset"], "path": str(folder)}})
    registry_sync.rebuild()
    try:
        at = open_page("app_pages/6_Review.py")
        at.sidebar.selectbox(key="review_run").set_value(run_id).run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert at.sidebar.selectbox(key="review_folder").value == config.SAMPLE_DIR.name
        assert at.sidebar.selectbox(key="review_split").value == "all"
    finally:
        runs.delete_run(run_id)
        shutil.rmtree(folder)


def test_review_tunes_and_saves_the_recipe_the_engine_would(trained_run: str, restore_recipe: Path) -> None:
    at = open_page("app_pages/6_Review.py")
    at.sidebar.selectbox(key="review_run").set_value(trained_run).run()
    on_the_sample_folder(at)
    epoch = at.sidebar.select_slider[0].value[0]
    at.number_input(key="review_goal").set_value(25.0)
    at.checkbox(key="review_bound").uncheck()
    at.button(key="review_tune").click().run()
    assert not at.exception
    expected, result, _ = tune_run(Predictor(restore_recipe, epoch), select_samples(config.SAMPLE_DIR, "all"), 0.25,
                                   save=False)
    saved = load_recipe(restore_recipe)
    assert saved.source == "tuned" and saved.tuning["split"] == "all"
    assert saved.rules() == expected.rules()  # threshold, minimum area and sure tier
    assert f"Recipe saved: {expected.describe()}." in texts(at)
    assert f"detection {result['detection_rate']:.1%}" in texts(at)
    assert at.sidebar.slider(key=f"review_thr_{trained_run}").value == pytest.approx(saved.threshold)


def test_review_of_a_folder_of_good_parts_only_shows_no_dice(trained_run: str) -> None:
    import shutil

    folder = config.DATA_DIR / "all-good"
    synthset.generate_dataset(folder, 6, seed=9, params=synth.SynthParams(size=64, defect_free=1.0), workers=1)
    try:
        at = open_page("app_pages/6_Review.py")
        at.sidebar.selectbox(key="review_run").set_value(trained_run).run()
        at.sidebar.selectbox(key="review_folder").set_value("all-good").run()
        at.sidebar.selectbox(key="review_split").set_value("all").run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        # Nothing to outline: the set's Dice would read 1.000 where nothing is drawn.
        assert metric(at, "Dice") == "—" and metric(at, "IoU") == "—"
        assert metric(at, "Detection rate") == "—" and metric(at, "False-alarm rate") != "—"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_review_of_a_folder_sorted_by_verdict_shows_verdicts_and_tunes_on_them(trained_run: str, tiny_dataset: Path,
                                                                              restore_recipe: Path) -> None:
    import shutil

    from engine.importer import import_dataset

    bins = config.DATA_DIR.parent / "bins-source"
    for sample in select_samples(tiny_dataset, "all"):
        folder = bins / ("scratch" if sample.defective else "good")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.image_path, folder / sample.image_path.name)
    report = import_dataset(bins, "line-bins")
    assert report.layout == "sorted" and "not for training" in report.lines()[-1]
    try:
        at = open_page("app_pages/6_Review.py")
        at.sidebar.selectbox(key="review_run").set_value(trained_run).run()
        at.sidebar.selectbox(key="review_folder").set_value("line-bins").run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        expected = evaluate(Predictor.from_run(trained_run), select_samples(report.path, "all"),
                            load_recipe(restore_recipe).threshold)
        assert expected["dice"] is None and metric(at, "Dice") == "—"  # no masks, no Dice
        assert metric(at, "Detection rate") == f"{expected['detection_rate']:.0%}"
        table = at.dataframe(key="review_table").value
        assert len(table) == expected["n_images"] == report.counts["images"]
        assert "dice" not in table and "missed_px" not in table  # no outlines: no empty pixel columns
        missed = [row for row in expected["per_image"] if row["has_defect"] and not row["flagged"]]
        assert missed  # the fixture's model misses some; those rejects come first, though they have no Dice
        assert set(table["id"][: len(missed)]) == {row["id"] for row in missed}
        at.checkbox(key="review_bound").uncheck()
        at.button(key="review_tune").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        epoch = at.sidebar.select_slider[0].value[0] if at.sidebar.select_slider else "best"
        expected, result, _ = tune_run(Predictor(restore_recipe, epoch), select_samples(report.path, "all"),
                                       readiness.false_alarm_goal(runs.read_run_json(restore_recipe)), save=False)
        saved = load_recipe(restore_recipe)
        assert (saved.threshold, saved.min_region_px) == (expected.threshold, expected.min_region_px)
        # the images training saw (the run's own train and val splits, sorted here too) are left out by content
        assert 0 < saved.tuning["n_defective"] == result["n_defective"] < report.counts["defective"]
        assert saved.tuning["dice"] is None
        table = at.dataframe(key="review_table").value  # as shown at the tuned recipe
        rejected = int(table.index[table["truth"] == "defect"][0])
        at.session_state["review_table"] = {"selection": {"rows": [rejected], "columns": []}}
        at.run()
        assert any("Sorted as scratch: no outline" in c for image in at.image for c in image.captions)
        at.button(key="review_open").click().run()  # Inspect: a verdict to check, no Dice without an outline
        assert not at.exception and "sorted as scratch, without a mask" in "\n".join(i.value for i in at.sidebar.info)
        assert not [m for m in at.sidebar.metric if m.label.startswith("Dice")]
        assert any(c.value == "scratch · folder scratch/" for c in at.caption)  # where it was sorted, not a split
    finally:
        shutil.rmtree(bins)
        shutil.rmtree(report.path)


# ---------------------------------------------------------------------------------------- Runs


def _make_finished_run(run_id: str) -> Path:
    """A completed run folder plus registry row (what a finished training leaves behind, minus weights)."""
    folder = config.RUNS_DIR / run_id
    folder.mkdir(parents=True)
    runstore.save(folder, {"run_id": run_id, "name": run_id, "status": "completed", "params": {"crop": 32}})
    return folder


def test_runs_table_curves_lineage_and_delete(trained_run: str) -> None:
    victim = "20200101-000000-apptest-victim-0000"
    folder = _make_finished_run(victim)
    at = open_page("app_pages/5_Runs.py")
    table = at.dataframe[0].value
    assert {trained_run, victim} <= set(table["run_id"])
    curves = at.multiselect(key="runs_curves")
    assert curves.value and curves.value == curves.options[:len(curves.value)]  # the newest runs by default
    curves.set_value([trained_run]).run()
    assert not at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["xaxis"]["dtick"] == 1  # two epochs: ticks at whole epochs, not at 1.5
    at.selectbox(key="runs_lineage").set_value(trained_run).run()
    assert runs.read_run_json(runs.run_dir(trained_run))["dataset"]["hash"] in texts(at)
    at.selectbox(key="runs_delete").set_value(victim).run()
    assert at.button(key="runs_delete_go").disabled  # not before the confirmation
    at.checkbox(key=f"runs_delete_sure_{victim}").check().run()
    at.button(key="runs_delete_go").click().run()
    assert not at.exception
    assert not folder.exists() and registry.get_run(victim) is None
    assert f"Deleted run {victim}" in at.success[0].value
    assert victim not in set(at.dataframe[0].value["run_id"])


def test_delete_run_refuses_demo_active_and_unknown_runs() -> None:
    with pytest.raises(EngineError, match="demo"):
        runs.delete_run("demo")
    registry.create_run("apptest-active", status="running", pid=None)
    registry.heartbeat("apptest-active")
    with pytest.raises(EngineError, match="cancel it"):
        runs.delete_run("apptest-active")
    registry.delete_run("apptest-active")
    with pytest.raises(RunNotFound):
        runs.delete_run("no-such-run")


def test_difference_image_codes_only_a_only_b_and_both() -> None:
    from engine.drawing import DIFF_COLORS, difference_image

    image = np.full((4, 4), 0.5, np.float32)
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    a[0, 0] = a[1, 1] = 1
    b[1, 1] = b[2, 2] = 1
    rgb = difference_image(image, a, b, alpha=1.0)
    assert tuple(rgb[0, 0]) == DIFF_COLORS["only_a"]
    assert tuple(rgb[2, 2]) == DIFF_COLORS["only_b"]
    assert tuple(rgb[1, 1]) == DIFF_COLORS["both"]
    assert tuple(rgb[3, 3]) == (63, 63, 63)  # the dimmed surface
    assert mask_difference(a, b) == {"only_a": 1, "only_b": 1, "both": 1}


def test_dataset_name_is_checked() -> None:
    assert synthset.dataset_dir("ok-name_1.v2") == config.DATA_DIR / "ok-name_1.v2"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(EngineError):
            synthset.dataset_dir(bad)


def test_train_refuses_a_dataset_that_fails_validation(session_home: Path) -> None:
    broken = config.DATA_DIR / "apptest-broken"
    (broken / "images").mkdir(parents=True)
    (broken / "images" / "000000.png").write_bytes(b"this is not a png")
    (broken / "images" / "000001.png").write_bytes(b"neither is this")
    at = open_page("app_pages/2_Train.py")
    at.selectbox(key="train_dataset").set_value("apptest-broken")
    at.text_input(key="train_name").set_value("apptest-broken-run")
    at.run()
    at.button(key="train_start").click().run()
    assert not at.exception
    assert "no usable images" in at.error[0].value
    assert not [r for r in registry.list_runs() if r.name == "apptest-broken-run"]


def test_inspect_run_with_only_best_checkpoint(trained_run: str) -> None:
    """The shipped demo run keeps only best.pth (epoch files are not in git): Inspect offers 'best'."""
    import shutil

    folder = config.RUNS_DIR / "apptest-best-only"
    shutil.copytree(runs.run_dir(trained_run), folder, ignore=shutil.ignore_patterns("model_epoch_*.pth"))
    try:
        at = open_page("app_pages/4_Inspect.py")
        at.sidebar.selectbox(key="inspect_run").set_value("apptest-best-only").run()
        assert not at.exception
        assert not at.sidebar.select_slider  # one model, nothing to slide
        sample = sample_with_mask(trained_run)
        threshold = load_recipe(folder).threshold  # the sliders start at the recipe's threshold
        pred = Predictor(folder, "best").predict_proba(read_image(sample.image_path)) >= threshold
        assert metric(at, "Dice (best)") == f"{dice_score(pred, read_mask(sample.mask_path)):.4f}"
    finally:
        shutil.rmtree(folder)


def test_a_not_ready_run_says_so_on_inspect_runs_and_review(trained_run: str) -> None:
    """Training's verdict (run.json ready=false) is shown with its reason and the next steps."""
    import shutil

    run_id = "20200102-000000-apptest-not-ready-0000"
    folder = config.RUNS_DIR / run_id
    shutil.copytree(runs.run_dir(trained_run), folder, ignore=shutil.ignore_patterns("export"))
    reason = "validation false alarms 100% above the 5% goal (20 defect-free images)"
    runs.write_run_json(folder, {**runs.read_run_json(folder), "run_id": run_id, "status": "completed",
                                 "ready": False, "ready_reason": reason, "created_at": "2099-01-01T00:00:00+00:00"})
    registry_sync.rebuild()
    try:
        home = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=TIMEOUT).run()  # the latest run, by far
        assert f"Latest run **{run_id}** is completed but **not ready**: {reason}." in \
            "\n".join(w.value for w in home.warning)
        for page, key in (("app_pages/4_Inspect.py", "inspect_run"), ("app_pages/6_Review.py", "review_run")):
            at = open_page(page)
            at.sidebar.selectbox(key=key).set_value(run_id).run()
            assert not at.exception
            # One line in the sidebar, so that Device and Threshold stay in sight; the why in an expander.
            warnings = [w.value for w in at.sidebar.warning]
            assert len(warnings) == 1 and warnings[0].startswith("**Not ready:**") and len(warnings[0]) < 80, page
            why = next(e for e in at.sidebar.expander if e.label == "Why, and what to do")
            shown = "\n".join(m.value for m in why.markdown)
            assert reason in shown and "train longer" in shown, page
        at = open_page("app_pages/5_Runs.py")
        table = at.dataframe[0].value.set_index("run_id")
        assert table.loc[run_id, "ready"] == "no"
        at.selectbox(key="runs_lineage").set_value(run_id).run()
        assert reason in "\n".join(w.value for w in at.warning)
    finally:
        runs.delete_run(run_id)


def test_inspect_names_an_export_by_its_epoch_and_a_zero_area_rule_plainly(trained_run: str,
                                                                          restore_recipe: Path) -> None:
    from engine.export import export_run

    report = export_run(trained_run)
    # Nothing reaches a threshold of 1.0, and a tuned minimum area of 0 px is no area rule at all.
    save_recipe(restore_recipe, load_recipe(restore_recipe).with_overrides(threshold=1.0, min_region_px=0))
    at = open_page("app_pages/4_Inspect.py")
    at.sidebar.selectbox(key="inspect_run").set_value(trained_run).run()
    if len(at.sidebar.select_slider):
        first = at.sidebar.select_slider[0].options[0]
        at.sidebar.select_slider[0].set_value((first, first)).run()  # the slider says epoch 1 ...
    at.sidebar.radio(key="inspect_backend").set_value("onnx").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = texts(at)
    assert f"onnx export of epoch {report['epoch']}" in shown  # ... the answer names the exported epoch
    assert "no region at or above 1.00" in shown and "0 px" not in shown
