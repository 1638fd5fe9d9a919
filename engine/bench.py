"""Benchmark a run's backends side by side: size, batch-1 latency, batch throughput and Dice, on one machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine import config
from engine.checkdata import NO_DEFECT_NOTE, check_data, run_folder
from engine.compute import preset_costs
from engine.cpuflags import cpu_flags, cpu_model
from engine.data import Sample, load_pair
from engine.errors import DatasetError, EngineError
from engine.inference import Predictor, preprocess_image
from engine.progress import Progress, part, silent
from engine.recipe import load_recipe
from engine.runfolder import ONNX_FILES, RunFolder
from engine.serving import available_backends, gated_backends, refusals

BENCH_SIZE = 256
THROUGHPUT_BATCH = 8
PRESET_CROP = 192  # the training crop the presets are costed at where a run does not say its own
PRESET_SECONDS = 2.0  # each preset's training speed is timed this long at FULL_ROUNDS rounds, in proportion below
FULL_ROUNDS = 50


def machine_description() -> str:
    """CPU model, the flags that change INT8/bf16 numerics, thread count (and GPU, if any), for benchmark records."""
    import torch

    text = f"{cpu_model()} ({' '.join(cpu_flags()) or 'no AVX2'}), {config.cpu_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def time_backends(predictors: dict[str, Predictor], images: list[np.ndarray], iterations: int = 50,
                  warmup: int = 5, batch: int = THROUGHPUT_BATCH,
                  progress: Progress | None = None) -> dict[str, dict[str, float]]:
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
            progress(i + 1, iterations, "rounds")
    # Throughput: one call on a batch of images (the network's own batching), preprocessed per model.
    chosen = [images[i % len(images)] for i in range(batch)]
    stacks = {name: np.concatenate([preprocess_image(im, p.mean, p.std, p.stride) for im in chosen])
              for name, p in predictors.items()}
    batch_seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(max(3, iterations // 10)):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            predictors[name].forward_batch(stacks[name])
            batch_seconds[name].append(time.perf_counter() - start)
    return {name: {"latency_p50_ms": float(np.percentile(latencies[name], 50)),
                   "latency_p95_ms": float(np.percentile(latencies[name], 95)),
                   "throughput_ips": batch / float(np.median(batch_seconds[name]))} for name in names}


def bench_targets(folder: Path) -> list[tuple[str, str, str]]:
    """(label, backend, device) of every backend this run and machine serve: torch, and the exported backends
    that passed their accuracy gate on this CPU (as for `auto`, `predict` and the API)."""
    import torch

    targets = []
    for backend in [name for name in available_backends(folder) if name == "torch"] + gated_backends(folder):
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
    with check_data(folder, data) as (dataset, note, _):
        try:
            samples = select_samples(dataset, split)
        except DatasetError:  # a shipped or generated check set is small: it may lack the split
            samples, split = select_samples(dataset, "all"), "all"
        result = _benchmark(folder, samples, size, iterations, warmup, progress or silent)
    if not any(s.defective for s in samples):
        note = f"{note}; {NO_DEFECT_NOTE}"
    return {**result, "split": split, "check_data": note}


def _benchmark(folder: Path, samples: list[Sample], size: int, iterations: int, warmup: int,
               progress: Progress) -> dict[str, Any]:
    """benchmark once the run folder and the labelled samples are known."""
    import onnxruntime
    import torch

    from engine.evaluate import evaluate
    from engine.inference import openvino_available

    images = [square_image(load_pair(s)[0], size) for s in samples[:16]]
    # The torch rows use the checkpoint the ONNX files were exported from, so every row is the same model.
    checkpoint = None
    if RunFolder(folder).exported(ONNX_FILES["onnx"]).is_file():
        name = Predictor(folder, backend="onnx").meta.get("checkpoint")
        checkpoint = folder / name if name and (folder / name).is_file() else None
    predictors = {label: Predictor(folder, backend=backend, device=device,
                                   path=checkpoint if backend == "torch" else None)
                  for label, backend, device in bench_targets(folder)}
    # Dice under the run's recipe (threshold and minimum region), as export's gate, evaluate and inspect measure it;
    # one recipe for every row, so Dice differences are the models'.
    recipe = load_recipe(folder)
    stage = f"timing {len(predictors)} backends at {size}x{size}"
    threads = torch.get_num_threads()
    torch.set_num_threads(config.cpu_threads())  # the same number of threads as ONNX Runtime sessions use
    try:
        timing = time_backends(predictors, images, iterations, warmup,
                               progress=part(progress, 0.05, 0.55, f"{stage}: "))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for i, (label, predictor) in enumerate(predictors.items()):
        progress(0.6 + 0.4 * i / len(predictors), 1.0, f"test Dice of {label}")
        result = evaluate(predictor, samples)
        rows.append({"backend": label, "file": predictor.path.name, "epoch": predictor.epoch,
                     "size_bytes": predictor.path.stat().st_size, **timing[label], "dice": result["dice"],
                     "n_images": result["n_images"]})
    reference = next((r for r in rows if r["backend"] == "torch-cpu"), rows[0])
    onnx = next((r for r in rows if r["backend"] == "onnx"), None)
    for row in rows:
        row["latency_vs_torch"] = row["latency_p50_ms"] / reference["latency_p50_ms"]
        row["latency_vs_onnx"] = row["latency_p50_ms"] / onnx["latency_p50_ms"] if onnx else None
        row["dice_drop"] = reference["dice"] - row["dice"]
    progress(1.0, 1.0, "costing the presets")
    presets = preset_costs(train_crop(folder), seconds=PRESET_SECONDS * min(1.0, iterations / FULL_ROUNDS))
    progress(1.0, 1.0, "done")
    return {"run_id": predictors[next(iter(predictors))].run_id, "size": size, "presets": presets,
            "iterations": iterations, "threshold": recipe.threshold, "min_region_px": recipe.min_region_px,
            "machine": machine_description(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
            "refused": refusals(folder),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "openvino": _openvino_version() if openvino_available() else None},
            "rows": rows}


def train_crop(folder: Path) -> int:
    """The training crop of a run (run.json), else PRESET_CROP."""
    from engine.runs import read_record

    try:
        return int(read_record(folder).param("crop") or PRESET_CROP)
    except (EngineError, TypeError, ValueError):
        return PRESET_CROP


def _openvino_version() -> str:
    """The installed OpenVINO release."""
    from engine.inference import import_openvino

    return import_openvino().__version__


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """The image resized to size x size (benchmark timings use one fixed input size)."""
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def bench_markdown(result: dict[str, Any]) -> str:
    """The benchmark as a markdown table, with the machine and settings above it."""
    lines = [f"Run `{result['run_id']}`, {result['size']}x{result['size']} batch-1 latency over "
             f"{result['iterations']} interleaved iterations, throughput at batch {THROUGHPUT_BATCH}, Dice on the "
             f"{result['split']} split ({result['rows'][0]['n_images']} images) under the run's recipe (threshold "
             f"{result['threshold']:.2f}, minimum region {result.get('min_region_px', 0)} px). Machine: {result['machine']}; "
             f"torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}"
             f"{', openvino ' + result['versions']['openvino'] if result['versions'].get('openvino') else ''}. "
             f"Images: {result.get('check_data', 'the run dataset')}.",
             "",
             "| backend | file | size (MB) | p50 (ms) | p95 (ms) | p50 vs torch | p50 vs onnx | throughput (img/s) "
             "| Dice | Dice drop |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        vs_onnx = "-" if r.get("latency_vs_onnx") is None else f"{r['latency_vs_onnx']:.2f}x"
        lines.append(f"| {r['backend']} | {r['file']} | {r['size_bytes'] / 1e6:.2f} | {r['latency_p50_ms']:.1f} | "
                     f"{r['latency_p95_ms']:.1f} | {r['latency_vs_torch']:.2f}x | {vs_onnx} | "
                     f"{r['throughput_ips']:.1f} | {r['dice']:.4f} | {r['dice_drop']:+.4f} |")
    lines += [f"\nNot served on this CPU, so not timed: {reason}" for reason in result.get("refused", {}).values()]
    return "\n".join(lines + preset_lines(result.get("presets") or []))


def preset_lines(presets: list[dict[str, Any]]) -> list[str]:
    """The presets' training cost as markdown: GFLOP per crop (forward + backward) and the speed each reaches here."""
    if not presets:
        return []
    lines = ["", f"Training cost of each preset at the run's crop (rounded up to the preset's stride), forward + "
             f"backward, {presets[0]['precision']} (what `train` picks here), on an in-memory batch:", "",
             "| preset | base | depth | resolution | parameters | crop | GFLOP per crop | crops/s | GFLOP/s |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in presets:
        resolution = "half" if p.get("stem", 1) == 2 else "full"
        lines.append(f"| {p['preset']} | {p['base']} | {p['depth']} | {resolution} | {p['parameters']:,} | {p['crop']} | "
                     f"{p['gflop_per_crop']:.2f} | {p['crops_per_s']:.1f} | {p['gflop_per_s']:.0f} |")
    return lines
