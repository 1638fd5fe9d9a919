"""engine.inspector: the one way from an image to a verdict gives what predict + inspect give, and a recipe
rewritten on disk (as `tune` saves one) is used from the next call on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine import config
from engine.imageio import read_image
from engine.inference import Predictor
from engine.inspection import inspect
from engine.inspector import Inspector, current_recipe, recipe_version
from engine.recipe import RECIPE_FILE, Recipe, load_recipe
from engine.storage import atomic_write_json, file_version


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A copy of the shipped demo run (its recipe gets rewritten here)."""
    folder = tmp_path / "demo"
    shutil.copytree(config.ROOT / "runs" / "demo", folder, ignore=shutil.ignore_patterns("export", "*.log"))
    return folder


def images(run_dir: Path) -> list[np.ndarray]:
    """The demo's check images."""
    return [read_image(path) for path in sorted((run_dir / "check" / "images").glob("*.png"))[:4]]


def test_the_inspector_gives_the_verdict_of_predict_and_inspect(demo: Path) -> None:
    predictor = Predictor(demo)
    inspector = Inspector(predictor)
    verdicts = set()
    for image in images(demo):
        for threshold, overrides in ((None, {}), (0.3, {"min_region_px": 5})):
            rules = load_recipe(demo).with_overrides(threshold=threshold, **overrides)
            direct = inspect(predictor.predict(image, rules.threshold).probability, rules)
            prediction, inspection = inspector.inspect(image, threshold, **overrides)
            assert inspection.as_dict() == direct.as_dict()
            assert np.array_equal(inspection.mask, direct.mask)
            assert prediction.threshold == rules.threshold and inspection.recipe == rules
            assert set(prediction.timings_ms) == {"inference", "inspect"}
            assert inspect(prediction.probability, inspector.recipe(threshold=threshold, **overrides)
                                     ).as_dict() == direct.as_dict()
            verdicts.add(inspection.verdict)
    assert verdicts == {"ok", "defect"}  # both verdicts were compared
    given = Recipe(threshold=0.9, min_region_px=1)  # a recipe passed in (the batch's) is used as it is
    assert inspector.inspect(images(demo)[0], recipe=given)[1].recipe is given


def test_a_recipe_rewritten_on_disk_is_used_on_the_next_call(demo: Path) -> None:
    inspector = Inspector(Predictor(demo))
    image = next(image for image in images(demo) if inspector.inspect(image)[1].verdict == "defect")
    strict = {**load_recipe(demo).as_dict(), "min_region_px": 10**9, "source": "manual"}
    atomic_write_json(demo / RECIPE_FILE, strict)  # as save_recipe writes it
    assert inspector.inspect(image)[1].verdict == "ok"
    assert inspector.recipe().min_region_px == 10**9
    (demo / RECIPE_FILE).write_text(json.dumps({**strict, "min_region_px": 1}))  # rewritten in place
    assert inspector.inspect(image)[1].recipe.min_region_px == 1
    (demo / RECIPE_FILE).unlink()  # no recipe: the run's threshold, no area rule
    assert inspector.recipe() == load_recipe(demo) and inspector.recipe().source == "default"


def test_one_key_tells_a_rewritten_file(demo: Path) -> None:
    path = demo / RECIPE_FILE
    before = file_version(path)
    assert file_version(path) == before and recipe_version(demo) == ("recipe", before)
    atomic_write_json(path, load_recipe(demo).as_dict())
    assert file_version(path) != before  # same content, new file
    recipe = current_recipe(demo)
    recipe.threshold = 0.01  # a caller changing its copy does not change the cached recipe
    assert current_recipe(demo).threshold == load_recipe(demo).threshold
    path.unlink()
    assert recipe_version(demo) == ("default", file_version(demo / "run.json"))
    with pytest.raises(FileNotFoundError):
        file_version(path)
