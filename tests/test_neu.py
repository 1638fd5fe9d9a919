"""The real NEU-Seg steel images (../shared/data/neu_seg) read through the dataset code; skipped when absent."""

from pathlib import Path

import pytest

from engine.config import ROOT
from engine.data import load_pair, scan_dataset
from engine.evaluate import evaluate
from engine.inference import Predictor

NEU = ROOT.parent / "shared" / "data" / "neu_seg"
pytestmark = pytest.mark.skipif(not (NEU / "images").is_dir(), reason=f"NEU-Seg not present at {NEU}")


def test_neu_splits_come_from_its_meta_csv() -> None:
    report = scan_dataset(NEU, validate=False)
    counts = report.counts()
    assert (counts["train"], counts["val"], counts["test"]) == (2139, 559, 303)
    assert counts["defect_free"] == 0
    image, mask = load_pair(report.split("test")[0])
    assert image.shape == mask.shape == (200, 200) and mask.any()


def test_a_model_runs_on_real_steel_at_its_own_size() -> None:
    samples = scan_dataset(NEU, validate=False).split("test")[:12]
    result = evaluate(Predictor.from_run("demo"), samples)
    assert result["n_images"] == 12 and 0.0 <= result["dice"] <= 1.0
    assert set(result["per_type"]) <= {"inclusion", "patches", "scratches"}
    assert all(Path(s.image_path).suffix == ".png" for s in samples)
