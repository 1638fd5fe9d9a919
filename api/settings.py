"""API settings, read from environment variables when the app is created."""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.errors import EngineError
from engine.imageio import MAX_PIXELS

MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers around the file


@dataclass(frozen=True)
class Settings:
    """What the operator can configure; see docs/API.md for the variables."""

    api_key: str | None = None  # DEFECTS_API_KEY: required in X-API-Key on every route but /health when set
    max_upload_mb: float = 20.0  # DEFECTS_MAX_UPLOAD_MB
    max_image_pixels: int = 25_000_000  # DEFECTS_MAX_IMAGE_PIXELS: decoded size bound (memory per request)
    # DEFECTS_API_RUN: what answers without ?run=, resolved for every request: `ready` (the newest ready run),
    # `latest` (the newest run with a checkpoint), an id or `demo` (pinned); `ready`/`latest` fall back to `demo`.
    default_run: str = "ready"
    default_backend: str | None = None  # DEFECTS_API_BACKEND: None = int8 > onnx > torch, whatever is exported
    # DEFECTS_API_SLOTS: images decoded and inferred at the same time. Two keep both cores busy while one
    # request is in HTTP parsing or decoding (measured: 102 % of the bare Predictor vs 75 % with one).
    inference_slots: int = 2
    cache_size: int = 4  # DEFECTS_API_CACHE: models kept loaded

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes."""
        return int(self.max_upload_mb * 1_000_000)

    @classmethod
    def from_env(cls) -> "Settings":
        """Settings from DEFECTS_* environment variables; a bad value is an EngineError naming the variable."""
        env = os.environ
        try:
            settings = cls(
                api_key=env.get("DEFECTS_API_KEY") or None,
                max_upload_mb=float(env.get("DEFECTS_MAX_UPLOAD_MB", cls.max_upload_mb)),
                max_image_pixels=int(env.get("DEFECTS_MAX_IMAGE_PIXELS", cls.max_image_pixels)),
                default_run=env.get("DEFECTS_API_RUN") or cls.default_run,
                default_backend=env.get("DEFECTS_API_BACKEND") or None,
                inference_slots=int(env.get("DEFECTS_API_SLOTS", cls.inference_slots)),
                cache_size=int(env.get("DEFECTS_API_CACHE", cls.cache_size)),
            )
        except ValueError as err:
            raise EngineError(f"bad DEFECTS_* API setting in the environment: {err}") from None
        if settings.max_upload_mb <= 0 or settings.inference_slots < 1 or settings.cache_size < 1:
            raise EngineError("DEFECTS_MAX_UPLOAD_MB must be > 0, DEFECTS_API_SLOTS and DEFECTS_API_CACHE >= 1")
        if not 0 < settings.max_image_pixels <= MAX_PIXELS:
            raise EngineError(f"DEFECTS_MAX_IMAGE_PIXELS must be between 1 and {MAX_PIXELS}")
        return settings
