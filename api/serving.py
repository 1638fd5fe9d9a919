"""The serving state of one API app: settings, the Predictor cache, the inference threads and the default model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from api.settings import Settings
from engine import runs
from engine.errors import EngineError, GateFailed
from engine.imageio import read_limited
from engine.inference import Predictor
from engine.readiness import Served
from engine.serving import PredictorCache, auto_backend, model_catalog, predict_bytes


class ModelUnavailable(EngineError):
    """No model can be served: nothing trained and no demo run (answered with 503)."""


class ServingState:
    """Settings, the Predictor cache and the default model of one app instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = PredictorCache(settings.cache_size)
        # Decoding and inference run on these long-lived threads: bounds memory (one image's maps per slot),
        # keeps the cores from being oversubscribed, and always hands the model to the same threads, whose
        # OpenMP teams stay warm (a different pool thread per request pays for a fresh team each time).
        self.slots = ThreadPoolExecutor(settings.inference_slots, thread_name_prefix="inference")
        self.default: Predictor | None = None  # what answered the last request without ?run= (for /health)
        self.default_error: str | None = "not loaded yet"

    def load_default(self) -> Predictor | None:
        """Load the default model now (at start-up); remember why if there is none."""
        try:
            return self.predictor(None, None)
        except EngineError as err:
            self.default_error = str(err)
            return None

    def predictor(self, run: str | None, backend: str | None) -> Predictor:
        """The Predictor for a request: the named run, else the default one, resolved again for each request.

        The default is DEFECTS_API_RUN, by default `ready`: the newest ready run, so a run that completes
        (or is exported) answers the next request without a restart. Requests in flight keep the Predictor
        they started with.
        """
        if run:
            return self.cache.get(run, backend=backend)
        try:
            folder = runs.resolve_run(self.settings.default_run)
        except EngineError as err:
            self.default, self.default_error = None, str(err)
            raise ModelUnavailable(f"no model available ({err}); train one with "
                                   "`python -m engine train --data DIR`, or name a run with ?run=") from None
        try:
            predictor = self.cache.get_for_dir(folder, backend=backend or self.settings.default_backend)
        except EngineError as err:  # the default's files are damaged: no usable model (503), not a bad request
            if backend is not None or isinstance(err, GateFailed):  # DEFECTS_API_BACKEND names a refused one: 409
                raise
            self.default, self.default_error = None, str(err)
            raise ModelUnavailable(f"the default model, run {folder.name}, cannot be loaded ({err}); repair or "
                                   "delete that run, or name another with ?run=") from None
        if backend is None:
            self.default, self.default_error = predictor, None
        return predictor

    def predict(self, upload: BinaryIO, name: str, threshold: float | None, run: str | None,
                backend: str | None, return_mask: bool) -> dict[str, Any]:
        """Read the upload within the limit, pick the model, and predict in one of the inference slots."""
        start = time.perf_counter()
        data = read_limited(upload, self.settings.max_upload_bytes, name)
        predictor = self.predictor(run, backend)
        submitted = time.perf_counter()
        answer, started = self.slots.submit(self._predict_in_slot, predictor, data, name, threshold,
                                            return_mask).result()
        answer["timings_ms"]["queue"] = round((started - submitted) * 1000, 2)
        answer["timings_ms"]["total"] = round((time.perf_counter() - start) * 1000, 2)
        return answer

    def _predict_in_slot(self, predictor: Predictor, data: bytes, name: str, threshold: float | None,
                         return_mask: bool) -> tuple[dict[str, Any], float]:
        """predict_bytes on an inference thread; also returns when it started (for the queue time)."""
        started = time.perf_counter()
        return predict_bytes(predictor, data, name, threshold, return_mask, self.settings.max_image_pixels), started

    def close(self) -> None:
        """Finish running inferences and stop the inference threads (a later request starts fresh ones)."""
        old, self.slots = self.slots, ThreadPoolExecutor(self.settings.inference_slots, thread_name_prefix="inference")
        old.shutdown(wait=True)

    def health(self) -> dict[str, Any]:
        """Liveness plus the model that answers requests without ?run= now, or why there is none."""
        try:
            model = self.predictor(None, None).describe()
        except EngineError as err:
            self.default_error = str(err)
            return {"status": "no_model", "model": None, "detail": self.default_error, "ready": False,
                    "ready_reason": self.default_error, "not_ready_reason": self.default_error,
                    "default_run": self.settings.default_run}
        auto = self.default and self.settings.default_backend in (None, "auto")
        choice = auto_backend(self.default.run_dir) if auto else None
        skipped = runs.newer_not_ready(self.default.run_dir) if self.settings.default_run == "ready" else None
        return {"status": "ok", "model": model, "detail": None, **{key: model[key] for key in Served.model_fields},
                "default_run": self.settings.default_run, "backend_choice": choice.as_dict() if choice else None,
                "newest_run": skipped and {"run": skipped[0], "ready": False, "ready_reason": skipped[1]}}

    def models(self) -> dict[str, Any]:
        """Default model, loaded models, and every run folder that can be served."""
        return {"default": self.default.describe() if self.default else None, "loaded": self.cache.loaded(),
                "runs": model_catalog()}
