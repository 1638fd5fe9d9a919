"""ONNX export, the INT8 accuracy gate, backends agreeing through the CLI, the benchmark, and bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine import bench, config, export, registry, registry_sync, runs
from engine.__main__ import main
from engine.data import load_pair, scan_dataset
from engine.errors import DatasetError, EngineError, RunNotFound
from engine.inference import Predictor
from engine.model import PRESETS, load_checkpoint

CopyRun = Callable[[str], Path]


def hidden_leftovers(folder: Path) -> list[str]:
    """Temp files or folders (dot names) left in an export folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def exported(trained_run: str) -> dict:
    """The trained fixture run exported to fp32 ONNX and INT8 with the default gate."""
    return export.export_run(trained_run, int8=True)


# ---------------------------------------------------------------------------------------- export


def test_export_round_trip_matches_torch_and_keeps_metadata(trained_run: str, tiny_dataset: Path,
                                                            exported: dict) -> None:
    folder = runs.run_dir(trained_run)
    path = folder / "export" / "model.onnx"
    proto = onnx.load(str(path))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)  # one file
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]

    # Metadata read back through the Predictor equals the checkpoint's.
    _, meta = load_checkpoint(folder / "best.pth")
    onnx_predictor = Predictor(folder, backend="onnx")
    assert onnx_predictor.meta["run_id"] == trained_run
    assert onnx_predictor.epoch == meta["epoch"] == exported["epoch"]
    assert onnx_predictor.threshold == pytest.approx(meta["threshold"])
    assert onnx_predictor.mean == pytest.approx(meta["normalisation"]["mean"])
    assert onnx_predictor.std == pytest.approx(meta["normalisation"]["std"])
    assert onnx_predictor.meta["in_channels"] == 1 and onnx_predictor.meta["stride"] == 4
    assert onnx_predictor.meta["train_crop"] == 32

    # Same probabilities as torch on real images, at the dataset size and at an odd size (padding).
    torch_predictor = Predictor(folder, backend="torch")
    for sample in scan_dataset(tiny_dataset).samples[:4]:
        image, _ = load_pair(sample)
        for picture in (image, image[:45, :61]):
            expected = torch_predictor.predict_proba(picture)
            actual = onnx_predictor.predict_proba(picture)
            assert actual.shape == picture.shape
            np.testing.assert_allclose(actual, expected, atol=1e-4)

    # Dynamic batch and spatial size in the graph itself.
    x = np.random.default_rng(0).standard_normal((3, 1, 24, 40)).astype(np.float32)
    model, _ = load_checkpoint(folder / "best.pth")
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    actual = onnx_predictor.forward_batch(x)  # probabilities: compare logits through the sigmoid
    expected = 1.0 / (1.0 + np.exp(-expected))
    np.testing.assert_allclose(actual, expected, atol=1e-3)

    entry = next(a for a in exported["artifacts"] if a["kind"] == "onnx")
    assert entry["accepted"] and entry["path"] == "export/model.onnx"
    assert entry["size_bytes"] == path.stat().st_size
    assert entry["metrics"]["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE
    assert entry["metrics"]["parity"]["mask_agreement"] > 0.999
    assert entry["metrics"]["latency_p50_ms"] > 0 and 0 <= entry["metrics"]["val_dice"] <= 1
    assert hidden_leftovers(folder / "export") == []


def test_int8_gate_accepts_and_everything_is_recorded(trained_run: str, exported: dict) -> None:
    folder = runs.run_dir(trained_run)
    gate = exported["gate"]
    assert gate["accepted"], gate["message"]
    assert gate["dice_drop"] == pytest.approx(gate["fp32_dice"] - gate["int8_dice"])
    assert gate["dice_drop"] <= 0.01 and "accepted" in gate["message"]
    int8_path = folder / "export" / "model.int8.onnx"
    assert int8_path.is_file()
    assert int8_path.stat().st_size < (folder / "export" / "model.onnx").stat().st_size

    proto = onnx.load(str(int8_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops  # static QDQ
    quantized = Predictor(folder, backend="int8")
    assert quantized.meta["format"] == "int8" and quantized.meta["quantization"]["per_channel"] is True
    assert quantized.epoch == exported["epoch"]
    # Faithful to the float model pixel by pixel, whatever the (tiny) model's Dice is.
    int8_parity = next(a for a in exported["artifacts"] if a["kind"] == "int8")["metrics"]["parity"]
    assert int8_parity["mean_abs_diff"] < 0.02 and int8_parity["mask_agreement"] > 0.98

    # report.json has the documented shape, and the registry (also rebuilt from it) has the same rows.
    report = json.loads((folder / "export" / "report.json").read_text())
    assert [a["kind"] for a in report["artifacts"]] == ["onnx", "int8"]
    for entry in report["artifacts"]:
        assert set(entry) >= {"kind", "path", "size_bytes", "accepted", "epoch", "metrics"}
    stored = {a.kind: a for a in registry.list_artifacts(trained_run)}
    assert stored["int8"].accepted and stored["int8"].size_bytes == int8_path.stat().st_size
    assert stored["int8"].metrics["val_dice"] == pytest.approx(gate["int8_dice"])
    registry_sync.rebuild()
    rebuilt = {a.kind: a for a in registry.list_artifacts(trained_run)}
    assert rebuilt["onnx"].path == str(folder / "export" / "model.onnx")
    assert rebuilt["int8"].accepted and rebuilt["int8"].metrics == stored["int8"].metrics


def test_int8_gate_rejects_and_does_not_keep_the_file(copy_run: CopyRun, exported: dict, capsys) -> None:
    run_id = "gate-reject"
    folder = copy_run(run_id)
    assert (folder / "export" / "model.int8.onnx").is_file()  # an earlier accepted INT8 ...
    code = main(["export", "--run", run_id, "--int8", "--max-dice-drop", "-1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "INT8 REJECTED" in out and "not kept" in out
    assert not (folder / "export" / "model.int8.onnx").exists()  # ... is not served any more
    assert (folder / "export" / "model.onnx").is_file()
    report = export.read_report(run_id)
    assert report["gate"]["accepted"] is False and report["gate"]["max_dice_drop"] == -1
    int8_entry = next(a for a in report["artifacts"] if a["kind"] == "int8")
    assert int8_entry["accepted"] is False and int8_entry["metrics"]["dice_drop"] > -1
    assert {a.kind: a.accepted for a in registry.list_artifacts(run_id) if a.kind != "recipe"} == {"onnx": True,
                                                                                           "int8": False}
    with pytest.raises(RunNotFound, match="no int8 export"):
        Predictor(folder, backend="int8")
    assert hidden_leftovers(folder / "export") == []


def test_export_of_another_epoch_retires_the_old_int8(copy_run: CopyRun, exported: dict) -> None:
    folder = copy_run("other-epoch")
    old_epoch = exported["epoch"]
    other = next(e for e in runs.epochs_saved(folder) if e != old_epoch)
    report = export.export_run("other-epoch", epoch=other)
    assert Predictor(folder, backend="onnx").epoch == other == report["epoch"]
    assert not (folder / "export" / "model.int8.onnx").exists()  # it belonged to the other epoch
    assert [a["kind"] for a in report["artifacts"]] == ["onnx"]
    stored = {(a.kind, a.epoch): a for a in registry.list_artifacts("other-epoch")}
    assert stored[("onnx", other)].accepted
    assert not stored[("int8", old_epoch)].accepted and "removed" in stored[("int8", old_epoch)].metrics

    export.export_run("other-epoch", epoch=other, int8=True)
    export.export_run("other-epoch", epoch=other)  # fp32 again, same epoch: the INT8 model stays
    assert Predictor(folder, backend="int8").epoch == other
    kinds = [a["kind"] for a in export.read_report("other-epoch")["artifacts"]]
    assert kinds == ["onnx", "int8"]


def test_evaluate_agrees_across_backends(trained_run: str, tiny_dataset: Path, exported: dict, capsys) -> None:
    results = {}
    for backend in ("torch", "onnx", "int8"):
        code = main(["evaluate", "--run", trained_run, "--data", str(tiny_dataset), "--split", "all",
                     "--backend", backend, "--json"])
        assert code == 0
        results[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert results[backend]["model"]["backend"] == backend
    assert results["onnx"]["n_images"] == results["torch"]["n_images"] == 40
    assert results["onnx"]["dice"] == pytest.approx(results["torch"]["dice"], abs=1e-4)
    assert results["onnx"]["iou"] == pytest.approx(results["torch"]["iou"], abs=1e-4)
    assert results["int8"]["dice"] == pytest.approx(results["torch"]["dice"], abs=0.02)


def test_bench_prints_a_table_of_every_backend(trained_run: str, tiny_dataset: Path, exported: dict, capsys) -> None:
    from engine.evaluate import evaluate, select_samples

    code = main(["bench", "--run", trained_run, "--iterations", "4", "--warmup", "1", "--size", "64"])
    out = capsys.readouterr().out
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| backend | file | size (MB) | p50 (ms) | p95 (ms)")
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert {"torch-cpu", "onnx", "int8"} <= set(rows)
    presets = table[table.index(next(line for line in table if line.startswith("| preset |"))) + 2:]
    assert [line.split("|")[1].strip() for line in presets] == list(PRESETS)  # each with its GFLOP per crop

    result = bench.benchmark(trained_run, size=64, iterations=3, warmup=1)
    by_backend = {row["backend"]: row for row in result["rows"]}
    assert by_backend["onnx"]["dice"] == pytest.approx(by_backend["torch-cpu"]["dice"], abs=1e-4)
    assert by_backend["torch-cpu"]["file"] == "best.pth"  # the checkpoint the ONNX files came from
    # The Dice is the one evaluate reports on those images: under the run's recipe, not another threshold.
    expected = evaluate(Predictor.from_run(trained_run), select_samples(tiny_dataset, result["split"]))
    assert by_backend["torch-cpu"]["dice"] == pytest.approx(expected["dice"])
    assert (result["threshold"], result["min_region_px"]) == (expected["threshold"], expected["min_region_px"])
    assert [(p["preset"], p["crop"]) for p in result["presets"]] == [(name, 32) for name in PRESETS]  # the run's crop
    assert all(p["gflop_per_crop"] > 0 and p["gflop_per_s"] > 0 for p in result["presets"])
    for row in result["rows"]:
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] and row["throughput_ips"] > 0
        folder = runs.run_dir(trained_run) / ("" if row["backend"].startswith("torch") else "export")
        assert row["size_bytes"] == (folder / row["file"]).stat().st_size


# ---------------------------------------------------------------------------------------- bad input


def test_corrupted_onnx_gives_a_clear_error(trained_run: str, copy_run: CopyRun, tiny_dataset: Path, exported: dict,
                                            capsys) -> None:
    folder = copy_run("corrupt-onnx")
    model_path = folder / "export" / "model.onnx"
    model_path.write_bytes(model_path.read_bytes()[:5000])  # truncated, as after a failed copy
    with pytest.raises(EngineError, match="not a loadable ONNX model"):
        Predictor(folder, backend="onnx")
    code = main(["evaluate", "--run", "corrupt-onnx", "--data", str(tiny_dataset), "--backend", "onnx", "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "export it again" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert main(["bench", "--run", "corrupt-onnx", "--iterations", "2"]) == 2

    # A valid ONNX file without the engine's metadata is refused with a clear message too.
    proto = onnx.load(str(runs.run_dir(trained_run) / "export" / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(model_path))
    with pytest.raises(EngineError, match="without the engine's metadata"):
        Predictor(folder, backend="onnx")


def test_run_without_checkpoints_and_unknown_epoch(trained_run: str, copy_run: CopyRun, capsys) -> None:
    empty = copy_run("no-checkpoints")
    for path in empty.glob("*.pth"):
        path.unlink()
    shutil.rmtree(empty / "export", ignore_errors=True)
    with pytest.raises(RunNotFound, match="no checkpoints"):
        export.export_run("no-checkpoints")
    assert main(["export", "--run", "no-checkpoints"]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert not (empty / "export").exists()

    with pytest.raises(RunNotFound, match="no epoch 99"):
        export.export_run(trained_run, epoch=99)
    with pytest.raises(RunNotFound, match="unknown run"):
        export.export_run("no-such-run")


def test_a_moved_dataset_still_exports_on_generated_images_and_says_so(copy_run: CopyRun) -> None:
    folder = copy_run("moved-dataset")
    info = runs.read_run_json(folder)
    runs.write_run_json(folder, {**info, "dataset": {**info["dataset"], "path": str(folder / "gone")}})
    report = export.export_run("moved-dataset")
    assert "gone not found" in report["check_data"] and "generated images, not on your data" in report["check_data"]
    assert report["check_data"] in report["messages"]
    assert (folder / "export" / "model.onnx").is_file()
    assert not Path(report["dataset"]).exists()  # the generated images are gone again
    with pytest.raises(DatasetError, match="not found.*--data DIR"):  # an explicit --data must exist
        export.export_run("moved-dataset", data=folder / "nowhere")


def test_the_shipped_demo_exports_int8_in_a_fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's demo run, as cloned (its training set is not shipped), exports and is checked on its own images."""
    shipped = config.ROOT / "runs" / "demo"
    assert not Path(runs.read_run_json(shipped)["dataset"]["path"]).is_absolute()
    demo = tmp_path / "demo"
    shutil.copytree(shipped, demo, ignore=shutil.ignore_patterns("export", "*.log", "resume.pth"))
    monkeypatch.setattr(config, "DEMO_RUN_DIR", demo)
    monkeypatch.setattr(config, "ROOT", tmp_path)  # no data/demo-train here, as in a fresh clone
    report = export.export_run("demo", int8=True)
    assert "checked on the check/ images the run ships with" in report["check_data"]
    kinds = {a["kind"]: a for a in report["artifacts"]}
    assert kinds["onnx"]["metrics"]["n_val_images"] == 12
    assert kinds["onnx"]["metrics"]["parity"]["max_abs_diff"] < export.PARITY_TOLERANCE
    assert "int8" in kinds and report["gate"]["accepted"] == kinds["int8"]["accepted"]
    # Whatever CPU runs this: 7-bit weights cannot saturate ONNX Runtime's AVX2 kernels, so the gate holds.
    assert report["gate"]["accepted"] and report["gate"]["dice_drop"] <= export.MAX_DICE_DROP, report["gate"]["message"]
    assert kinds["int8"]["metrics"]["quantization"]["reduce_range"] is True
    assert (demo / "export" / "model.onnx").is_file()


@pytest.mark.parametrize("failing_write", [1, 3], ids=["fp32-model", "report-after-both-models"])
def test_full_disk_leaves_the_previous_export_intact(copy_run: CopyRun, exported: dict, monkeypatch,
                                                     failing_write: int) -> None:
    folder = copy_run("full-disk")
    before = {p.name: p.read_bytes() for p in (folder / "export").iterdir()}
    real_fsync, writes = os.fsync, []

    def fills_up(fd: int) -> None:  # the disk is full from this write on (fsync is where it shows)
        writes.append(fd)
        if len(writes) >= failing_write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fills_up)
    with pytest.raises(EngineError, match="disk is full"):
        export.export_run("full-disk", int8=True)
    monkeypatch.undo()
    assert len(writes) == failing_write
    assert {p.name: p.read_bytes() for p in (folder / "export").iterdir()} == before
    assert hidden_leftovers(folder / "export") == []


def test_an_export_stopped_half_way_leaves_no_empty_folder(copy_run: CopyRun) -> None:
    """Leaving the Export page mid-export stops the script from inside the progress callback."""
    folder = copy_run("stopped-export")
    shutil.rmtree(folder / "export", ignore_errors=True)

    class PageLeft(Exception):
        pass

    def leave(done: float, total: float, what: str = "") -> None:
        if done / total >= 0.2:
            raise PageLeft(what)

    with pytest.raises(PageLeft):
        export.export_run("stopped-export", progress=leave)
    assert not (folder / "export").exists()


def test_unwritable_export_folder_is_a_clear_error(copy_run: CopyRun) -> None:
    folder = copy_run("blocked-export")
    shutil.rmtree(folder / "export", ignore_errors=True)
    (folder / "export").write_text("a file where the export folder should be")
    with pytest.raises(EngineError, match=r"while writing .*model\.onnx"):
        export.export_run("blocked-export")
    assert (folder / "export").read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_export_folder(copy_run: CopyRun) -> None:
    folder = copy_run("read-only")
    (folder / "export").mkdir(exist_ok=True)
    before = sorted(p.name for p in (folder / "export").iterdir())
    (folder / "export").chmod(0o555)
    try:
        with pytest.raises(EngineError, match="read-only"):
            export.export_run("read-only")
        assert sorted(p.name for p in (folder / "export").iterdir()) == before
    finally:
        (folder / "export").chmod(0o755)


def test_a_check_error_from_the_runs_own_dataset_stays_a_one_line_error(copy_run: CopyRun, tiny_dataset: Path,
                                                                        tmp_path: Path) -> None:
    """An error raised while checking on the run's dataset reaches the caller as it is (no generator mix-up)."""
    emptied = tmp_path / "emptied"
    shutil.copytree(tiny_dataset, emptied)
    for image in (emptied / "images").iterdir():  # the folder is there, its images are gone
        image.unlink()
    folder = copy_run("emptied-dataset")
    info = runs.read_run_json(folder)
    runs.write_run_json(folder, {**info, "dataset": {**info["dataset"], "path": str(emptied)}})
    with pytest.raises(DatasetError, match="no usable images"):
        export.export_run("emptied-dataset")


def test_exported_files_are_readable_by_other_users_as_the_umask_allows(trained_run: str, exported: dict) -> None:
    umask = os.umask(0)
    os.umask(umask)
    export_dir = runs.run_dir(trained_run) / "export"
    for name in ("model.onnx", "model.int8.onnx", "report.json"):
        mode = (export_dir / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))  # like open() would make it, not mkstemp's 0600
    if umask & 0o044 == 0:
        assert all((export_dir / name).stat().st_mode & 0o044 for name in ("model.onnx", "report.json"))


def test_auto_serves_the_best_checkpoint_when_the_export_holds_another_epoch(copy_run: CopyRun,
                                                                               exported: dict) -> None:
    """After a resume finds a better epoch (or an export of another one), `auto` must not answer with the old
    export's model while saying it is the run's best; it serves the best checkpoint and says to export again."""
    from engine import serving

    folder = copy_run("stale-export")
    best = runs.read_run_json(folder)["best_epoch"]
    other = next(e for e in runs.epochs_saved(folder) if e != best)
    export.export_run("stale-export", epoch=other)
    choice = serving.auto_backend(folder)
    assert choice.backend == "torch" and f"holds epoch {other} but the best epoch is now {best}" in choice.rule
    assert serving.open_predictor("stale-export").epoch == best
    export.export_run("stale-export")  # the best epoch again: the export is served
    assert serving.stale_export(folder) is None and serving.auto_backend(folder).backend != "torch"


@pytest.mark.slow
def test_the_half_resolution_preset_trains_exports_and_passes_the_int8_gate(tiny_dataset: Path) -> None:
    from engine.train import TrainConfig, train

    run_id = train(TrainConfig(data=str(tiny_dataset), epochs=2, preset="lean", base=8, depth=2, crop=32,
                               batch_size=8, name="lean", steps_per_epoch=4))
    folder = runs.run_dir(run_id)
    try:
        model, _ = load_checkpoint(folder / "best.pth")
        assert model.arch == {"in_channels": 1, "base": 8, "depth": 2, "stem": 2} and model.stride == 8
        assert runs.read_run_json(folder)["arch"]["stem"] == 2
        result = export.export_run(run_id, int8=True)
        assert result["gate"]["accepted"], result["gate"]["message"]
        onnx_predictor, torch_predictor = Predictor(folder, backend="onnx"), Predictor(folder, backend="torch")
        assert onnx_predictor.meta["arch"] == model.arch
        for sample in scan_dataset(tiny_dataset).samples[:3]:
            image, _ = load_pair(sample)
            for picture in (image, image[:45, :61]):  # an odd size pads to the stride of 8
                np.testing.assert_allclose(onnx_predictor.predict_proba(picture),
                                           torch_predictor.predict_proba(picture), atol=1e-4)
    finally:  # other test files pick the newest run; leave only the fixture's
        shutil.rmtree(folder, ignore_errors=True)
        registry.delete_run(run_id)
