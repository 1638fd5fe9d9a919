"""ONNX export, accuracy-gated INT8 quantization and a cross-backend benchmark of a run's model.

`export_run` writes `runs/<run>/export/model.onnx` (+ `model.int8.onnx`) and `report.json`:
1. the checkpoint is traced to ONNX (one file, dynamic batch and spatial size, the engine's metadata
   inside as JSON values, the same keys the Predictor reads);
2. parity with PyTorch is checked on real images of the run's dataset;
3. optionally INT8: `quant_pre_process`, then static QDQ quantization with per-channel weights,
   calibrated on training images; the INT8 model is kept only if its validation Dice drops by no
   more than `max_dice_drop` against the fp32 ONNX model.
Every file is first written as a hidden temp file in the export folder, checked through the same
Predictor the app uses, and renamed into place only at the end, so a failure leaves nothing behind.
The backends are timed with engine.bench; the labelled images for the checks come from engine.checkdata.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine import runs, runstore
from engine.bench import BENCH_SIZE, machine_description, square_image, time_backends
from engine.checkdata import NO_DEFECT_NOTE, check_data, pick_samples, run_folder
from engine.cpuflags import cpu_flags
from engine.data import load_pair
from engine.errors import EngineError
from engine.gates import MAX_DICE_DROP, RECHECK_PREFIX, within_gate
from engine.inference import OPENVINO_PRECISION, TILE, Predictor, openvino_available, preprocess_image
from engine.progress import Progress, part, silent
from engine.runfolder import MODEL_FILES, ONNX_FILES, REPORT_FILE, RunFolder
from engine.runrecord import RunRecord
from engine.storage import commit, staged_file, write_staged

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| allowed for the fp32 export
PARITY_IMAGES = 8
CALIBRATION_IMAGES = 32
# INT8 format: QDQ, uint8 activations, int8 weights per channel. reduce_range keeps weights to 7 bits, so on
# AVX2 CPUs without VNNI the U8S8 kernels' VPMADDUBSW (16-bit sums of two u8 x s8 products) cannot saturate:
# 2 x 255 x 64 < 32767. Measured in docs/BENCHMARKS.md against full-range U8S8, U8U8 and QOperator.
QUANTIZATION = {"format": "QDQ", "activations": "uint8", "weights": "int8", "reduce_range": True}



def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an image to at most size x size (calibration and timing use bounded inputs)."""
    height, width = image.shape
    y, x = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[y : y + size, x : x + size]


# --------------------------------------------------------------------------------------- export


def onnx_metadata(run_id: str, epoch: int | None, meta: dict[str, Any], model: Any, record: RunRecord,
                  checkpoint: str) -> dict[str, Any]:
    """Metadata stored inside the model (each value JSON-encoded on write); Predictor reads it back."""
    normalisation = meta.get("normalisation") or record.normalisation
    if not normalisation:
        raise EngineError(f"run {run_id}: the checkpoint has no normalisation; it cannot be exported")
    return {
        "run_id": run_id, "epoch": epoch, "threshold": float(meta.get("threshold", record.threshold)),
        "normalisation": {"mean": float(normalisation["mean"]), "std": float(normalisation["std"])},
        "in_channels": model.in_channels, "train_crop": meta.get("train_crop", record.param("crop")),
        "stride": model.stride, "scale": float(meta.get("scale", 1.0)), "arch": model.arch,
        "checkpoint": checkpoint, "format": "fp32", "opset": OPSET,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def set_metadata(model_proto: Any, metadata: dict[str, Any]) -> None:
    """Replace the model's custom metadata with `metadata`, every value JSON-encoded."""
    del model_proto.metadata_props[:]  # quant_pre_process adds a non-JSON entry of its own
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def torch_to_onnx(model: Any, metadata: dict[str, Any]) -> bytes:
    """Trace a UNetTiny to one self-contained ONNX file (dynamic batch, height, width) with metadata."""
    import io

    import onnx
    import torch

    probe = torch.zeros(1, model.in_channels, model.stride * 4, model.stride * 4)
    buffer = io.BytesIO()
    # The classic TorchScript exporter (its deprecation warning silenced): the dynamo one needs onnxscript,
    # which is not a dependency, and this model has no control flow that would need it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.cpu().eval(), (probe,), buffer, dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = ("UNetTiny defect segmentation: input normalised gray NCHW (H, W multiples of stride); "
                        "output logits")
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def parity(reference: Predictor, candidate: Predictor, images: list[np.ndarray]) -> dict[str, float]:
    """Max and mean absolute probability difference and mask agreement (at the reference threshold) over images."""
    max_diff, sum_diff, agree, total = 0.0, 0.0, 0, 0
    for image in images:
        expected, actual = reference.predict_proba(image), candidate.predict_proba(image)
        difference = np.abs(expected - actual)
        max_diff, sum_diff = max(max_diff, float(difference.max())), sum_diff + float(difference.sum())
        agree += int(((expected >= reference.threshold) == (actual >= reference.threshold)).sum())
        total += expected.size
    total = max(total, 1)
    return {"max_abs_diff": max_diff, "mean_abs_diff": sum_diff / total, "mask_agreement": agree / total,
            "n_images": len(images)}


class _Calibration:
    """Feeds normalised training images to onnxruntime's calibrator, one per call."""

    def __init__(self, images: list[np.ndarray], mean: float, std: float, stride: int) -> None:
        self.batches = iter([preprocess_image(_fit(image, TILE), mean, std, stride) for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next input feed, or None when done."""
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, out_path: Path, images: list[np.ndarray], mean: float, std: float,
                  stride: int, metadata: dict[str, Any], exclude_head: bool = False,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Static INT8 of fp32_path into out_path (QUANTIZATION unless `options` overrides some); returns the settings."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Calibration, CalibrationDataReader):
        pass

    chosen = {**QUANTIZATION, **(options or {})}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        # auto_merge: the decoder's Concat joins tensors whose symbolic sizes the inference cannot prove equal.
        quant_pre_process(str(fp32_path), str(prepared), auto_merge=True)
        graph = onnx.load(str(prepared)).graph
        convs = [node for node in graph.node if node.op_type == "Conv"]
        # Keeping the 1x1 head in fp32 was measured: no Dice gain, and ~35% slower (it dequantizes the
        # full-resolution features), so by default everything is quantized.
        exclude = [convs[-1].name] if exclude_head and convs else []
        settings = {**chosen, "per_channel": True, "calibration": "minmax", "calibration_images": len(images),
                    "excluded_nodes": exclude}
        quantized = Path(work) / "quantized.onnx"
        quantize_static(str(prepared), str(quantized), Reader(images, mean, std, stride),
                        quant_format=getattr(QuantFormat, chosen["format"]), per_channel=True,
                        reduce_range=chosen["reduce_range"], activation_type=types[chosen["activations"]],
                        weight_type=types[chosen["weights"]], calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=exclude)
        proto = onnx.load(str(quantized))
    set_metadata(proto, {**metadata, "format": "int8", "quantization": settings})
    write_staged(out_path, proto.SerializeToString(), out_path)
    return settings


def int8_gate(fp32_dice: float, int8_dice: float, max_dice_drop: float) -> tuple[bool, str]:
    """Whether the INT8 model is kept, and the sentence that says why."""
    drop = fp32_dice - int8_dice
    if within_gate(fp32_dice, int8_dice, max_dice_drop):
        return True, (f"INT8 accepted: validation Dice {int8_dice:.4f} vs fp32 {fp32_dice:.4f} (drop {drop:+.4f} <= "
                      f"{max_dice_drop})")
    return False, (f"INT8 REJECTED: validation Dice {int8_dice:.4f} vs fp32 {fp32_dice:.4f} (drop {drop:+.4f} > "
                   f"{max_dice_drop}); model.int8.onnx was not kept")


def export_run(run: str | Path | None, epoch: int | str = "best", int8: bool = False, data: str | Path | None = None,
               max_dice_drop: float = MAX_DICE_DROP, calibration_images: int = CALIBRATION_IMAGES,
               progress: Progress | None = None) -> dict[str, Any]:
    """Export a run's checkpoint to ONNX (and INT8 behind the accuracy gate); returns the report also saved as JSON."""
    if calibration_images < 1:
        raise EngineError("--calibration-images must be at least 1")
    folder = run_folder(run)
    checkpoint = runs.checkpoint_path(folder, epoch)  # RunNotFound for no checkpoints or an unknown epoch
    with check_data(folder, data) as (dataset, dataset_note, fallback):
        return _export(folder, checkpoint, int8, dataset, dataset_note, fallback, max_dice_drop, calibration_images,
                       progress or silent)


def _export(folder: Path, checkpoint: Path, int8: bool, dataset: Path, dataset_note: str, fallback: bool,
            max_dice_drop: float, calibration_images: int, progress: Progress) -> dict[str, Any]:
    """export_run once the checkpoint and the labelled images for the checks are known."""
    # Over 60 lines on purpose: the ExitStack of staged files has to span every step up to the renames, so
    # that a failure anywhere leaves the previous export as it was; the steps themselves are helpers.
    from engine.model import load_checkpoint

    record = runs.read_record(folder)
    run_id = record.run_id or folder.name
    model, meta = load_checkpoint(checkpoint)
    epoch_number = int(meta["epoch"]) if meta.get("epoch") is not None else None
    export_dir = RunFolder(folder).export
    final = {kind: export_dir / name for kind, name in ONNX_FILES.items()}
    with staged_file(final["onnx"]):
        pass  # fail now, not after the work, when the folder cannot take a file
    progress(0.05, 1.0, "exporting to ONNX")
    metadata = onnx_metadata(run_id, epoch_number, meta, model, record, checkpoint.name)
    onnx_bytes = torch_to_onnx(model, metadata)
    reference = Predictor(folder, backend="torch", path=checkpoint)
    check_images = [load_pair(s)[0] for s in pick_samples(dataset, ("val", "test", "train"), PARITY_IMAGES)]
    val_samples = pick_samples(dataset, ("val", "test", "train"))  # a relative check: any split with defects will do
    report: dict[str, Any] = {
        "run_id": run_id, "epoch": epoch_number, "checkpoint": checkpoint.name, "dataset": str(dataset),
        "check_data": dataset_note, "check_data_is_fallback": fallback, "opset": OPSET,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(), "cpu_flags": cpu_flags(), "artifacts": [], "messages": [dataset_note],
    }
    if not any(s.defective for s in val_samples):
        report["messages"].append(f"accuracy checks: {NO_DEFECT_NOTE}")
    with ExitStack() as staged:
        # fp32: written to a hidden temp file, checked through the Predictor, renamed at the very end.
        staging = {"onnx": staged.enter_context(staged_file(final["onnx"]))}
        write_staged(staging["onnx"], onnx_bytes, final["onnx"])
        entries: dict[str, dict[str, Any]] = {}
        fp32, fp32_eval, entries["onnx"] = _check_fp32(folder, staging["onnx"], reference, check_images, val_samples,
                                                       run_id, progress)
        fp32_parity = entries["onnx"]["metrics"]["parity"]
        timed = {"torch": reference, "onnx": fp32}

        if int8:  # quantize, then the same checks plus the accuracy gate against the fp32 ONNX model
            staging["int8"] = staged.enter_context(staged_file(final["int8"]))
            entries["int8"], report["gate"], timed["int8"] = _quantize_and_gate(
                folder, staging, reference, fp32, fp32_eval, check_images, val_samples, dataset, calibration_images,
                metadata, max_dice_drop, progress)
            report["messages"].append(report["gate"]["message"])

        report["gates"] = _gates(folder, staging, entries, fp32_eval, val_samples, max_dice_drop, progress)
        progress(0.8, 1.0, "timing the backends")
        timing = time_backends(timed, [square_image(image, BENCH_SIZE) for image in check_images], iterations=20,
                               warmup=3)
        for kind, entry in entries.items():
            entry["metrics"].update(timing[kind], torch_latency_p50_ms=timing["torch"]["latency_p50_ms"])
            entry["size_bytes"] = staging[kind].stat().st_size

        for kind, entry in entries.items():
            report["artifacts"].append({**entry, "path": f"export/{final[kind].name}", "epoch": epoch_number})
        if not int8:
            kept = _kept_int8_entry(export_dir, epoch_number)
            report["artifacts"].extend(kept)
            report["gates"].update(_kept_int8_gates(export_dir) if kept else {})
        report["messages"].insert(0, f"ONNX fp32 written: {final['onnx']} ({entries['onnx']['size_bytes'] / 1e6:.2f} "
                                     f"MB, max |dp| vs PyTorch {fp32_parity['max_abs_diff']:.1e}, mask agreement "
                                     f"{fp32_parity['mask_agreement']:.5f})")
        # An INT8 file of another epoch is outdated now; a rejected INT8 must not be served either.
        old_int8_epoch = _file_epoch(final["int8"]) if final["int8"].is_file() else "none"
        if old_int8_epoch not in ("none", epoch_number):  # the record says what happened to it
            report["retired"] = [{"kind": "int8", "path": f"export/{final['int8'].name}", "epoch": old_int8_epoch,
                                  "size_bytes": 0, "accepted": False,
                                  "metrics": {"removed": f"replaced by the export of epoch {epoch_number}"}}]
        progress(0.95, 1.0, "writing files")
        staging["report"] = staged.enter_context(staged_file(export_dir / REPORT_FILE))
        write_staged(staging["report"], (json.dumps(report, indent=2, default=str) + "\n").encode(),
                     export_dir / REPORT_FILE)
        # Everything is written and synced; only renames are left, so a failure above changed nothing.
        commit(staging["onnx"], final["onnx"])
        if int8 and entries["int8"]["accepted"]:
            commit(staging["int8"], final["int8"])
        elif int8 or old_int8_epoch != epoch_number:
            final["int8"].unlink(missing_ok=True)
        commit(staging["report"], export_dir / REPORT_FILE)
        for old in export_dir.glob(f"{RECHECK_PREFIX}*.json"):  # re-checks of the files just replaced
            old.unlink(missing_ok=True)

    if int8 and not entries["int8"]["accepted"]:
        report["serves_instead"] = serves_instead(folder)
        report["messages"].append(report["serves_instead"]["message"])
    runstore.mirror(folder)
    progress(1.0, 1.0, "done")
    return report


def serves_instead(folder: Path) -> dict[str, Any]:
    """What `auto` serves on this machine now that INT8 was rejected, and its batch-1 p50 at 256x256."""
    from engine.serving import auto_backend, choice_p50

    choice = auto_backend(folder)
    backend, p50 = (choice.backend, choice_p50(folder, choice)) if choice else ("torch", None)
    speed = f", {p50:.1f} ms p50 per {BENCH_SIZE}x{BENCH_SIZE} image" if p50 is not None else ""
    return {"backend": backend, "latency_p50_ms": p50,
            "message": f"INT8 is not served: `auto` serves {backend} instead{speed} on this machine "
                       f"({machine_description()})"}


def _check_fp32(folder: Path, staged_onnx: Path, reference: Predictor, check_images: list[np.ndarray],
                val_samples: list[Any], run_id: str, progress: Progress
                ) -> tuple[Predictor, dict[str, Any], dict[str, Any]]:
    """The staged fp32 ONNX model through the Predictor: parity with PyTorch (or EngineError), validation Dice.

    Returns its Predictor, its evaluation and its artifact entry.
    """
    from engine.evaluate import evaluate

    progress(0.2, 1.0, "checking ONNX against PyTorch")
    fp32 = Predictor(folder, backend="onnx", path=staged_onnx)
    fp32_parity = parity(reference, fp32, check_images)
    if fp32_parity["max_abs_diff"] > PARITY_TOLERANCE:
        raise EngineError(f"ONNX export of run {run_id} differs from PyTorch (max |dp| "
                          f"{fp32_parity['max_abs_diff']:.2e} > {PARITY_TOLERANCE}); nothing was written")
    progress(0.3, 1.0, "evaluating fp32 ONNX on the validation split")
    fp32_eval = evaluate(fp32, val_samples, progress=part(progress, 0.3, 0.1, "evaluating fp32 ONNX: "))
    entry = {"kind": "onnx", "accepted": True, "metrics": {
        "parity": fp32_parity, "val_dice": fp32_eval["dice"], "val_iou": fp32_eval["iou"],
        "n_val_images": fp32_eval["n_images"]}}
    return fp32, fp32_eval, entry


def _quantize_and_gate(folder: Path, staging: dict[str, Path], reference: Predictor, fp32: Predictor,
                       fp32_eval: dict[str, Any], check_images: list[np.ndarray], val_samples: list[Any],
                       dataset: Path, calibration_images: int, metadata: dict[str, Any], max_dice_drop: float,
                       progress: Progress) -> tuple[dict[str, Any], dict[str, Any], Predictor]:
    """INT8 from the staged fp32 file: quantize, check parity, and gate on validation Dice against fp32.

    Returns the artifact entry, the gate's verdict and the INT8 Predictor (for timing).
    """
    from engine.evaluate import evaluate

    progress(0.4, 1.0, "quantizing to INT8 (calibrating on training images)")
    calibration = [load_pair(s)[0] for s in pick_samples(dataset, ("train", "val"), calibration_images)]
    settings = quantize_int8(staging["onnx"], staging["int8"], calibration, fp32.mean, fp32.std, fp32.stride, metadata)
    quantized = Predictor(folder, backend="int8", path=staging["int8"])
    progress(0.6, 1.0, "checking INT8 against PyTorch")
    int8_parity = parity(reference, quantized, check_images)
    progress(0.65, 1.0, "evaluating INT8 on the validation split (accuracy gate)")
    int8_eval = evaluate(quantized, val_samples, progress=part(progress, 0.65, 0.05, "INT8 accuracy gate: "))
    accepted, message = int8_gate(fp32_eval["dice"], int8_eval["dice"], max_dice_drop)
    drop = fp32_eval["dice"] - int8_eval["dice"]
    gate = {"max_dice_drop": max_dice_drop, "fp32_dice": fp32_eval["dice"], "int8_dice": int8_eval["dice"],
            "dice_drop": drop, "accepted": accepted, "message": message}
    entry = {"kind": "int8", "accepted": accepted, "metrics": {
        "parity": int8_parity, "val_dice": int8_eval["dice"], "val_iou": int8_eval["iou"],
        "n_val_images": int8_eval["n_images"], "dice_drop": drop, "max_dice_drop": max_dice_drop,
        "quantization": settings}}
    return entry, gate, quantized


def _gates(folder: Path, staging: dict[str, Path], entries: dict[str, dict[str, Any]], fp32_eval: dict[str, Any],
           val_samples: list[Any], max_dice_drop: float, progress: Progress) -> dict[str, dict[str, Any]]:
    """The accuracy gate of every backend the export can be served with (what `auto` may pick from).

    ONNX Runtime's come from the checks above; each OpenVINO precision reads a staged file and is held to
    the INT8 gate: validation Dice within max_dice_drop of ONNX Runtime fp32.
    """
    from engine.evaluate import evaluate

    def gate(accepted: bool, dice: float) -> dict[str, Any]:  # the CPU flags: a serving CPU with others re-checks
        return {"accepted": accepted, "val_dice": dice, "reference_dice": fp32_eval["dice"],
                "dice_drop": fp32_eval["dice"] - dice, "max_dice_drop": max_dice_drop, "cpu_flags": cpu_flags()}

    gates = {kind: gate(entry["accepted"], entry["metrics"]["val_dice"]) for kind, entry in entries.items()}
    if not openvino_available():
        return gates
    for backend, precision in OPENVINO_PRECISION.items():
        source = "int8" if MODEL_FILES[backend] == ONNX_FILES["int8"] else "onnx"
        if not gates.get(source, {}).get("accepted"):
            continue
        progress(0.7, 1.0, f"evaluating OpenVINO {precision} on {source} on the validation split")
        dice = evaluate(Predictor(folder, backend=backend, path=staging[source]), val_samples,
                        progress=part(progress, 0.7, 0.1, f"OpenVINO {precision} accuracy gate: "))["dice"]
        gates[backend] = gate(within_gate(fp32_eval["dice"], dice, max_dice_drop), dice)
    return gates


def _file_epoch(path: Path) -> int | None:
    """The epoch recorded in an exported model's metadata (None if unreadable)."""
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props.get("epoch", "null"))
    except Exception:  # a corrupt file counts as outdated
        return None


def _kept_int8_entry(export_dir: Path, epoch: int | None) -> list[dict[str, Any]]:
    """The earlier report's INT8 entry when its file is still there (same epoch), so the report stays complete."""
    if not (export_dir / ONNX_FILES["int8"]).is_file():
        return []
    try:
        old = json.loads((export_dir / REPORT_FILE).read_text())
        return [a for a in old.get("artifacts", []) if a.get("kind") == "int8" and a.get("accepted")
                and a.get("epoch") == epoch][:1]
    except (OSError, ValueError, AttributeError):
        return []


def _kept_int8_gates(export_dir: Path) -> dict[str, dict[str, Any]]:
    """The earlier report's gates of the INT8 file kept from it (an INT8 file is only there when it passed)."""
    try:
        gates = json.loads((export_dir / REPORT_FILE).read_text()).get("gates") or {}
    except (OSError, ValueError, AttributeError):
        gates = {}
    return {"int8": {"accepted": True}, **{k: v for k, v in gates.items() if k in ("int8", "openvino-int8")}}


def read_report(run: str | Path | None) -> dict[str, Any] | None:
    """The export report of a run (runs/<run>/export/report.json), or None if it was never exported."""
    path = RunFolder(run_folder(run)).report
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(report, dict) and isinstance(report.get("artifacts"), list)
    return report if valid and all(isinstance(a, dict) and "metrics" in a for a in report["artifacts"]) else None


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines of an export report."""
    lines = [f"run {report['run_id']} epoch {report['epoch']} ({report['checkpoint']}), opset {report['opset']}"]
    lines += report.get("messages", [])
    for entry in report["artifacts"]:
        m = entry["metrics"]
        latency = f"{m['latency_p50_ms']:.1f} ms p50" if "latency_p50_ms" in m else "not timed"
        parity_text = (f"max |dp| {m['parity']['max_abs_diff']:.1e}  mask agreement "
                       f"{m['parity']['mask_agreement']:.5f}") if "parity" in m else "no parity check"
        lines.append(f"  {entry['kind']:<5} {'kept    ' if entry['accepted'] else 'rejected'} "
                     f"{entry['size_bytes'] / 1e6:6.2f} MB  val Dice {m.get('val_dice', float('nan')):.4f}  "
                     f"{parity_text}  {latency}")
    for backend, gate in report.get("gates", {}).items():
        if backend in OPENVINO_PRECISION:
            lines.append(f"  {backend:<13} {'passed' if gate['accepted'] else 'FAILED'} the gate: val Dice "
                         f"{gate['val_dice']:.4f} (drop {gate['dice_drop']:+.4f})")
    return "\n".join(lines)
