"""Serving models: which backends a run has, the catalogue of servable runs, a thread-safe Predictor cache,
and the answer to one uploaded image (what the API and `predict` return)."""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from engine import config, runs
from engine.errors import EngineError, RunNotFound
from engine.imageio import MAX_PIXELS, decode_upload, encode_png
from engine.inference import BACKENDS, ONNX_FILES, Predictor
from engine.inspection import inspect
from engine.recipe import load_recipe


def available_backends(run_dir: Path) -> list[str]:
    """Backends a run can be served with right now: torch if it has a checkpoint, onnx/int8 if exported."""
    found = ["torch"] if (run_dir / "best.pth").is_file() or runs.epochs_saved(run_dir) else []
    return found + [name for name, file in ONNX_FILES.items() if (run_dir / "export" / file).is_file()]


def default_backend(run_dir: Path) -> str:
    """The fastest exported backend of a run: 'int8' if exported, else 'onnx' if exported, else 'torch'."""
    for name in ("int8", "onnx"):
        if (run_dir / "export" / ONNX_FILES[name]).is_file():
            return name
    return "torch"


def run_reference(run_dir: Path) -> str:
    """The name that resolves back to this run folder: 'demo' for the shipped demo, else the folder name."""
    return "demo" if run_dir.resolve() == config.DEMO_RUN_DIR.resolve() else run_dir.name


def model_catalog() -> list[dict[str, Any]]:
    """Every run folder with what it can serve: run, name, status, best epoch and Dice, threshold, backends."""
    catalog = []
    for folder in runs.list_run_dirs():
        try:
            info = runs.read_run_json(folder)
        except RunNotFound:
            continue  # a folder being written right now; it shows up on the next call
        backends = available_backends(folder)
        ready, reason = runs.readiness(info)
        catalog.append({
            "run": run_reference(folder), "name": info.get("name"), "status": info.get("status"),
            "best_epoch": info.get("best_epoch"), "best_dice": info.get("best_dice"),
            "threshold": info.get("threshold"), "backends": backends,
            "default_backend": default_backend(folder) if backends else None,
            "ready": ready, "ready_reason": reason, "not_ready_reason": reason,
        })
    return catalog


class PredictorCache:
    """Thread-safe LRU cache of Predictors keyed by (run folder, epoch, backend, model file mtime).

    Each model loads once even when many threads ask for it at the same moment; a checkpoint or export
    rewritten on disk (retraining, re-export) is picked up on the next request.
    """

    def __init__(self, max_items: int = 4, device: str = "cpu") -> None:
        self.max_items, self.device = max_items, device
        self._items: OrderedDict[tuple, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, run: str | None = "latest", epoch: int | str = "best", backend: str | None = None) -> Predictor:
        """Predictor for a run id, `demo` or `latest`; backend None picks default_backend(run)."""
        return self.get_for_dir(runs.resolve_run(run), epoch, backend)

    def get_for_dir(self, run_dir: Path, epoch: int | str = "best", backend: str | None = None) -> Predictor:
        """Predictor for a run folder, loaded at most once per (folder, epoch, backend, file version)."""
        backend = backend or default_backend(run_dir)
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        model_file = runs.checkpoint_path(run_dir, epoch) if backend == "torch" else run_dir / "export" / ONNX_FILES[backend]
        mtime = model_file.stat().st_mtime_ns if model_file.is_file() else 0
        key = (str(run_dir.resolve()), str(epoch), backend, mtime)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; other keys and cache hits are not blocked meanwhile
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                predictor = Predictor(run_dir, epoch, backend, self.device)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                stale = [k for k in self._items if k[:3] == key[:3]]  # older versions of the same model
                for old in stale:
                    del self._items[old]
                self._items[key] = predictor
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            return predictor

    def loaded(self) -> list[dict[str, Any]]:
        """describe() of every cached Predictor, most recently used last."""
        with self._lock:
            return [p.describe() for p in self._items.values()]


def predict_bytes(predictor: Predictor, data: bytes, name: str = "upload", threshold: float | None = None,
                  return_mask: bool = False, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Check and decode untrusted image bytes, predict at full resolution, and return the JSON-ready answer."""
    start = time.perf_counter()
    image, _ = decode_upload(data, name, max_pixels)
    decoded = time.perf_counter()
    recipe = load_recipe(predictor.run_dir)  # re-read each time: `tune` may have saved a new one
    if threshold is not None:
        recipe = recipe.with_overrides(threshold=threshold)
    prediction = predictor.predict(image, recipe.threshold)
    inspection = inspect(prediction.probability, recipe)
    answer: dict[str, Any] = {"model": predictor.describe(), **inspection.as_dict()}
    if return_mask:  # the counted regions, as in the batch report and on the pages
        answer["mask_png_base64"] = base64.b64encode(encode_png(inspection.mask * 255)).decode("ascii")
    answer["timings_ms"] = {"decode": round((decoded - start) * 1000, 2),
                            "inference": prediction.timings_ms["inference"],
                            "total": round((time.perf_counter() - start) * 1000, 2)}
    return answer
