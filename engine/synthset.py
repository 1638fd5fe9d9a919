"""Generated datasets on disk: many samples rendered in parallel, written atomically with their manifest, and
registered; the app's sample set."""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from engine import config
from engine.errors import EngineError
from engine.imageio import IMAGE_EXTENSIONS, write_png
from engine.progress import Progress
from engine.storage import atomic_write_text, check_replaceable, replace_folder, staged_folder
from engine.synth import Sample, SynthParams, render_sample, validate_params

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("id", "split", "defect_types", "defect_fraction", "seed")
POOL_MIN_COUNT = 64  # below this, starting worker processes costs more than it saves

def _image_seed(seed: int, index: int) -> int:
    """The seed of image `index` in a dataset: a 63-bit hash of (dataset seed, index)."""
    state = np.random.SeedSequence([int(seed) % 2**64, 1, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _layout(count: int, seed: int, defect_free: float) -> tuple[np.ndarray, list[str]]:
    """Which images are defect-free (exactly round(count * share)) and the stratified 80/10/10 split."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, 0]))
    free = np.zeros(count, dtype=bool)
    free[rng.permutation(count)[: int(round(count * defect_free))]] = True
    splits = ["train"] * count
    # Split defect-free and defective images separately so every split gets some of each.
    for group in (np.flatnonzero(free), np.flatnonzero(~free)):
        order = rng.permutation(group)
        n = len(order)
        n_holdout = max(1, int(round(0.1 * n))) if n >= 3 else 0
        for i in order[:n_holdout]:
            splits[i] = "val"
        for i in order[n_holdout : 2 * n_holdout]:
            splits[i] = "test"
    return free, splits


def _id_width(count: int) -> int:
    return max(6, len(str(count - 1)))


WRITE_THREADS = 4  # per process: PNG encode and fsync release the GIL, so writes overlap rendering


class _BatchRenderer:
    """Renders batches of images and writes their files, the writes on a few threads."""

    def __init__(self, out: Path, params: SynthParams, width: int) -> None:
        self.out, self.params, self.width = out, params, width
        self.executor = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="synth-write")

    def run(self, batch: list[tuple[int, int, bool]]) -> list[tuple[int, str, float]]:
        """Render and write each (index, seed, defect_free) task; return (index, types, defect fraction)."""
        futures: list[Future] = []
        results = []
        for index, seed, free in batch:
            image, mask, types = render_sample(seed, self.params, free)
            name = f"{index:0{self.width}d}.png"
            futures.append(self.executor.submit(write_png, self.out / "images" / name, image, False))
            if free:
                # A mask left from an earlier dataset in this folder would make this image "defective".
                futures.append(self.executor.submit((self.out / "masks" / name).unlink, missing_ok=True))
                fraction = 0.0
            else:
                futures.append(self.executor.submit(write_png, self.out / "masks" / name, mask, False))
                fraction = cv2.countNonZero(mask) / mask.size
            results.append((index, ";".join(types), fraction))
        for future in futures:
            future.result()  # re-raises a failed write here
        return results

    def close(self) -> None:
        self.executor.shutdown(wait=True)


_WORKER: _BatchRenderer | None = None  # one per pool process


def _init_worker(out: str, params: SynthParams, width: int) -> None:
    global _WORKER
    cv2.setNumThreads(1)  # the pool already uses every core; OpenCV threads would only contend
    _WORKER = _BatchRenderer(Path(out), params, width)


def _run_batch(batch: list[tuple[int, int, bool]]) -> list[tuple[int, str, float]]:
    assert _WORKER is not None, "pool worker not initialised"
    return _WORKER.run(batch)


# Threads known to sit idle holding nothing a worker needs (tqdm's bar monitor, used by the CLI).
_IDLE_THREADS = frozenset({"tqdm_monitor"})


def _os_threads() -> int:
    """Threads of this process as the OS sees them (Python and native); -1 where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork when safe (starts in ms), else spawn (~0.5 s: each worker imports numpy and OpenCV)."""
    # Forking while other threads run (Streamlit sessions, servers) can deadlock the child on a lock
    # some thread held at the time of the fork.
    # Native threads count too: once OpenCV or OpenMP have started their pools in this process (a test
    # session, a page that trained or inspected), a forked worker hangs in cv2.setNumThreads.
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if (sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
            and all(t.name in _IDLE_THREADS for t in others) and _os_threads() == len(others) + 1):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _render_all(out: Path, params: SynthParams, width: int, tasks: list[tuple[int, int, bool]],
                workers: int | None, progress: Progress | None) -> list[tuple[int, str, float]]:
    """Render and write every (index, seed, defect-free) task, in a process pool when there are enough;
    returns (index, defect types, defect fraction) per image."""
    count = len(tasks)
    workers = max(1, int(workers if workers is not None else config.cpu_threads()))
    workers = min(workers, max(1, count // 16))
    chunk = int(min(32, max(4, count // (workers * 8))))
    batches = [tasks[i : i + chunk] for i in range(0, count, chunk)]
    results: list[tuple[int, str, float]] = []

    def collect(done_batches: Iterable[list[tuple[int, str, float]]]) -> None:
        for done in done_batches:
            results.extend(done)
            if progress:
                progress(len(results), count, "images")

    if workers > 1 and count >= POOL_MIN_COUNT:
        with _pool_context().Pool(workers, initializer=_init_worker, initargs=(str(out), params, width)) as pool:
            collect(pool.imap(_run_batch, batches))
    else:
        renderer = _BatchRenderer(out, params, width)
        try:
            collect(map(renderer.run, batches))
        finally:
            renderer.close()
    return results


def generate_dataset(
    out: str | Path,
    count: int,
    seed: int = 0,
    params: SynthParams | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write DIR/images/<id>.png, DIR/masks/<id>.png (only for defective images), DIR/manifest.csv; return counts."""
    params = params or SynthParams()
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise EngineError(f"count must be an integer >= 1, got {count!r}")
    validate_params(params)
    started = time.perf_counter()
    out = Path(out)
    check_replaceable(out, MANIFEST_COLUMNS, "generate")
    free, splits = _layout(count, seed, params.defect_free)
    seeds = [_image_seed(seed, i) for i in range(count)]
    tasks = [(i, seeds[i], bool(free[i])) for i in range(count)]
    width = _id_width(count)
    # Built whole in a hidden folder beside `out`, then swapped in: a failure leaves `out` as it was.
    with staged_folder(out) as tmp:
        try:
            (tmp / "images").mkdir()
            (tmp / "masks").mkdir()
            results = _render_all(tmp, params, width, tasks, workers, progress)
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for index, types, fraction in results:
                writer.writerow([f"{index:0{width}d}", splits[index], types, f"{fraction:.5f}", seeds[index]])
            atomic_write_text(tmp / "manifest.csv", buffer.getvalue())
        except OSError as err:
            raise EngineError(f"cannot write the dataset to {out}: {err.strerror or err}") from err
        replace_folder(tmp, out)

    n_free = int(free.sum())
    return {
        "out": str(out),
        "images": count,
        "defective": count - n_free,
        "defect_free": n_free,
        "seconds": round(time.perf_counter() - started, 3),
        "per_split": {s: splits.count(s) for s in SPLITS},
    }


def splits_text(per_split: dict[str, int]) -> str:
    """A generated set's images per split, for people: 'train 700, val 150, test 150'."""
    return ", ".join(f"{split} {count}" for split, count in per_split.items())


def preview(params: SynthParams, n: int = 6, seed: int = 0) -> list[Sample]:
    """Render n samples in memory (nothing written) for the UI preview."""
    if n < 1:
        raise EngineError(f"preview needs n >= 1, got {n!r}")
    validate_params(params)
    free, _ = _layout(n, seed, params.defect_free)
    # The same seeds and layout as generate_dataset(count=n, seed=seed): the preview is that dataset.
    return [render_sample(_image_seed(seed, i), params, bool(free[i])) for i in range(n)]


def ensure_sample_folder(path: Path | str | None = None, count: int = 24) -> Path:
    """Create the default sample folder (data/procedural_images) if missing or empty; return it."""
    path = Path(path) if path is not None else config.SAMPLE_DIR
    images = path / "images"
    has_images = images.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in images.iterdir())
    if not has_images:
        generate_dataset(path, count, seed=0, workers=1)
    return path


_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def dataset_dir(name: str) -> Path:
    """Folder for a new dataset called `name` under config.DATA_DIR; EngineError for an unusable name."""
    name = (name or "").strip()
    if not _DATASET_NAME.match(name) or name in (".", ".."):
        raise EngineError(f"dataset name {name!r} is not usable; use 1-64 letters, digits, '-', '_' or '.'")
    return config.DATA_DIR / name


def generate_and_register(
    out: str | Path,
    count: int,
    seed: int = 0,
    params: SynthParams | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    source: str = "generated",
) -> dict:
    """generate_dataset, then record the folder in the registry (name, content hash, counts); returns the counts."""
    from engine.data import (
        register_dataset,  # data imports torch; keep plain generation light
    )

    params = params or SynthParams()
    result = generate_dataset(out, count, seed=seed, params=params, workers=workers, progress=progress)
    details = {"seed": seed, "size": params.size, "defect_free": params.defect_free,
               "difficulty": params.difficulty, "tint": params.tint, "defect_weights": params.defect_weights}
    result["dataset"] = register_dataset(out, source=source, details=details)
    return result


def ensure_sample_dataset(path: Path | str | None = None) -> Path:
    """ensure_sample_folder, and make sure the registry lists the sample folder; return it."""
    from engine import registry

    path = ensure_sample_folder(path)
    resolved = str(path.resolve())
    if not any(dataset.path == resolved for dataset in registry.list_datasets()):
        from engine.data import register_dataset

        register_dataset(path, source="sample", details={"seed": 0})
    return path
