"""One verdict: every front end gives the same verdict, regions and mask as engine.inspection.inspect.

The image and recipe are chosen so that the minimum region area leaves at least one region out: the case
where front ends used to disagree (the blob "ok" in one place and "defect", or drawn, in another).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

from api.main import create_app
from engine import runs
from engine.__main__ import main
from engine.data import scan_dataset
from engine.evaluate import evaluate
from engine.imageio import read_image, read_mask
from engine.inference import Predictor
from engine.inspection import Inspection, inspect, why_counted
from engine.recipe import Recipe, save_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path) -> str:
    """A real run, fine-tuned from the shipped weights, so it finds several defects per image."""
    from engine.train import TrainConfig, train

    return train(TrainConfig(data=str(tiny_dataset), epochs=2, init="pretrained", crop=64, batch_size=8,
                             steps_per_epoch=8, name="one-verdict"))


def recipe_that_leaves_one_out(probability: np.ndarray, threshold: float, rule: str) -> Recipe | None:
    """A recipe under which some region of the map counts and another does not: by minimum area alone ("min-area":
    only the largest counts, its mask outlined down to half the threshold), or by the sure tier ("sure-tier": a
    smaller region the model is surer of counts, a larger fainter one does not), or None where the map has no such
    regions."""
    regions = inspect(probability, Recipe(threshold=threshold)).regions
    if rule == "min-area":
        areas = sorted({r.area_px for r in regions})
        # outlined too: every front end must draw the counted region grown down to the outline threshold
        return (Recipe(threshold=threshold, min_region_px=areas[-1], outline_threshold=threshold / 2)
                if len(areas) >= 2 else None)
    for large in regions:  # largest first; no region reaches the minimum area, so only sure ones count
        small = [r for r in regions if r.area_px < large.area_px and r.max_score > large.max_score]
        if small:  # the sure score midway below the small region's peak, away from float noise between backends
            below = max(r.max_score for r in regions if r.max_score < small[0].max_score)
            if small[0].max_score - below > 1e-3:
                return Recipe(threshold=threshold, min_region_px=regions[0].area_px + 1,
                              sure_score=(small[0].max_score + below) / 2, sure_min_px=1)
    return None


@pytest.fixture(scope="module", params=["min-area", "sure-tier"])
def case(request: pytest.FixtureRequest, trained: str, tiny_dataset: Path) -> tuple[str, Path, Recipe, Inspection]:
    """The run, with a recipe that drops some regions of one image and counts others: by minimum area, or a small
    sure region counted below the minimum area while a larger faint one is not."""
    folder = runs.run_dir(trained)
    predictor = Predictor(folder)
    for threshold in (0.5, 0.3, 0.2, 0.1, 0.05):
        for sample in scan_dataset(tiny_dataset, validate=False).samples:
            probability = predictor.predict_proba(read_image(sample.image_path))
            recipe = recipe_that_leaves_one_out(probability, threshold, request.param)
            if recipe is not None:
                save_recipe(folder, recipe)
                expected = inspect(probability, recipe)
                assert expected.flagged and len(expected.regions) < len(inspect(probability, Recipe(threshold=threshold)).regions)
                if request.param == "sure-tier":  # the region that counts is below the minimum area
                    assert all(r.area_px < recipe.min_region_px for r in expected.regions)
                return trained, sample.image_path, recipe, expected
    pytest.skip(f"no image of the tiny set has regions that the {request.param} rule tells apart")


def boxes(regions: list) -> list[list[int]]:
    """The bounding boxes of regions given as objects or as the API's dicts."""
    return [r["bbox"] if isinstance(r, dict) else r.bbox for r in regions]


def test_the_api_answers_the_same_verdict_regions_and_mask(case, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id, image_path, _, expected = case
    monkeypatch.setenv("DEFECTS_API_RUN", run_id)
    with TestClient(create_app()) as client:
        body = client.post("/predict", files={"file": (image_path.name, image_path.read_bytes())},
                           params={"return_mask": "true", "backend": "torch"}).json()
    assert body["verdict"] == expected.verdict and boxes(body["regions"]) == boxes(expected.regions)
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask > 0, expected.mask > 0)


def test_cli_predict_writes_the_same_verdict_regions_and_mask(case, tmp_path: Path, capsys) -> None:
    run_id, image_path, _, expected = case
    assert main(["predict", "--run", run_id, "--backend", "torch", str(image_path), "--out", str(tmp_path / "out")]) == 0
    (result,) = json.loads((tmp_path / "out" / "report.json").read_text())["results"]
    assert result["verdict"] == expected.verdict and boxes(result["regions"]) == boxes(expected.regions)
    assert np.array_equal(read_mask(tmp_path / "out" / result["mask"]) > 0, expected.mask > 0)


def test_evaluate_counts_the_same_verdict_and_mask(case) -> None:
    run_id, image_path, recipe, expected = case
    sample = next(s for s in scan_dataset(image_path.parent.parent, validate=False).samples
                  if s.image_path == image_path)
    (row,) = evaluate(Predictor(runs.run_dir(run_id)), [sample])["per_image"]
    assert row["flagged"] == expected.flagged
    truth = read_mask(sample.mask_path) > 0 if sample.mask_path else np.zeros(expected.mask.shape, bool)
    assert row["false_positive_px"] == int(np.logical_and(expected.mask > 0, ~truth).sum())


def test_the_inspect_page_shows_the_same_verdict_and_regions(case) -> None:
    run_id, image_path, _, expected = case
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    at.switch_page("app_pages/4_Inspect.py").run()
    at.sidebar.selectbox(key="inspect_run").set_value(run_id).run()
    at.selectbox(key="inspect_folder").set_value(image_path.parent.parent.name).run()
    at.selectbox(key="inspect_sample").set_value(image_path.stem).run()
    assert not at.exception, [e.value for e in at.exception]
    shown = "\n".join(str(m.value) for m in at.markdown)
    assert f"**Verdict: {expected.verdict}**" in shown
    assert f"{len(expected.regions)} region(s)" in shown
    (table,) = at.table  # each counted region says why it counts: "14 px at peak 0.93 (peak at or above ...)"
    assert table.value["counted"].tolist()[: len(expected.regions)] == [why_counted(r, expected.recipe)
                                                                        for r in expected.regions][:len(table.value)]


def test_reviews_threshold_sweep_counts_verdicts_as_inspect_does(case, tiny_dataset: Path) -> None:
    """The sweep Review charts honours the minimum area: at the recipe's threshold it equals the verdicts (its Dice
    is the regions' at the threshold, before an outline grows them)."""
    run_id, _, recipe, _ = case
    samples = scan_dataset(tiny_dataset, validate=False).samples
    result = evaluate(Predictor(runs.run_dir(run_id)), samples, sweep=True)
    (row,) = [r for r in result["sweep"] if abs(r["threshold"] - recipe.threshold) < 1e-9]
    assert row["min_region_px"] == recipe.min_region_px
    assert row["detection_rate"] == pytest.approx(result["detection_rate"])
    assert row["false_alarm_rate"] == pytest.approx(result["false_alarm_rate"])
    plain = evaluate(Predictor(runs.run_dir(run_id)), samples, recipe=dataclasses.replace(recipe, outline_threshold=None))
    assert plain["detection_rate"] == result["detection_rate"] and plain["n_false_alarms"] == result["n_false_alarms"]
    assert row["dice"] == pytest.approx(plain["dice"], abs=1e-6)
