"""Accuracy gates where the model is served: quantization that cannot saturate on AVX2, the CPU flags each gate ran
under, the re-check on a CPU with other flags, and refusing a backend named explicitly whose gate failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper

from api.main import create_app
from api.settings import Settings
from engine import config, export, gates, runs, serving
from engine.__main__ import main
from engine.cpuflags import cpu_flags
from engine.data import scan_dataset
from engine.errors import GateFailed

MakeRun = Callable[[str], Path]


@pytest.fixture(scope="module")
def exported(trained_run: str) -> dict:
    """The trained fixture run exported to fp32 ONNX and INT8 with the default gate."""
    return export.export_run(trained_run, int8=True)


@pytest.fixture
def make_run(copy_run: MakeRun, exported: dict) -> MakeRun:
    """Copies of the exported fixture run under new ids (tests edit their report.json); removed afterwards."""
    return copy_run


def edit_report(folder: Path, change: Callable[[dict], None]) -> None:
    """Apply change to the run's export/report.json."""
    path = folder / "export" / "report.json"
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))


def fake_flags(report: dict, flags: list[str]) -> None:
    """Record every gate as run on a CPU with these flags."""
    for gate in report["gates"].values():
        gate["cpu_flags"] = flags


def image_bytes(tiny_dataset: Path) -> bytes:
    """A real image of the tiny dataset, as uploaded."""
    return scan_dataset(tiny_dataset).samples[0].image_path.read_bytes()


def test_int8_cannot_saturate_on_avx2_and_its_options_are_recorded(trained_run: str, exported: dict) -> None:
    # On AVX2 without VNNI, ONNX Runtime's U8S8 kernels add two u8 x s8 products in 16 bits (VPMADDUBSW).
    # With 7-bit weights (reduce_range) no pair of weights can reach the limit: 255 x (|w1| + |w2|) <= 32767.
    folder = runs.run_dir(trained_run)
    settings = next(a for a in exported["artifacts"] if a["kind"] == "int8")["metrics"]["quantization"]
    assert settings == {**settings, **export.QUANTIZATION} and settings["reduce_range"] is True
    weights = [numpy_helper.to_array(t).astype(np.int32).reshape(t.dims[0], -1)
               for t in onnx.load(str(folder / "export" / "model.int8.onnx")).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights, "no int8 convolution weights in the INT8 file"
    worst = max(int((np.abs(w[:, :-1]) + np.abs(w[:, 1:])).max()) for w in weights if w.shape[1] > 1)
    assert 255 * worst <= 32767, worst
    assert exported["gate"]["accepted"], exported["gate"]["message"]
    saved = json.loads((folder / "export" / "report.json").read_text())
    assert saved["cpu_flags"] == cpu_flags()
    assert all(gate["cpu_flags"] == cpu_flags() and gate["max_dice_drop"] == export.MAX_DICE_DROP
               for gate in saved["gates"].values())


def test_a_gate_run_under_other_flags_is_rechecked_once_and_cached(make_run: MakeRun,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_run("gates-recheck")
    edit_report(folder, lambda r: fake_flags(r, ["avx2"]))  # exported on an AVX2-only CPU
    calls: list[list[str]] = []
    real = gates.recheck
    monkeypatch.setattr(gates, "recheck", lambda *a: calls.append(list(a[2])) or real(*a))

    found = serving.backend_verdicts(folder)
    assert calls == [[name for name in found if name != "onnx"]] and "int8" in found
    assert all(v.accepted and v.rechecked and "re-checked on this CPU" in v.reason and "exported on avx2" in v.reason
               for name, v in found.items() if name != "onnx")
    cached = next((folder / "export").glob(f"{gates.RECHECK_PREFIX}*.json"))
    stored = json.loads(cached.read_text())
    assert stored["cpu_flags"] == cpu_flags() and stored["backends"]["int8"]["accepted"]
    assert stored["backends"]["int8"]["n_images"] > 0

    serving.backend_verdicts(folder)  # once per process and export ...
    gates._memory.clear()
    assert serving.backend_verdicts(folder) == found  # ... and read back from the file in a new process
    assert len(calls) == 1
    assert "int8" in serving.gated_backends(folder)

    export.export_run("gates-recheck")  # a new export replaces the re-checks of the old files
    assert not list((folder / "export").glob(f"{gates.RECHECK_PREFIX}*.json"))


def test_a_failed_recheck_is_refused_with_the_reason_on_health(make_run: MakeRun, tiny_dataset: Path) -> None:
    folder = make_run("gates-fail")

    def exported_elsewhere_with_a_strict_int8_gate(report: dict) -> None:
        fake_flags(report, ["avx2"])
        report["gates"]["int8"]["max_dice_drop"] = -1.0  # a gate no model passes: the re-check fails for real

    edit_report(folder, exported_elsewhere_with_a_strict_int8_gate)
    with TestClient(create_app(Settings(default_run="gates-fail"))) as client:
        health = client.get("/health").json()
        choice = health["backend_choice"]
        assert choice["backend"] != "int8" and choice["backend"] in serving.gated_backends(folder)
        assert "int8" not in choice["p50_ms"]
        assert "failed its accuracy gate" in choice["refused"]["int8"] and "> -1.0" in choice["refused"]["int8"]
        assert choice["p50_ms"].get(choice["backend"], 0) <= choice["p50_ms"].get("onnx", float("inf"))

        refused = client.post("/predict?backend=int8", files={"file": ("a.png", image_bytes(tiny_dataset), "image/png")})
        assert refused.status_code == 409
        detail = refused.json()["detail"]
        assert "int8" in detail and "drop" in detail and f"serves {choice['backend']} instead" in detail
        served = client.post("/predict", files={"file": ("a.png", image_bytes(tiny_dataset), "image/png")})
        assert served.status_code == 200 and served.json()["model"]["backend"] == choice["backend"]


def test_an_int8_the_gate_rejected_is_refused_by_the_api_predict_and_evaluate(
        make_run: MakeRun, tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_run("gates-rejected")
    assert main(["export", "--run", "gates-rejected", "--int8", "--max-dice-drop", "-1"]) == 0
    out = capsys.readouterr().out
    instead = serving.auto_backend(folder).backend  # timed by the export, in this process: the same pick
    assert instead != "int8" and "INT8 REJECTED" in out and f"`auto` serves {instead} instead" in out
    assert "ms p50" in out and not (folder / "export" / "model.int8.onnx").exists()

    with TestClient(create_app(Settings())) as client:
        response = client.post("/predict?run=gates-rejected&backend=int8",
                               files={"file": ("a.png", image_bytes(tiny_dataset), "image/png")})
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "INT8 REJECTED" in detail and "drop" in detail and "> -1" in detail and f"serves {instead} instead" in detail
    assert "ms p50" in detail

    image = scan_dataset(tiny_dataset).samples[0].image_path
    for command in (["predict", str(image)], ["evaluate", "--data", str(tiny_dataset), "--split", "all"]):
        assert main([*command, "--run", "gates-rejected", "--backend", "int8"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: backend int8 is not served") and "REJECTED" in err
    with pytest.raises(GateFailed):
        serving.open_predictor("gates-rejected", backend="openvino-int8")
    assert main(["predict", str(image), "--run", "gates-rejected", "--backend", "onnx", "--json"]) == 0


def test_a_backend_named_by_the_operator_that_failed_is_refused(make_run: MakeRun, tiny_dataset: Path) -> None:
    folder = make_run("gates-operator")
    edit_report(folder, lambda r: r["gates"]["int8"].update(accepted=False, dice_drop=0.05, val_dice=0.5))
    assert "int8" not in serving.gated_backends(folder)
    with TestClient(create_app(Settings(default_run="gates-operator", default_backend="int8"))) as client:
        response = client.post("/predict", files={"file": ("a.png", image_bytes(tiny_dataset), "image/png")})
        assert response.status_code == 409 and "failed its accuracy gate at export" in response.json()["detail"]
        assert "+0.0500 > 0.01" in response.json()["detail"]
        assert client.get("/health").status_code == 200


def test_bench_names_the_cpu_and_times_only_what_may_serve(make_run: MakeRun, capsys: pytest.CaptureFixture) -> None:
    folder = make_run("gates-bench")
    edit_report(folder, lambda r: r["gates"]["int8"].update(accepted=False, dice_drop=0.05, val_dice=0.5))
    assert main(["bench", "--run", "gates-bench", "--iterations", "2", "--warmup", "1", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert f"({' '.join(cpu_flags())})" in out and "Not served on this CPU, so not timed: int8 failed" in out
    assert "| int8 |" not in out and "| onnx |" in out


@pytest.mark.skipif(not serving.openvino_available(), reason="openvino is not installed here")
def test_openvino_writes_nothing_under_the_home_folder(trained_run: str, exported: dict, tmp_path: Path) -> None:
    script = ("import numpy as np; from engine import runs; from engine.inference import Predictor; "
              f"Predictor(runs.run_dir({trained_run!r}), backend='openvino').predict_proba(np.zeros((32, 32), 'f4'))")
    env = {**os.environ, "HOME": str(tmp_path), "DEFECTS_RUNS_DIR": str(config.RUNS_DIR)}
    subprocess.run([sys.executable, "-c", script], cwd=config.ROOT, env=env, check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_a_backend_that_does_not_run_on_this_cpu_is_refused_alone(make_run: MakeRun) -> None:
    folder = make_run("gates-broken")
    edit_report(folder, lambda r: fake_flags(r, ["avx2"]))
    int8 = folder / "export" / "model.int8.onnx"
    int8.write_bytes(int8.read_bytes()[:1000])  # as a file no runtime here can load
    found = serving.backend_verdicts(folder)
    assert not found["int8"].accepted and "does not run here" in found["int8"].reason
    assert all(v.accepted for name, v in found.items() if not name.endswith("int8")), found
    assert serving.auto_backend(folder).backend in serving.gated_backends(folder)
    assert "does not run here" in serving.auto_backend(folder).refused["int8"]


@pytest.mark.skipif(not serving.openvino_available(), reason="openvino is not installed here")
def test_on_openvinos_avx2_path_the_int8_file_keeps_its_gate(make_run: MakeRun) -> None:
    # OpenVINO's CPU kernels honour ONEDNN_MAX_CPU_ISA, so its AVX2-only path can be taken on any x86 CPU (ONNX
    # Runtime has no such switch; its AVX2 path is covered by the weight-pair check above). With the export's flags
    # faked, the process re-checks every backend on that path.
    folder = make_run("gates-avx2")
    edit_report(folder, lambda r: fake_flags(r, ["avx2"]))
    script = ("import json, sys; from pathlib import Path; from engine import serving; "
              "found = serving.backend_verdicts(Path(sys.argv[1])); "
              "print(json.dumps({name: [v.accepted, v.reason] for name, v in found.items()}))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=config.ROOT, env=env, check=True,
                          timeout=300, capture_output=True, text=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["openvino-int8"][0] and found["int8"][0] and found["openvino"][0], found
    assert "re-checked on this CPU" in found["openvino-int8"][1]
    accepted, reason = found["openvino-bf16"]  # no bf16 kernels on AVX2: refused as not running, or passed
    assert accepted or "does not run here" in reason, reason
