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

`benchmark` measures every available backend in one process, interleaved, on the same images.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine import config, registry, runs
from engine.data import Sample, load_pair, scan_dataset
from engine.errors import DatasetError, EngineError
from engine.serving import available_backends
from engine.inference import (
    ONNX_FILES,
    TILE,
    Predictor,
    preprocess_image,
)

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| allowed for the fp32 export
MAX_DICE_DROP = 0.01  # default INT8 accuracy gate (validation Dice, fp32 ONNX minus INT8)
PARITY_IMAGES = 8
CALIBRATION_IMAGES = 32
REPORT_FILE = "report.json"
BENCH_SIZE = 256
THROUGHPUT_BATCH = 8

Progress = Callable[[str, float], None]  # (what is happening, fraction done of the whole job)


def _no_progress(stage: str, fraction: float) -> None:
    """Default progress callback: do nothing."""


# --------------------------------------------------------------------------------------- files


@contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """A hidden temp path next to `final`, removed on exit unless it was renamed onto `final` with commit().

    A folder it had to create is removed again if it ends empty (an export stopped half-way leaves nothing).
    """
    created = not final.parent.is_dir()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=f"{final.suffix}.tmp")
        os.close(fd)
    except OSError as err:
        raise _write_error(final.parent, err) from err
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        if created and not any(final.parent.iterdir()):
            final.parent.rmdir()


def commit(tmp: Path, final: Path) -> None:
    """Rename a staged (written and synced) file onto its final path (atomic on one file system)."""
    try:
        os.replace(tmp, final)
    except OSError as err:
        raise _write_error(final.parent, err) from err


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and sync bytes to an (already created) temp path; OSError becomes a clear EngineError."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise _write_error(path.parent, err) from err


def _write_error(folder: Path, err: OSError) -> EngineError:
    """The user-facing message for a failed write into the export folder."""
    if err.errno == errno.ENOSPC:
        hint = "the disk is full; free some space and export again"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the folder is read-only; make it writable or copy the run somewhere writable"
    else:
        hint = "check that the folder exists, is writable and has free space"
    return EngineError(f"cannot write the export into {folder} ({err.strerror or err}); {hint}")


# --------------------------------------------------------------------------------------- data


def run_folder(run: str | Path | None) -> Path:
    """A run's folder from its id, `demo`/`latest`, or the folder itself (pages pass the folder they listed)."""
    if isinstance(run, Path):
        runs.read_run_json(run)  # RunNotFound if it is not a run folder
        return run
    return runs.resolve_run(run)


CHECK_FOLDER = "check"  # a small labelled set a shipped run carries for its own checks (the demo's)
GENERATED_CHECK_IMAGES = 24


def dataset_for_run(folder: Path, data: str | Path | None = None) -> Path:
    """The dataset folder a run was trained on (or `data`); DatasetError with what to do if it is gone."""
    if data is None:
        info = runs.read_run_json(folder)
        dataset = info.get("dataset") or {}
        data = dataset.get("path") if isinstance(dataset, dict) else dataset
        if not data:
            raise DatasetError(f"run {folder.name} does not record its dataset; pass --data DIR")
    data = Path(data) if Path(data).is_absolute() else config.ROOT / data  # shipped runs record repo paths
    if not (data / "images").is_dir():
        raise DatasetError(f"dataset {data} not found (needed for the parity and accuracy checks); restore it, "
                           "or point to a copy with --data DIR")
    return data


@contextmanager
def check_data(folder: Path, data: str | Path | None = None) -> Iterator[tuple[Path, str]]:
    """Labelled images for export's parity and accuracy checks, and a sentence saying which they are.

    `--data` if given, else the run's own dataset; if that has moved: the run's shipped check set, else
    images generated for the purpose (deleted afterwards), so an export never fails for a missing folder.
    """
    if data is not None:
        yield dataset_for_run(folder, data), f"checked on {data} (--data)"
        return
    try:
        dataset = dataset_for_run(folder)
        yield dataset, f"checked on the run's dataset {dataset}"
        return
    except DatasetError as err:
        missing = str(err).split(" (needed")[0]
    if (folder / CHECK_FOLDER / "images").is_dir():
        yield folder / CHECK_FOLDER, (f"{missing}: checked on the {CHECK_FOLDER}/ images the run ships with; "
                                      "pass --data DIR to check on your own labelled images")
        return
    from engine import synth

    with tempfile.TemporaryDirectory(prefix="export-check-") as tmp:
        synth.generate_dataset(tmp, GENERATED_CHECK_IMAGES, seed=0, workers=1)
        yield Path(tmp), (f"{missing}: checked on {GENERATED_CHECK_IMAGES} generated images, not on your data; "
                          "pass --data DIR to check on your own labelled images")


def pick_samples(data: Path, splits: tuple[str, ...], limit: int | None = None) -> list[Sample]:
    """Samples of the first split (in order) that has any, evenly spread over it and at most `limit`."""
    report = scan_dataset(data, validate=False)
    for split in splits:
        samples = report.split(split)
        if samples:
            if limit and len(samples) > limit:
                samples = [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]
            return samples
    raise DatasetError(f"{data}: no images in split(s) {', '.join(splits)} (found {report.counts()})")


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an image to at most size x size (calibration and timing use bounded inputs)."""
    height, width = image.shape
    y, x = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[y : y + size, x : x + size]


# --------------------------------------------------------------------------------------- export


def onnx_metadata(run_id: str, epoch: int | None, meta: dict[str, Any], model: Any, info: dict[str, Any],
                  checkpoint: str) -> dict[str, Any]:
    """Metadata stored inside the model (each value JSON-encoded on write); Predictor reads it back."""
    normalisation = meta.get("normalisation") or info.get("normalisation")
    if not normalisation:
        raise EngineError(f"run {run_id}: the checkpoint has no normalisation; it cannot be exported")
    return {
        "run_id": run_id, "epoch": epoch, "threshold": float(meta.get("threshold", info.get("threshold", 0.5))),
        "normalisation": {"mean": float(normalisation["mean"]), "std": float(normalisation["std"])},
        "in_channels": model.in_channels, "train_crop": meta.get("train_crop", (info.get("params") or {}).get("crop")),
        "stride": model.stride, "scale": float(meta.get("scale", 1.0)), "arch": {"in_channels": model.in_channels, "base": model.base, "depth": model.depth},
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
                  stride: int, metadata: dict[str, Any], exclude_head: bool = False) -> dict[str, Any]:
    """Static INT8 (QDQ, per-channel weights, uint8 activations) of fp32_path into out_path; returns settings."""
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

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        # auto_merge: the decoder's Concat joins tensors whose symbolic sizes the inference cannot prove equal.
        quant_pre_process(str(fp32_path), str(prepared), auto_merge=True)
        graph = onnx.load(str(prepared)).graph
        convs = [node for node in graph.node if node.op_type == "Conv"]
        # Keeping the 1x1 head in fp32 was measured: no Dice gain, and ~35% slower (it dequantizes the
        # full-resolution features), so by default everything is quantized.
        exclude = [convs[-1].name] if exclude_head and convs else []
        settings = {"format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8",
                    "calibration": "minmax", "calibration_images": len(images), "excluded_nodes": exclude}
        quantized = Path(work) / "quantized.onnx"
        quantize_static(str(prepared), str(quantized), Reader(images, mean, std, stride), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
        proto = onnx.load(str(quantized))
    set_metadata(proto, {**metadata, "format": "int8", "quantization": settings})
    _write_bytes(out_path, proto.SerializeToString())
    return settings


def int8_gate(fp32_dice: float, int8_dice: float, max_dice_drop: float) -> tuple[bool, str]:
    """Whether the INT8 model is kept, and the sentence that says why."""
    drop = fp32_dice - int8_dice
    if drop <= max_dice_drop:
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
    with check_data(folder, data) as (dataset, dataset_note):
        return _export(folder, checkpoint, int8, dataset, dataset_note, max_dice_drop, calibration_images,
                       progress or _no_progress)


def _export(folder: Path, checkpoint: Path, int8: bool, dataset: Path, dataset_note: str, max_dice_drop: float,
            calibration_images: int, progress: Progress) -> dict[str, Any]:
    """export_run once the checkpoint and the labelled images for the checks are known."""
    from engine.evaluate import evaluate
    from engine.model import load_checkpoint

    info = runs.read_run_json(folder)
    run_id = str(info.get("run_id") or folder.name)
    model, meta = load_checkpoint(checkpoint)
    epoch_number = int(meta["epoch"]) if meta.get("epoch") is not None else None
    export_dir = folder / "export"
    final = {kind: export_dir / name for kind, name in ONNX_FILES.items()}
    with staged_file(final["onnx"]):
        pass  # fail now, not after the work, when the folder cannot take a file
    progress("exporting to ONNX", 0.05)
    metadata = onnx_metadata(run_id, epoch_number, meta, model, info, checkpoint.name)
    onnx_bytes = torch_to_onnx(model, metadata)
    reference = Predictor(folder, backend="torch", path=checkpoint)
    check_images = [load_pair(s)[0] for s in pick_samples(dataset, ("val", "test", "train"), PARITY_IMAGES)]
    val_samples = pick_samples(dataset, ("val", "test"))
    report: dict[str, Any] = {
        "run_id": run_id, "epoch": epoch_number, "checkpoint": checkpoint.name, "dataset": str(dataset),
        "check_data": dataset_note, "check_data_is_fallback": "not found" in dataset_note, "opset": OPSET, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(), "artifacts": [], "messages": [dataset_note],
    }
    with ExitStack() as staged:
        # fp32: written to a hidden temp file, checked through the Predictor, renamed at the very end.
        staging = {"onnx": staged.enter_context(staged_file(final["onnx"]))}
        _write_bytes(staging["onnx"], onnx_bytes)
        progress("checking ONNX against PyTorch", 0.2)
        fp32 = Predictor(folder, backend="onnx", path=staging["onnx"])
        fp32_parity = parity(reference, fp32, check_images)
        if fp32_parity["max_abs_diff"] > PARITY_TOLERANCE:
            raise EngineError(f"ONNX export of run {run_id} differs from PyTorch (max |dp| "
                              f"{fp32_parity['max_abs_diff']:.2e} > {PARITY_TOLERANCE}); nothing was written")
        progress("evaluating fp32 ONNX on the validation split", 0.3)
        fp32_eval = evaluate(fp32, val_samples)
        entries = {"onnx": {"kind": "onnx", "accepted": True, "metrics": {
            "parity": fp32_parity, "val_dice": fp32_eval["dice"], "val_iou": fp32_eval["iou"],
            "n_val_images": fp32_eval["n_images"]}}}
        timed = {"torch": reference, "onnx": fp32}

        if int8:  # quantize, then the same checks plus the accuracy gate against the fp32 ONNX model
            staging["int8"] = staged.enter_context(staged_file(final["int8"]))
            progress("quantizing to INT8 (calibrating on training images)", 0.4)
            calibration = [load_pair(s)[0] for s in pick_samples(dataset, ("train", "val"), calibration_images)]
            settings = quantize_int8(staging["onnx"], staging["int8"], calibration, fp32.mean, fp32.std, fp32.stride,
                                     metadata)
            timed["int8"] = quantized = Predictor(folder, backend="int8", path=staging["int8"])
            progress("checking INT8 against PyTorch", 0.6)
            int8_parity = parity(reference, quantized, check_images)
            progress("evaluating INT8 on the validation split (accuracy gate)", 0.65)
            int8_eval = evaluate(quantized, val_samples)
            accepted, message = int8_gate(fp32_eval["dice"], int8_eval["dice"], max_dice_drop)
            drop = fp32_eval["dice"] - int8_eval["dice"]
            report["gate"] = {"max_dice_drop": max_dice_drop, "fp32_dice": fp32_eval["dice"],
                              "int8_dice": int8_eval["dice"], "dice_drop": drop, "accepted": accepted,
                              "message": message}
            report["messages"].append(message)
            entries["int8"] = {"kind": "int8", "accepted": accepted, "metrics": {
                "parity": int8_parity, "val_dice": int8_eval["dice"], "val_iou": int8_eval["iou"],
                "n_val_images": int8_eval["n_images"], "dice_drop": drop, "max_dice_drop": max_dice_drop,
                "quantization": settings}}

        progress("timing the backends", 0.8)
        timing = time_backends(timed, [_square(image, BENCH_SIZE) for image in check_images], iterations=20, warmup=3)
        for kind, entry in entries.items():
            entry["metrics"].update(timing[kind], torch_latency_p50_ms=timing["torch"]["latency_p50_ms"])
            entry["size_bytes"] = staging[kind].stat().st_size

        for kind, entry in entries.items():
            report["artifacts"].append({**entry, "path": f"export/{final[kind].name}", "epoch": epoch_number})
        if not int8:
            report["artifacts"].extend(_kept_int8_entry(export_dir, epoch_number))
        report["messages"].insert(0, f"ONNX fp32 written: {final['onnx']} ({entries['onnx']['size_bytes'] / 1e6:.2f} "
                                     f"MB, max |dp| vs PyTorch {fp32_parity['max_abs_diff']:.1e}, mask agreement "
                                     f"{fp32_parity['mask_agreement']:.5f})")
        progress("writing files", 0.95)
        staging["report"] = staged.enter_context(staged_file(export_dir / REPORT_FILE))
        _write_bytes(staging["report"], (json.dumps(report, indent=2, default=str) + "\n").encode())
        # Everything is written and synced; only renames are left, so a failure above changed nothing.
        # An INT8 file of another epoch is outdated now; a rejected INT8 must not be served either.
        old_int8_epoch = _file_epoch(final["int8"]) if final["int8"].is_file() else "none"
        commit(staging["onnx"], final["onnx"])
        if int8 and entries["int8"]["accepted"]:
            commit(staging["int8"], final["int8"])
        elif int8 or old_int8_epoch != epoch_number:
            final["int8"].unlink(missing_ok=True)
        commit(staging["report"], export_dir / REPORT_FILE)

    if old_int8_epoch not in ("none", epoch_number):  # the registry row of the removed file must not say "kept"
        registry.add_artifact(run_id, "int8", str(final["int8"]), 0, False, old_int8_epoch,
                              {"removed": f"replaced by the export of epoch {epoch_number}"})
    for entry in report["artifacts"]:
        registry.add_artifact(run_id, entry["kind"], str(folder / entry["path"]), entry["size_bytes"],
                              entry["accepted"], entry["epoch"], entry["metrics"])
    progress("done", 1.0)
    return report


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


def read_report(run: str | Path | None) -> dict[str, Any] | None:
    """The export report of a run (runs/<run>/export/report.json), or None if it was never exported."""
    path = run_folder(run) / "export" / REPORT_FILE
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
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- benchmark


def machine_description() -> str:
    """CPU model and thread count (and GPU, if any) of this machine, for benchmark records."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {config.cpu_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def time_backends(predictors: dict[str, Predictor], images: list[np.ndarray], iterations: int = 50,
                  warmup: int = 5, batch: int = THROUGHPUT_BATCH,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Batch-1 latency p50/p95 (ms) and batch throughput (images/s) of each predictor on same-size images, interleaved.

    Each iteration runs every backend once on the same image, rotating which backend goes first, so
    load from other processes and cache or frequency effects hit all backends alike.
    """
    names = list(predictors)
    for i in range(warmup):
        for name in names:
            predictors[name].predict_proba(images[i % len(images)])
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iterations):
        image = images[i % len(images)]
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            predictors[name].predict_proba(image)
            latencies[name].append((time.perf_counter() - start) * 1000)
        if progress:
            progress(i + 1, iterations)
    # Throughput: one call on a batch of images (the network's own batching), preprocessed per model.
    chosen = [images[i % len(images)] for i in range(batch)]
    stacks = {name: np.concatenate([preprocess_image(im, p.mean, p.std, p.stride) for im in chosen])
              for name, p in predictors.items()}
    batch_seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(max(3, iterations // 10)):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            predictors[name]._forward(stacks[name])  # the Predictor's batched forward pass
            batch_seconds[name].append(time.perf_counter() - start)
    return {name: {"latency_p50_ms": float(np.percentile(latencies[name], 50)),
                   "latency_p95_ms": float(np.percentile(latencies[name], 95)),
                   "throughput_ips": batch / float(np.median(batch_seconds[name]))} for name in names}


def bench_targets(folder: Path) -> list[tuple[str, str, str]]:
    """(label, backend, device) of every backend this run and machine can serve."""
    import torch

    targets = []
    for backend in available_backends(folder):
        if backend != "torch":
            targets.append((backend, backend, "cpu"))
            continue
        targets.append(("torch-cpu", "torch", "cpu"))
        if torch.cuda.is_available():
            targets.append(("torch-cuda", "torch", "cuda"))
    return targets


def benchmark(run: str | Path | None, data: str | Path | None = None, split: str = "test", size: int = BENCH_SIZE,
              iterations: int = 50, warmup: int = 5, progress: Progress | None = None) -> dict[str, Any]:
    """Size, batch-1 latency p50/p95, throughput and test Dice of every available backend of a run."""
    from engine.evaluate import select_samples

    if iterations < 1 or size < 16:
        raise EngineError("bench needs --iterations of at least 1 and --size of at least 16")
    folder = run_folder(run)
    with check_data(folder, data) as (dataset, note):
        try:
            samples = select_samples(dataset, split)
        except DatasetError:  # a shipped or generated check set is small: it may lack the split
            samples, split = select_samples(dataset, "all"), "all"
        result = _benchmark(folder, samples, size, iterations, warmup, progress or _no_progress)
    return {**result, "split": split, "check_data": note}


def _benchmark(folder: Path, samples: list[Sample], size: int, iterations: int, warmup: int,
               progress: Progress) -> dict[str, Any]:
    """benchmark once the run folder and the labelled samples are known."""
    import onnxruntime
    import torch

    from engine.evaluate import evaluate

    images = [_square(load_pair(s)[0], size) for s in samples[:16]]
    # The torch rows use the checkpoint the ONNX files were exported from, so every row is the same model.
    checkpoint = None
    if (folder / "export" / ONNX_FILES["onnx"]).is_file():
        name = Predictor(folder, backend="onnx").meta.get("checkpoint")
        checkpoint = folder / name if name and (folder / name).is_file() else None
    predictors = {label: Predictor(folder, backend=backend, device=device,
                                   path=checkpoint if backend == "torch" else None)
                  for label, backend, device in bench_targets(folder)}
    threshold = next(iter(predictors.values())).threshold  # one threshold, so Dice differences are the models'
    stage = f"timing {len(predictors)} backends at {size}x{size}"
    threads = torch.get_num_threads()
    torch.set_num_threads(config.cpu_threads())  # the same number of threads as ONNX Runtime sessions use
    try:
        timing = time_backends(predictors, images, iterations, warmup,
                               progress=lambda done, total: progress(stage, 0.05 + 0.55 * done / total))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for i, (label, predictor) in enumerate(predictors.items()):
        progress(f"test Dice of {label}", 0.6 + 0.4 * i / len(predictors))
        result = evaluate(predictor, samples, threshold)
        rows.append({"backend": label, "file": predictor.path.name, "epoch": predictor.epoch,
                     "size_bytes": predictor.path.stat().st_size, **timing[label], "dice": result["dice"],
                     "n_images": result["n_images"]})
    reference = next((r for r in rows if r["backend"] == "torch-cpu"), rows[0])
    for row in rows:
        row["latency_vs_torch"] = row["latency_p50_ms"] / reference["latency_p50_ms"]
        row["dice_drop"] = reference["dice"] - row["dice"]
    progress("done", 1.0)
    return {"run_id": predictors[next(iter(predictors))].run_id, "size": size,
            "iterations": iterations, "threshold": threshold, "machine": machine_description(),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "rows": rows}


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """The image resized to size x size (benchmark timings use one fixed input size)."""
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def bench_markdown(result: dict[str, Any]) -> str:
    """The benchmark as a markdown table, with the machine and settings above it."""
    lines = [f"Run `{result['run_id']}`, {result['size']}x{result['size']} batch-1 latency over "
             f"{result['iterations']} interleaved iterations, throughput at batch {THROUGHPUT_BATCH}, Dice on the "
             f"{result['split']} split ({result['rows'][0]['n_images']} images). Machine: {result['machine']}; "
             f"torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}. "
             f"Images: {result.get('check_data', 'the run dataset')}.",
             "",
             "| backend | file | size (MB) | p50 (ms) | p95 (ms) | p50 vs torch | throughput (img/s) | Dice "
             "| Dice drop |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['file']} | {r['size_bytes'] / 1e6:.2f} | {r['latency_p50_ms']:.1f} | "
                     f"{r['latency_p95_ms']:.1f} | {r['latency_vs_torch']:.2f}x | {r['throughput_ips']:.1f} | "
                     f"{r['dice']:.4f} | {r['dice_drop']:+.4f} |")
    return "\n".join(lines)
