"""Serving models: which backends a run has, the catalogue of servable runs, a thread-safe Predictor cache,
and the answer to one uploaded image (what the API and `predict` return)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import config, readiness, runs
from engine.cpuflags import cpu_flags
from engine.errors import EngineError, GateFailed, RunNotFound
from engine.gates import read_export_report, verdicts
from engine.imageio import MAX_PIXELS, decode_upload, encode_png
from engine.inference import OPENVINO_PRECISION, Predictor, model_file, openvino_available
from engine.inspector import Inspector
from engine.recipe import verdict_threshold
from engine.runfolder import BACKENDS, MODEL_FILES, RunFolder
from engine.storage import file_version

AUTO = "auto"
# Most exact first: auto takes the fastest backend, unless one higher in this list is within AUTO_MARGIN of it.
EXACTNESS = ("onnx", "openvino", "openvino-bf16", "int8", "openvino-int8")
AUTO_MARGIN = 0.10
AUTO_SIZE, AUTO_ROUNDS = 256, 12


def available_backends(run_dir: Path) -> list[str]:
    """Backends a run can be served with right now: torch if it has a checkpoint, the others if exported
    (and, for OpenVINO, installed)."""
    found = ["torch"] if RunFolder(run_dir).best.is_file() or runs.epochs_saved(run_dir) else []
    return found + [name for name, file in MODEL_FILES.items() if RunFolder(run_dir).exported(file).is_file()
                    and (name not in OPENVINO_PRECISION or openvino_available())]


def stale_export(run_dir: Path) -> str | None:
    """Why a run's export no longer holds its best epoch (a resume found a better one), or None when it does or
    there is no export report to tell."""
    try:
        exported = json.loads(RunFolder(run_dir).report.read_text()).get("epoch")
        best = runs.read_record(run_dir).best_epoch
    except (OSError, ValueError, AttributeError, EngineError):
        return None
    if exported is None or best is None or int(exported) == int(best):
        return None
    return (f"the export holds epoch {exported} but the best epoch is now {best}; export again "
            f"(`python -m engine export --run {run_dir.name}`)")


def gated_backends(run_dir: Path) -> list[str]:
    """Exported backends that passed their accuracy gate on this CPU for the exported epoch, most exact first.

    The gate recorded in export/report.json holds where the CPU flags match; elsewhere (another CPU family, or
    an export from before the flags were recorded) the backend is re-checked here once (engine.gates).
    """
    return [name for name, verdict in backend_verdicts(run_dir).items() if verdict.accepted]


def backend_verdicts(run_dir: Path, measure: bool = True) -> dict[str, Any]:
    """engine.gates.Verdict of every exported backend available here, most exact first (empty where a re-check
    would be due and `measure` is False)."""
    available = available_backends(run_dir)
    return verdicts(run_dir, [name for name in EXACTNESS if name in available], measure) or {}


def refusals(run_dir: Path) -> dict[str, str]:
    """Why each exported backend that is not served here is refused: a failed gate or re-check, or an INT8 file
    the gate did not keep."""
    refused = {name: verdict.reason for name, verdict in backend_verdicts(run_dir).items() if not verdict.accepted}
    gate = (read_export_report(run_dir) or {}).get("gate") or {}
    if gate.get("accepted") is False and not model_file(run_dir, "int8").is_file():
        for name in ("int8", "openvino-int8"):
            refused.setdefault(name, f"{gate.get('message', 'INT8 REJECTED by its accuracy gate')} (at export)")
    return refused


def refuse_failed_gate(run_dir: Path, backend: str) -> None:
    """GateFailed when a backend named explicitly failed its accuracy gate on this machine: which gate, by how
    much, and what `auto` serves instead."""
    if backend == "torch" or not (model_file(run_dir, backend).is_file() or backend in ("int8", "openvino-int8")):
        return
    reason = refusals(run_dir).get(backend)
    if reason is None:
        return
    choice = auto_backend(run_dir)
    instead = choice.backend if choice else "torch"
    p50 = choice_p50(run_dir, choice) if choice else None
    speed = f", {p50:.1f} ms p50 at {AUTO_SIZE}x{AUTO_SIZE} here" if p50 is not None else ""
    raise GateFailed(f"backend {backend} is not served for run {run_reference(run_dir)}: {reason}; `auto` serves "
                     f"{instead} instead{speed}")


@dataclass(frozen=True)
class BackendChoice:
    """What `auto` serves for a run on this machine, and the batch-1 latencies it was picked on."""

    backend: str
    p50_ms: dict[str, float]
    rule: str
    refused: dict[str, str] = field(default_factory=dict)  # exported backends not served here, and why

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for /health and the Export page)."""
        return asdict(self)


def choice_p50(run_dir: Path, choice: BackendChoice) -> float | None:
    """Batch-1 p50 (ms, AUTO_SIZE) of auto's pick on this machine: as auto timed it, else as the export timed it
    when it ran on a CPU with the same flags (None otherwise)."""
    if choice.backend in choice.p50_ms:
        return choice.p50_ms[choice.backend]
    report = read_export_report(run_dir) or {}
    if report.get("cpu_flags") != cpu_flags():
        return None
    timed = [a["metrics"].get("latency_p50_ms") for a in report.get("artifacts", [])
             if isinstance(a, dict) and a.get("kind") == choice.backend and isinstance(a.get("metrics"), dict)]
    return next((value for value in timed if isinstance(value, (int, float))), None)


_choices: dict[tuple, BackendChoice] = {}
_choices_lock = threading.Lock()


def auto_backend(run_dir: Path, measure: bool = True) -> BackendChoice | None:
    """The backend `auto` serves for a run: the fastest that passed the accuracy gate, timed once per process and
    export on this machine (a few seconds); None when it would have to measure and `measure` is False."""
    stale = stale_export(run_dir)
    if stale:  # serving the export would answer with another model than the run's best
        return BackendChoice("torch", {}, f"the best checkpoint: {stale}")
    available = [name for name in EXACTNESS if name in available_backends(run_dir)]
    if available and verdicts(run_dir, available, measure) is None:
        return None  # a re-check is due on this CPU, and the caller must not wait for it
    candidates, refused = gated_backends(run_dir), refusals(run_dir)
    if len(candidates) <= 1:
        only = candidates[0] if candidates else "torch"
        return BackendChoice(only, {}, "the only exported backend" if candidates else "nothing exported", refused)
    key = (str(run_dir.resolve()), tuple((name, file_version(model_file(run_dir, name))) for name in candidates))
    with _choices_lock:
        if key in _choices or not measure:
            return _choices.get(key)
        _choices[key] = choice = measure_backends(run_dir, candidates, refused)
        return choice


def measure_backends(run_dir: Path, candidates: list[str], refused: dict[str, str] | None = None) -> BackendChoice:
    """Batch-1 latency of each candidate at AUTO_SIZE, interleaved; the fastest wins unless a more exact
    backend is within AUTO_MARGIN of it (noise must not trade accuracy for nothing). ONNX Runtime fp32 comes
    first in EXACTNESS, so the pick is never slower than it: INT8 that is no faster on this CPU is not served."""
    batch = np.random.default_rng(0).standard_normal((1, 1, AUTO_SIZE, AUTO_SIZE)).astype(np.float32)
    predictors = {name: Predictor(run_dir, backend=name) for name in candidates}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(AUTO_ROUNDS + 2):
        for name in candidates[round_ % len(candidates):] + candidates[: round_ % len(candidates)]:
            start = time.perf_counter()
            predictors[name].forward_batch(batch)
            if round_ >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start) * 1000)
    p50 = {name: round(float(np.median(values)), 2) for name, values in times.items()}
    fastest = min(p50.values())
    picked = next(name for name in candidates if p50[name] <= fastest * (1 + AUTO_MARGIN))
    return BackendChoice(picked, p50, f"fastest of the gated backends at {AUTO_SIZE}x{AUTO_SIZE}, batch 1, "
                                      f"unless a more exact one is within {AUTO_MARGIN:.0%}", refused or {})


def default_backend(run_dir: Path) -> str:
    """The backend served when none is named: auto's pick (measured on first use), torch when nothing is exported."""
    choice = auto_backend(run_dir)
    return choice.backend if choice else "torch"


def resolve_backend(run_dir: Path, epoch: int | str = "best", backend: str | None = AUTO) -> str:
    """A backend name, with None or `auto` replaced by default_backend (torch for an epoch other than the best:
    an export holds one epoch)."""
    if backend in (None, AUTO):
        return default_backend(run_dir) if str(epoch) == "best" else "torch"
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend '{backend}'; choose one of {', '.join((AUTO, *BACKENDS))}")
    refuse_failed_gate(run_dir, backend)
    return backend


def open_predictor(run: str | None = "latest", epoch: int | str = "best", backend: str | None = AUTO,
                   device: str = "cpu") -> Predictor:
    """A Predictor for a run id, `demo` or `latest`, with `auto` resolved (what the CLI serves with)."""
    run_dir = runs.resolve_run(run)
    return Predictor(run_dir, epoch, resolve_backend(run_dir, epoch, backend), device)


def run_reference(run_dir: Path) -> str:
    """The name that resolves back to this run folder: 'demo' for the shipped demo, else the folder name."""
    return "demo" if run_dir.resolve() == config.DEMO_RUN_DIR.resolve() else run_dir.name


def serving_warning(predictor: Predictor) -> str | None:
    """What a verdict of this model does not vouch for, in one line: a run not ready, or the demo (trained on
    generated images, not on the user's parts; with the user's newest run and why it is not the one answering)."""
    if not predictor.ready:
        return (f"run {run_reference(predictor.run_dir)} is not ready ({predictor.ready_reason}); its verdicts are "
                "not validated for use on a line")
    if run_reference(predictor.run_dir) != "demo":
        return None
    newest = runs.newer_not_ready(predictor.run_dir)
    mine = (f"; your newest run {newest[0]} is not ready ({newest[1]})" if newest
            else "; train one on your own images with `python -m engine train --data DIR`")
    return f"answered by the demo model, trained on generated images only, not on your parts{mine}"


def model_catalog() -> list[dict[str, Any]]:
    """Every run folder with what it can serve: run, name, status, best epoch and Dice, threshold, backends."""
    catalog = []
    for folder in runs.list_run_dirs():
        try:
            record = runs.read_record(folder)
        except RunNotFound:
            continue  # a folder being written right now; it shows up on the next call
        backends = available_backends(folder)
        choice = auto_backend(folder, measure=False)  # listing many runs must not time each of them
        catalog.append({
            "run": run_reference(folder), "name": record.name, "status": record.status,
            "best_epoch": record.best_epoch, "best_dice": record.best_dice,
            "threshold": verdict_threshold(folder, record.threshold), "backends": backends,
            "default_backend": (choice.backend if choice else AUTO) if backends else None,
            **readiness.served(record).model_dump(),
        })
    return catalog


class PredictorCache:
    """Thread-safe LRU cache of Predictors keyed by (run folder, epoch, backend, model file version).

    Each model loads once even when many threads ask for it at the same moment; a checkpoint or export
    rewritten on disk (retraining, re-export) is picked up on the next request.
    """

    def __init__(self, max_items: int = 4, device: str = "cpu") -> None:
        self.max_items, self.device = max_items, device
        self._items: OrderedDict[tuple, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, run: str | None = "latest", epoch: int | str = "best", backend: str | None = None) -> Predictor:
        """Predictor for a run id, `demo` or `latest`; backend None or `auto` picks default_backend(run)."""
        return self.get_for_dir(runs.resolve_run(run), epoch, backend)

    def get_for_dir(self, run_dir: Path, epoch: int | str = "best", backend: str | None = None) -> Predictor:
        """Predictor for a run folder, loaded at most once per (folder, epoch, backend, file version)."""
        backend = resolve_backend(run_dir, epoch, backend)
        path = model_file(run_dir, backend, epoch)
        version = file_version(path) if path.is_file() else None
        key = (str(run_dir.resolve()), str(epoch), backend, version)
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
    # The run's recipe as it is now (`tune` may have saved a new one), at the threshold asked for.
    prediction, inspection = Inspector(predictor).inspect(image, threshold)
    answer: dict[str, Any] = {"model": predictor.describe(), "warning": serving_warning(predictor),
                              **inspection.as_dict()}
    if return_mask:  # the counted regions, as in the batch report and on the pages
        answer["mask_png_base64"] = base64.b64encode(encode_png(inspection.mask * 255)).decode("ascii")
    answer["timings_ms"] = {"decode": round((decoded - start) * 1000, 2),
                            "inference": prediction.timings_ms["inference"],
                            "total": round((time.perf_counter() - start) * 1000, 2)}
    return answer
