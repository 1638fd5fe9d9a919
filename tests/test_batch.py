"""Batch inspection: outputs and reports, resuming an interrupted batch, CLI behaviour."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from engine import batch, readiness, recipe, runs
from engine.__main__ import main
from engine.errors import EngineError
from engine.inference import Predictor


@pytest.fixture(scope="module")
def predictor(trained_run: str) -> Predictor:
    """The fixture run's model."""
    return Predictor.from_run(trained_run)


@pytest.fixture
def inputs(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A folder of 5 real images (one in a subfolder with a clashing name) and one corrupt file."""
    folder = tmp_path / "in"
    (folder / "line2").mkdir(parents=True)
    images = sorted((tiny_dataset / "images").glob("*.png"))
    for path in images[:4]:
        shutil.copy(path, folder / path.name)
    shutil.copy(images[4], folder / "line2" / images[0].name)  # same file name as another input
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_batch_writes_outputs_and_reports(predictor: Predictor, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rules = recipe.Recipe(threshold=predictor.threshold, px_per_mm=5.0)
    result = batch.run_batch(predictor, [inputs], out, rules)
    assert result.counts() == {"images": 6, "ok": result.counts()["ok"], "defect": result.counts()["defect"],
                               "errors": 1}
    assert result.computed == 6 and result.reused == 0
    names = [r["name"] for r in result.results]
    assert len(set(names)) == 6 and "line2__" + sorted(p.stem for p in inputs.glob("*.png"))[0] in names
    good = [r for r in result.results if "error" not in r]
    for r in good:
        assert r["verdict"] in ("ok", "defect") and r["recipe"]["px_per_mm"] == 5.0
        assert (out / r["mask"]).is_file() and (out / r["overlay"]).is_file() and (out / r["thumb"]).is_file()
        assert set(r["timings_ms"]) >= {"read", "inference", "post", "write", "total"}
    broken = next(r for r in result.results if "error" in r)
    assert broken["name"] == "broken" and "not a readable" in broken["error"]
    with (out / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == names and rows[names.index("broken")]["verdict"] == "error"
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["images"] == 6 and report["model"]["run"] == predictor.run_id
    assert "fingerprint" not in report["results"][0]
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and "broken" in page
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_interrupted_batch_resumes_only_missing_images(predictor: Predictor, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rules = recipe.Recipe(threshold=predictor.threshold)
    first = batch.run_batch(predictor, [inputs], out, rules)
    assert first.computed == 6
    masks = {r["name"]: (out / r["mask"]).stat().st_mtime_ns for r in first.results if "mask" in r}

    again = batch.run_batch(predictor, [inputs], out, rules)
    assert (again.computed, again.reused) == (0, 6)

    # Drop one image's line (as if the batch had been killed before it) and tear the last line.
    lines = (out / "results.jsonl").read_text().splitlines()
    dropped = json.loads(lines[2])["name"]
    kept = lines[:2] + lines[3:]
    (out / "results.jsonl").write_text("\n".join(kept[:-1]) + "\n" + kept[-1][: len(kept[-1]) // 2])
    seen = []
    resumed = batch.run_batch(predictor, [inputs], out, rules, on_result=lambda r, reused: seen.append((r["name"], reused)))
    torn = json.loads(kept[-1])["name"]
    assert resumed.computed == 2 and resumed.reused == 4  # the dropped line and the torn one
    assert {name for name, reused in seen if not reused} == {dropped, torn}
    for name, before in masks.items():
        after = (out / f"masks/{name}.png").stat().st_mtime_ns
        assert (after != before) == (name in (dropped, torn))
    assert [json.loads(x)["name"] for x in (out / "results.jsonl").read_text().splitlines()] == [r["name"] for r in first.results]
    assert [r["verdict"] if "verdict" in r else r["error"] for r in resumed.results] == \
           [r["verdict"] if "verdict" in r else r["error"] for r in first.results]


def test_changed_recipe_or_image_is_recomputed(predictor: Predictor, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    batch.run_batch(predictor, [inputs], out, recipe.Recipe(threshold=0.5))
    assert batch.run_batch(predictor, [inputs], out, recipe.Recipe(threshold=0.6)).computed == 6
    changed = sorted(inputs.glob("*.png"))[0]
    shutil.copy(sorted(inputs.glob("*.png"))[1], changed)
    assert batch.run_batch(predictor, [inputs], out, recipe.Recipe(threshold=0.6)).computed == 1


def test_collect_inputs_skips_the_output_folder(inputs: Path) -> None:
    (inputs / "out" / "overlays").mkdir(parents=True)
    shutil.copy(next(inputs.glob("*.png")), inputs / "out" / "overlays" / "x.png")
    items = batch.collect_inputs([inputs], exclude=inputs / "out")
    assert len(items) == 6 and not any("out" in i.name for i in items)
    with pytest.raises(batch.EngineError, match="no such file"):
        batch.collect_inputs([inputs / "missing.png"])


def test_predict_cli(trained_run: str, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "--run", trained_run, str(inputs)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 5 and all(": ok" in line or ": defect" in line for line in lines)
    assert f"skipped: {inputs / 'broken.png'}: not a readable" in captured.err
    ready, reason = readiness.verdict(runs.read_run_json(runs.run_dir(trained_run)))
    assert not ready  # the fixture's validation (2 good, 2 defective images) is too small to vouch for it
    assert f"warning: run {trained_run} is not ready ({reason}); its verdicts are not validated" in captured.err

    out = tmp_path / "out"
    assert main(["predict", "--run", trained_run, str(inputs), "--out", str(out), "--min-region-px", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("6 images:") and "report.html" in last
    assert f"<b>Not ready:</b> {reason}." in (out / "report.html").read_text()  # the report says so too
    assert main(["predict", "--run", trained_run, str(inputs), "--out", str(out), "--min-region-px", "3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["reused"] == 6 and report["recipe"]["min_region_px"] == 3


def test_predict_cli_errors_are_one_line(trained_run: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "--run", trained_run, str(tmp_path / "nothing.png")]) == 2
    (tmp_path / "bad.png").write_bytes(b"junk")
    assert main(["predict", "--run", trained_run, str(tmp_path / "bad.png")]) == 2
    assert main(["predict", "--run", "no-such-run", str(tmp_path / "bad.png")]) == 2
    errors = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'nothing.png'}: no such file or folder",
                      "error: no image could be read",
                      "error: unknown run 'no-such-run'; list runs with `python -m engine runs`"]


def test_html_report_escapes_file_names_and_errors(predictor: Predictor, tiny_dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((tiny_dataset / "images").glob("*.png"))[0], folder / "<b>part&1.png")
    (folder / "<script>x.png").write_bytes(b"<script>alert(1)</script>")  # unreadable: its error row names it
    batch.run_batch(predictor, [folder], tmp_path / "out", recipe.Recipe(threshold=predictor.threshold))
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in page and "<b>part" not in page
    assert "&lt;script&gt;x" in page and "&lt;b&gt;part&amp;1" in page


def test_a_dataset_folder_is_never_an_output_folder(predictor: Predictor, inputs: Path, tiny_dataset: Path,
                                                     tmp_path: Path) -> None:
    labels = tmp_path / "labelled"
    shutil.copytree(tiny_dataset, labels)
    before = {p.name: p.read_bytes() for p in (labels / "masks").iterdir()}
    with pytest.raises(EngineError, match="holds a dataset"):
        batch.run_batch(predictor, [inputs], labels, recipe.Recipe())
    assert {p.name: p.read_bytes() for p in (labels / "masks").iterdir()} == before
    assert not (labels / batch.RESULTS_FILE).exists()
