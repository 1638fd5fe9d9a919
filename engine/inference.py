"""Inference: one Predictor for torch, ONNX Runtime and OpenVINO models, and tiling for large images."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from engine import config, readiness, runs
from engine.errors import EngineError, RunNotFound
from engine.imageio import to_gray_float
from engine.model import load_checkpoint
from engine.progress import Progress
from engine.runfolder import BACKENDS, MODEL_FILES, RunFolder
from engine.storage import file_version

OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32"}
OPENVINO_SHAPES = 8  # input shapes kept compiled per OpenVINO model
TILE = 512  # images with a side above TILE_ABOVE are processed in overlapping tiles of this size
TILE_OVERLAP = 96  # measured: 64 leaves seams up to 0.16 in probability, 96 under 0.06
TILE_ABOVE = 1024


@dataclass
class Prediction:
    """The model's output for one image; the verdict and its regions come from inspection.inspect alone."""

    probability: np.ndarray  # float32 HxW in [0, 1]
    threshold: float
    min_region_px: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """Binary defect mask (uint8 0/1) at the threshold."""
        return (self.probability >= self.threshold).astype(np.uint8)

    @property
    def defect_fraction(self) -> float:
        """Share of pixels at or above the threshold."""
        return float(self.mask.mean())

    @property
    def max_score(self) -> float:
        """Highest defect probability in the image."""
        return float(self.probability.max())


class Predictor:
    """A trained model behind one interface, whatever the backend: torch (cpu/cuda), ONNX fp32 or INT8."""

    def __init__(self, run_dir: Path, epoch: int | str = "best", backend: str = "torch", device: str = "cpu",
                 path: Path | None = None) -> None:
        """`path` overrides the model file (export checks a candidate .onnx with it before keeping it)."""
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda asked for, but no CUDA GPU is available; use cpu")
        self.run_dir, self.backend, self.device = run_dir, backend, device
        record = runs.read_record(run_dir)
        self.run_id = record.run_id or run_dir.name
        self.readiness = readiness.served(record)
        if backend == "torch":
            path = Path(path) if path is not None else runs.checkpoint_path(run_dir, epoch)
            self.model, meta = load_checkpoint(path, device)
            self.stride = self.model.stride
            self._runner = None
        else:
            path = Path(path) if path is not None else model_file(run_dir, backend)
            if not path.is_file():
                raise RunNotFound(f"run {self.run_id} has no {backend} export; run `python -m engine export --run "
                                  f"{self.run_id}{' --int8' if backend.endswith('int8') else ''}` first")
            if backend in OPENVINO_PRECISION:
                self._runner = openvino_model(str(path), file_version(path), OPENVINO_PRECISION[backend])
            else:
                self._runner = OnnxRuntimeModel(onnx_session(str(path), file_version(path)))
            meta = onnx_metadata(path)
            self.stride = int(meta.get("stride", 16))
            self.model = None
        self.path = path
        self.epoch = meta.get("epoch")
        self.mean = float(meta["normalisation"]["mean"])
        self.std = float(meta["normalisation"]["std"])
        self.threshold = float(meta.get("threshold", 0.5))
        self.scale = float(meta.get("scale", 1.0))  # the model works on images resized by this factor
        self.meta = meta

    @property
    def ready(self) -> bool:
        """Whether the run is ready to serve (readiness.served)."""
        return self.readiness.ready

    @property
    def ready_reason(self) -> str | None:
        """Why the run is not ready; None when it is."""
        return self.readiness.ready_reason

    @classmethod
    def from_run(cls, run: str | None = "latest", epoch: int | str = "best", backend: str = "torch",
                 device: str = "cpu") -> "Predictor":
        """Predictor for a run id, `demo` or `latest`."""
        return cls(runs.resolve_run(run), epoch, backend, device)

    def describe(self) -> dict[str, Any]:
        """Which model this is: run, epoch, backend, and whether the run is ready to serve (and if not, why; if only
        provisionally, what its validation was too small to show)."""
        return {"run": self.run_id, "epoch": self.epoch, "backend": self.backend, "device": self.device,
                **self.readiness.model_dump()}

    def forward_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a normalised NCHW float32 batch whose sides are multiples of the stride
        (preprocess_image makes one image's); benchmarks time the network's own batching with it."""
        if self._runner is not None:
            return 1.0 / (1.0 + np.exp(-self._runner(batch)))
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return torch.sigmoid(self.model(x)).float().cpu().numpy()

    def _whole(self, image: np.ndarray) -> np.ndarray:
        """Probabilities for one normalised image: pad to the stride, run, crop back."""
        height, width = image.shape
        return self.forward_batch(pad_to_multiple(image, self.stride)[None, None])[0, 0, :height, :width]

    def predict_proba(self, image: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """Defect probability per pixel for an image of any size (large images in blended tiles).

        progress(done, total, "tiles") is called after each tile of a large image (pages show it).
        """
        gray = image if image.ndim == 2 and image.dtype == np.float32 else to_gray_float(image)
        height, width = gray.shape
        if self.scale != 1.0:
            size = (max(1, round(width * self.scale)), max(1, round(height * self.scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        x = (gray - self.mean) / self.std
        if max(x.shape) <= TILE_ABOVE:
            probability = self._whole(x)
        else:
            probability = predict_tiled(self._whole, x, TILE, TILE_OVERLAP, self.stride, progress)
        if probability.shape != (height, width):
            probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
        return probability

    def predict(self, image: np.ndarray, threshold: float | None = None, min_region_px: int = 0) -> Prediction:
        """Run the model on one image and return its Prediction."""
        start = time.perf_counter()
        probability = self.predict_proba(image)
        elapsed = (time.perf_counter() - start) * 1000
        return Prediction(probability, self.threshold if threshold is None else float(threshold), min_region_px,
                          {"inference": round(elapsed, 2)})


def tile_weights(start: int, length: int, total: int, overlap: int) -> np.ndarray:
    """1-D blending weights of a tile along one axis: 0 over the outer quarter of the overlap, then a linear ramp.

    Only edges inside the image are ramped; an edge on the image border keeps full weight, as whole-image
    inference has the same border. The outermost pixels of an inner edge see the least context, so they
    are dropped (weight 0) rather than merely down-weighted; a neighbouring tile always covers them.
    """
    trim = overlap // 4
    index = np.arange(length, dtype=np.float32)
    distance = np.full(length, np.inf, np.float32)
    if start > 0:
        distance = np.minimum(distance, index)
    if start + length < total:
        distance = np.minimum(distance, length - 1 - index)
    return np.clip((distance - trim + 1) / max(overlap - 2 * trim, 1), 0.0, 1.0).astype(np.float32)


def tile_size(length: int, tile: int, overlap: int, stride: int = 1) -> int:
    """Tile length along one axis: at most `tile`, shrunk so the needed number of tiles overlap evenly.

    A 1000-pixel side needs three 512-pixel tiles anyway; three of ~380 pixels cover it with the same
    overlap and a quarter less compute.
    """
    if length <= tile:
        return tile
    count = -(-(length - overlap) // (tile - overlap))
    even = -(-(length + (count - 1) * overlap) // count)
    return min(tile, -(-even // stride) * stride + stride)  # one stride of slack for the aligned starts


def tile_starts(length: int, tile: int, overlap: int, stride: int = 1) -> list[int]:
    """Start offsets of tiles covering [0, length), each sharing at least `overlap` pixels with the next.

    Starts are multiples of `stride`, so every tile sees the same pooling grid as whole-image inference;
    the last tile may then be up to stride-1 pixels shorter than `tile`.
    """
    if not 0 <= overlap < tile or tile < stride:
        raise ValueError(f"tiling needs 0 <= overlap < tile and tile >= stride (tile {tile}, overlap {overlap}, "
                         f"stride {stride})")
    if length <= tile:
        return [0]
    step = (tile - overlap) // stride * stride
    if step < stride:
        raise ValueError(f"tile {tile} minus overlap {overlap} must be at least the stride {stride}")
    last = -(-(length - tile) // stride) * stride  # round up to the stride
    return list(range(0, last, step)) + [last]


def predict_tiled(run_whole: Callable[[np.ndarray], np.ndarray], image: np.ndarray, tile: int = TILE,
                  overlap: int = TILE_OVERLAP, stride: int = 1,
                  progress: Progress | None = None) -> np.ndarray:
    """Probabilities from overlapping, stride-aligned tiles blended with edge weights.

    run_whole maps a 2-D patch to its probabilities; it only ever sees patches of at most tile x tile,
    so model memory is bounded by the tile; this function adds two float32 maps of the image size.
    """
    height, width = image.shape
    total = np.zeros((height, width), np.float32)
    weight_sum = np.zeros((height, width), np.float32)
    tile_h, tile_w = tile_size(height, tile, overlap, stride), tile_size(width, tile, overlap, stride)
    starts = [(y, x) for y in tile_starts(height, tile_h, overlap, stride)
              for x in tile_starts(width, tile_w, overlap, stride)]
    for done, (y, x) in enumerate(starts, 1):
        patch = image[y : y + tile_h, x : x + tile_w]
        rows, cols = patch.shape
        weights = np.outer(tile_weights(y, rows, height, overlap), tile_weights(x, cols, width, overlap))
        total[y : y + rows, x : x + cols] += run_whole(patch) * weights
        weight_sum[y : y + rows, x : x + cols] += weights
        if progress is not None:
            progress(done, len(starts), "tiles")
    return np.divide(total, np.maximum(weight_sum, 1e-6, out=weight_sum), out=total)


def onnx_metadata(path: Path) -> dict[str, Any]:
    """The engine's metadata of an ONNX file (JSON values); EngineError if it was not exported by the engine."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
        meta = {prop.key: json.loads(prop.value) for prop in props}
        float(meta["normalisation"]["mean"]), float(meta["normalisation"]["std"])
    except (ValueError, KeyError, TypeError, DecodeError) as err:
        raise EngineError(f"{path}: ONNX model without the engine's metadata ({type(err).__name__}: {err}); "
                          "export it again with `python -m engine export`") from err
    return meta


class OnnxRuntimeModel:
    """logits = model(batch) on an ONNX Runtime session (sessions are safe to call from several threads)."""

    def __init__(self, session: Any) -> None:
        self.session, self.input_name = session, session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a normalised NCHW float32 batch."""
        return self.session.run(None, {self.input_name: batch})[0]


@lru_cache(maxsize=8)
def onnx_session(path: str, version: tuple):  # version in the key: a re-export loads the new file
    """A cached ONNX Runtime session with all graph optimisations and one thread per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.cpu_threads()
    options.inter_op_num_threads = 1
    # No memory arena: it keeps the peak of every input size ever seen (export + bench held 1.76 GB in the
    # app's process with it, 0.81 GB without; latency at 256x256 unchanged within noise on the 2-core CPU).
    options.enable_cpu_mem_arena = False
    # Idle worker threads must not spin: on a few shared cores they steal time from everything else
    # (the app, training, torch); measured 2-3x slower ONNX latency with spinning on a loaded 2-core CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for corrupt files
        raise EngineError(f"{path}: not a loadable ONNX model ({str(err).splitlines()[0][:200]}); export it again") from err


def import_openvino() -> Any:
    """The openvino module, imported with its telemetry off for this process.

    Importing openvino starts openvino_telemetry, which writes a client id and usage counts under ~/intel. With
    that package hidden, openvino uses the no-op stub it ships for when the package is absent; nothing is written
    outside the project.
    """
    import sys

    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def openvino_available() -> bool:
    """Whether the openvino package is installed (it is optional where it does not install)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVinoModel:
    """logits = model(batch) on OpenVINO, compiled once per input shape, with one infer request per thread.

    A model compiled for a static shape ran 25 % faster than the dynamic one (256x256, 2 threads); a line
    camera sends one size, and tiles come in a few, so the last OPENVINO_SHAPES shapes stay compiled.
    A compiled model may serve several threads, but one infer request may not: each thread keeps its own.
    """

    def __init__(self, path: str, settings: dict[str, Any]) -> None:
        ov = import_openvino()
        self.path, self.settings, self.core = path, settings, ov.Core()
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._lock, self._local = threading.Lock(), threading.local()
        self._compile(None)  # fail at load, not at the first image, when the file is not a model

    def _compile(self, shape: tuple[int, ...] | None) -> Any:
        """The model compiled for one input shape (None: dynamic)."""
        try:
            model = self.core.read_model(self.path)
            if shape is not None:
                model.reshape(list(shape))
            return self.core.compile_model(model, "CPU", self.settings)
        except RuntimeError as err:  # OpenVINO reports unreadable files, and kernels this CPU lacks, as RuntimeError
            # Its first lines only say where in OpenVINO it was raised; the cause comes after them.
            lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith("Exception from")]
            raise EngineError(f"{self.path}: OpenVINO cannot load or compile it for this CPU "
                              f"({(lines or [str(err)])[0][:200]}); export it again if the file is damaged") from err

    def _request(self, shape: tuple[int, ...]) -> Any:
        """This thread's infer request for a shape, compiling the shape first if it is new."""
        with self._lock:
            compiled = self._compiled.get(shape)
            if compiled is None:
                compiled = self._compiled[shape] = self._compile(shape)
                while len(self._compiled) > OPENVINO_SHAPES:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(shape)
        requests = self._local.__dict__.setdefault("requests", {})
        if requests.get(shape, (None,))[0] is not compiled:
            if len(requests) >= OPENVINO_SHAPES:
                requests.clear()
            requests[shape] = (compiled, compiled.create_infer_request())
        return requests[shape][1]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a normalised NCHW float32 batch."""
        request = self._request(batch.shape)
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()


@lru_cache(maxsize=8)
def openvino_model(path: str, version: tuple, precision: str) -> OpenVinoModel:  # version: a re-export loads anew
    """A cached OpenVINO model for the CPU: one per file version and precision (compiling costs many inferences)."""
    if not openvino_available():
        raise EngineError("the openvino backends need the openvino package (`pip install openvino`); "
                          "use onnx or int8 meanwhile")
    return OpenVinoModel(path, {"INFERENCE_NUM_THREADS": config.cpu_threads(), "PERFORMANCE_HINT": "LATENCY",
                                "INFERENCE_PRECISION_HINT": precision})


def model_file(run_dir: Path, backend: str, epoch: int | str = "best") -> Path:
    """The file a backend of a run loads: the checkpoint of an epoch for torch, else an exported file."""
    return runs.checkpoint_path(run_dir, epoch) if backend == "torch" else RunFolder(run_dir).exported(MODEL_FILES[backend])


def pad_to_multiple(image: np.ndarray, stride: int) -> np.ndarray:
    """Mirror-pad a 2-D float32 image at the bottom and right so both sides are multiples of stride."""
    pad_h, pad_w = (-image.shape[0]) % stride, (-image.shape[1]) % stride
    if pad_h or pad_w:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
    return image.astype(np.float32, copy=False)


def preprocess_image(image: np.ndarray, mean: float, std: float, stride: int) -> np.ndarray:
    """Gray, normalise and pad one image to the 1x1xHxW float32 batch the network accepts."""
    gray = to_gray_float(image) if not (image.ndim == 2 and image.dtype == np.float32) else image
    return pad_to_multiple((gray - mean) / std, stride)[None, None]
