"""API settings: pydantic-settings reads them from DEFECTS_* environment variables when the app is created."""

from __future__ import annotations

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import EngineError
from engine.imageio import MAX_PIXELS

MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers around the file


class Settings(BaseSettings):
    """What the operator can configure; see docs/API.md for the variables."""

    model_config = SettingsConfigDict(frozen=True, env_ignore_empty=True, populate_by_name=True, extra="ignore")

    api_key: str | None = Field(None, validation_alias="DEFECTS_API_KEY",
                                description="required in X-API-Key on every route but /health when set")
    max_upload_mb: float = Field(20.0, gt=0, validation_alias="DEFECTS_MAX_UPLOAD_MB")
    max_image_pixels: int = Field(25_000_000, gt=0, le=MAX_PIXELS, validation_alias="DEFECTS_MAX_IMAGE_PIXELS",
                                  description="decoded size bound (memory per request)")
    # What answers without ?run=, resolved for every request: `ready` (the newest ready run), `latest` (the
    # newest run with a checkpoint), an id or `demo` (pinned); `ready`/`latest` fall back to `demo`.
    default_run: str = Field("ready", validation_alias="DEFECTS_API_RUN")
    default_backend: str | None = Field(None, validation_alias="DEFECTS_API_BACKEND",
                                        description="None = auto: the fastest exported backend that passed the "
                                                    "accuracy gate on this machine, timed once per model")
    # Images decoded and inferred at the same time. Two keep both cores busy while one request is in HTTP
    # parsing or decoding (measured: 102 % of the bare Predictor vs 75 % with one).
    inference_slots: int = Field(2, ge=1, validation_alias="DEFECTS_API_SLOTS")
    cache_size: int = Field(4, ge=1, validation_alias="DEFECTS_API_CACHE", description="models kept loaded")

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes."""
        return int(self.max_upload_mb * 1_000_000)

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the DEFECTS_* environment; a bad value is an EngineError naming the variable."""
        try:
            return cls()
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
            raise EngineError(f"bad DEFECTS_* API setting in the environment: {problems}") from None
