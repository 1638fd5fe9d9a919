"""OpenVINO backends: the exported ONNX files read as they are, parity with ONNX Runtime, every precision behind the
accuracy gate, `auto` picking the fastest gated backend, and the API and `predict` serving it by default."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from engine import config, export, inference, registry, runs, serving
from engine.__main__ import main
from engine.data import load_pair, scan_dataset
from engine.errors import EngineError
from engine.inference import Predictor, openvino_available
from engine.metrics import dice_score

needs_openvino = pytest.mark.skipif(not openvino_available(),
                                    reason="openvino is not installed here (`pip install openvino`)")


@pytest.fixture(scope="module")
def exported(trained_run: str) -> dict:
    """The trained fixture run exported to fp32 ONNX and INT8, with the OpenVINO gates where it is installed."""
    return export.export_run(trained_run, int8=True)


@pytest.fixture
def run_copy(trained_run: str, exported: dict) -> Iterator[Path]:
    """A copy of the exported run under its own id, removed afterwards."""
    target = config.RUNS_DIR / "openvino-copy"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(runs.run_dir(trained_run), target)
    runs.write_run_json(target, {**runs.read_run_json(target), "run_id": target.name})
    yield target
    shutil.rmtree(target, ignore_errors=True)
    registry.delete_run(target.name)


def images(dataset: Path, count: int = 4) -> list[np.ndarray]:
    """The first images of a dataset."""
    return [load_pair(s)[0] for s in scan_dataset(dataset).samples[:count]]


@needs_openvino
def test_openvino_reads_the_exported_files_with_onnx_runtime_parity(trained_run: str, tiny_dataset: Path,
                                                                   exported: dict) -> None:
    folder = runs.run_dir(trained_run)
    pictures = images(tiny_dataset)
    large = cv2.resize(pictures[0], (1300, 1100), interpolation=cv2.INTER_LINEAR)  # tiled, with several shapes
    pairs = {"openvino": ("onnx", export.PARITY_TOLERANCE), "openvino-int8": ("int8", 0.05),
             "openvino-bf16": ("onnx", 0.05)}
    for backend, (reference_backend, tolerance) in pairs.items():
        candidate, reference = Predictor(folder, backend=backend), Predictor(folder, backend=reference_backend)
        assert candidate.path == reference.path  # the very same file, no export step of its own
        assert (candidate.mean, candidate.std, candidate.threshold) == (reference.mean, reference.std,
                                                                        reference.threshold)
        for picture in [*pictures, large, pictures[0][:45, :61]]:
            ours, theirs = candidate.predict_proba(picture), reference.predict_proba(picture)
            assert ours.shape == picture.shape[:2]
            assert float(np.abs(ours - theirs).max()) <= tolerance, backend
            agreement = float(((ours >= 0.5) == (theirs >= 0.5)).mean())
            assert agreement >= 0.999, (backend, agreement)


@needs_openvino
def test_export_gates_every_openvino_precision(trained_run: str, exported: dict, capsys) -> None:
    gates = exported["gates"]
    assert {"onnx", "openvino", "openvino-bf16"} <= set(gates)
    assert ("openvino-int8" in gates) == gates["int8"]["accepted"]
    for name, gate in gates.items():
        assert gate["accepted"] == (gate["dice_drop"] <= export.MAX_DICE_DROP), name
        assert gate["dice_drop"] == pytest.approx(gates["onnx"]["val_dice"] - gate["val_dice"])
    assert gates["openvino"]["dice_drop"] == pytest.approx(0.0, abs=1e-3)  # fp32 on the same file
    saved = json.loads((runs.run_dir(trained_run) / "export" / "report.json").read_text())
    assert saved["gates"] == json.loads(json.dumps(gates))
    assert "openvino-bf16" in export.format_report(saved)


@needs_openvino
def test_auto_picks_the_fastest_gated_backend_and_remembers(run_copy: Path) -> None:
    gated = serving.gated_backends(run_copy)
    assert {"onnx", "openvino", "openvino-bf16"} <= set(gated)
    choice = serving.auto_backend(run_copy)
    assert set(choice.p50_ms) == set(gated) and choice.backend in gated
    fastest = min(choice.p50_ms.values())
    assert choice.p50_ms[choice.backend] <= fastest * (1 + serving.AUTO_MARGIN)
    more_exact = gated[: gated.index(choice.backend)]  # each of these was slower than the margin allows
    assert all(choice.p50_ms[name] > fastest * (1 + serving.AUTO_MARGIN) for name in more_exact)
    assert serving.auto_backend(run_copy, measure=False) is choice  # timed once per export and process
    assert serving.default_backend(run_copy) == choice.backend

    # A backend that failed its gate is never a candidate: here every one but onnx.
    report_path = run_copy / "export" / "report.json"
    report = json.loads(report_path.read_text())
    report["gates"] = {name: {**gate, "accepted": name == "onnx"} for name, gate in report["gates"].items()}
    report_path.write_text(json.dumps(report))
    assert serving.gated_backends(run_copy) == ["onnx"]
    assert serving.auto_backend(run_copy).backend == "onnx"


@needs_openvino
def test_the_api_and_predict_serve_auto_by_default(trained_run: str, tiny_dataset: Path, exported: dict,
                                                   capsys) -> None:
    folder = runs.run_dir(trained_run)
    picked = serving.auto_backend(folder).backend
    with TestClient(create_app(Settings(default_run=trained_run))) as client:
        health = client.get("/health").json()
        assert health["model"]["backend"] == health["backend_choice"]["backend"] == picked
        assert set(health["backend_choice"]["p50_ms"]) == set(serving.gated_backends(folder))
        image_path = scan_dataset(tiny_dataset).samples[0].image_path
        answer = client.post("/predict", files={"file": ("a.png", image_path.read_bytes(), "image/png")}).json()
        assert answer["model"]["backend"] == picked
        for backend in ("openvino", "openvino-bf16", "openvino-int8"):
            named = client.post(f"/predict?backend={backend}",
                                files={"file": ("a.png", image_path.read_bytes(), "image/png")})
            assert named.status_code == 200 and named.json()["model"]["backend"] == backend

    assert main(["predict", "--run", trained_run, str(image_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"]["backend"] == picked


@needs_openvino
def test_openvino_and_onnx_runtime_give_the_same_test_dice(trained_run: str, tiny_dataset: Path,
                                                           exported: dict) -> None:
    folder = runs.run_dir(trained_run)
    samples = scan_dataset(tiny_dataset).samples
    for backend, reference in (("openvino", "onnx"), ("openvino-int8", "int8")):
        ours, theirs = Predictor(folder, backend=backend), Predictor(folder, backend=reference)
        scores = [(dice_score(ours.predict(load_pair(s)[0]).mask, load_pair(s)[1] > 0),
                   dice_score(theirs.predict(load_pair(s)[0]).mask, load_pair(s)[1] > 0)) for s in samples[:12]]
        mean_ours, mean_theirs = np.mean([a for a, _ in scores]), np.mean([b for _, b in scores])
        assert abs(mean_ours - mean_theirs) <= 0.01, backend


def test_without_openvino_its_backends_are_absent_and_asking_for_one_says_why(
        trained_run: str, exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = runs.run_dir(trained_run)
    monkeypatch.setattr(inference, "openvino_available", lambda: False)
    monkeypatch.setattr(serving, "openvino_available", lambda: False)
    inference.openvino_model.cache_clear()
    assert not any(name.startswith("openvino") for name in serving.available_backends(folder))
    assert not any(name.startswith("openvino") for name in serving.gated_backends(folder))
    with pytest.raises(EngineError, match="need the openvino package"):
        Predictor(folder, backend="openvino")
    inference.openvino_model.cache_clear()
