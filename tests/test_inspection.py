"""One verdict: every front end gives the same verdict, regions and mask as engine.inspection.inspect.

The image and recipe are chosen so that the minimum region area leaves at least one region out: the case
where front ends used to disagree (the blob "ok" in one place and "defect", or drawn, in another).
"""

from __future__ import annotations

import base64
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
from engine.inspection import Inspection, inspect
from engine.recipe import Recipe, save_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def case(tiny_dataset: Path) -> tuple[str, Path, Recipe, Inspection]:
    """A real run (fine-tuned from the shipped weights, so it finds several defects per image) whose recipe
    drops the smaller regions of one image."""
    from engine.train import TrainConfig, train

    run_id = train(TrainConfig(data=str(tiny_dataset), epochs=2, init="pretrained", crop=64, batch_size=8,
                               steps_per_epoch=8, name="one-verdict"))
    folder = runs.run_dir(run_id)
    predictor = Predictor(folder)
    for threshold in (0.5, 0.3, 0.2, 0.1, 0.05):
        for sample in scan_dataset(tiny_dataset, validate=False).samples:
            probability = predictor.predict_proba(read_image(sample.image_path))
            areas = sorted({r.area_px for r in inspect(probability, Recipe(threshold=threshold)).regions})
            if len(areas) >= 2:
                recipe = Recipe(threshold=threshold, min_region_px=areas[-1])  # only the largest region counts
                save_recipe(folder, recipe)
                expected = inspect(probability, recipe)
                assert expected.flagged and len(expected.regions) < len(inspect(probability, Recipe(threshold=threshold)).regions)
                return run_id, sample.image_path, recipe, expected
    pytest.skip("no image of the tiny set has two regions at any threshold")


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


def test_reviews_threshold_sweep_counts_verdicts_as_inspect_does(case, tiny_dataset: Path) -> None:
    """The sweep Review charts honours the minimum area: at the recipe's threshold it equals the verdicts."""
    run_id, _, recipe, _ = case
    samples = scan_dataset(tiny_dataset, validate=False).samples
    result = evaluate(Predictor(runs.run_dir(run_id)), samples, sweep=True)
    (row,) = [r for r in result["sweep"] if abs(r["threshold"] - recipe.threshold) < 1e-9]
    assert row["min_region_px"] == recipe.min_region_px
    assert row["detection_rate"] == pytest.approx(result["detection_rate"])
    assert row["false_alarm_rate"] == pytest.approx(result["false_alarm_rate"])
    assert row["dice"] == pytest.approx(result["dice"], abs=1e-6)
