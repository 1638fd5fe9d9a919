"""The Export page through AppTest: a real export and benchmark of the trained fixture run, and a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine import config, registry, runs

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # export, INT8 calibration, the accuracy gate and a benchmark on a busy 2-core machine


def open_export_page() -> AppTest:
    """Start at Home as a user does, then switch to the Export page."""
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("app_pages/3_Export.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_export_page_exports_then_shows_the_table_chart_and_downloads(trained_run: str) -> None:
    at = open_export_page()
    at.selectbox(key="export_run").set_value(trained_run)
    at.selectbox(key="export_epoch").set_value("best")
    at.checkbox(key="export_int8").check()
    at.number_input(key="export_rounds").set_value(5)
    at.run()
    # The fixture's validation (2 good, 2 defective images) cannot vouch for it: said before anything is exported.
    reason = runs.read_run_json(runs.run_dir(trained_run))["ready_reason"]
    assert any(w.value.startswith(f"**Not ready:** {reason}") for w in at.warning), [w.value for w in at.warning]
    at.button(key="export_button").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]

    folder = runs.run_dir(trained_run)
    assert (folder / "export" / "model.onnx").is_file()
    # The bar's last state is what report.json on disk says (issue 39: "done" at 60 % beside "not exported yet").
    written = json.loads((folder / "export" / "report.json").read_text())
    bar = at.get("progress")[0].proto
    assert bar.value == 100 and f"epoch {written['epoch']} exported at {written['created_at']}" in bar.text, bar.text
    assert "not been exported yet" not in "\n".join(c.value for c in at.caption)
    tables = [d.value for d in at.dataframe]
    table = next(t for t in tables if "backend" in t.columns)  # the benchmark
    files = next(t for t in tables if "kind" in t.columns)  # what is exported now
    assert set(files["kind"]) >= {"onnx", "int8"}
    assert {"torch-cpu", "onnx"} <= set(table["backend"])
    assert (table["p50 (ms)"] > 0).all() and table["test Dice"].between(0, 1).all()
    assert at.get("plotly_chart"), "no chart"
    messages = [m.value for m in [*at.success, *at.warning]]
    assert any("ONNX fp32 written" in m for m in messages)
    assert any("INT8" in m for m in messages)  # accepted (success) or rejected (warning), said either way
    kinds = {a.kind for a in registry.list_artifacts(trained_run)}
    assert {"onnx", "int8"} <= kinds
    labels = [b.proto.label for b in at.get("download_button")]
    assert any("model.onnx" in label for label in labels)
    assert ("model.int8.onnx" in " ".join(labels)) == (folder / "export" / "model.int8.onnx").is_file()


def test_export_page_exports_a_run_whose_dataset_moved_and_says_so(trained_run: str) -> None:
    broken = config.RUNS_DIR / "page-no-dataset"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(runs.run_dir(trained_run), broken)
    info = runs.read_run_json(broken)
    runs.write_run_json(broken, {**info, "run_id": broken.name,
                                 "dataset": {**info["dataset"], "path": str(broken / "moved-away")}})
    try:
        at = open_export_page()
        at.selectbox(key="export_run").set_value(broken.name).run()
        at.button(key="export_button").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]  # a moved dataset no longer stops an export ...
        warnings = [w.value for w in at.warning]  # ... but the page says what the checks ran on
        assert any("moved-away not found" in w and "generated images" in w and "--data DIR" in w for w in warnings)
    finally:
        shutil.rmtree(broken, ignore_errors=True)
