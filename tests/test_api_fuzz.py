"""Schemathesis against the app's own OpenAPI spec: generated requests, no server errors, answers as documented."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from api.main import create_app
from api.serving import ServingState
from api.settings import Settings

API_KEY = "fuzz-key"
SETTINGS = Settings(api_key=API_KEY, max_upload_mb=1)  # explicit, so nothing leaks into other tests' environment
app = create_app(SETTINGS)
# Loaded at import: schemathesis' lazy `from_fixture` loader does not work with pytest 9.
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@st.composite
def encoded_images(draw: st.DrawFn, extension: str) -> bytes:
    """Real images of any small size: gray/BGR/BGRA, 8 or 16 bit where the format allows it."""
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    channels = draw(st.sampled_from([1, 3] if extension == ".jpg" else [1, 3, 4]))
    deep = extension in (".png", ".tif") and draw(st.booleans())
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(
        0, 65536 if deep else 256, (height, width, channels), dtype=np.uint16 if deep else np.uint8)
    return cv2.imencode(extension, pixels)[1].tobytes()


# The spec declares the file as image/png, image/jpeg, image/bmp or image/tiff; positive cases draw real
# images of those types, negative ones get arbitrary bytes.
for media_type, extension in {"image/png": ".png", "image/jpeg": ".jpg", "image/bmp": ".bmp",
                              "image/tiff": ".tif"}.items():
    schemathesis.openapi.media_type(media_type, encoded_images(extension))


@pytest.fixture(autouse=True)
def serve_trained_run(trained_run: str) -> None:
    """Make the tiny trained run the app's default model, so /predict exercises real inference."""
    if app.state.serving.settings.default_run != trained_run:
        app.state.serving = ServingState(SETTINGS.model_copy(update={"default_run": trained_run}))
        assert app.state.serving.load_default() is not None, app.state.serving.default_error


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_spec(case: schemathesis.Case) -> None:
    # Not negative_data_rejection: it counts a request as invalid for unknown query parameters (ignored by
    # design, as most HTTP APIs do) or for a missing X-API-Key that this test puts back, and then expects a
    # 4xx for what is a valid request. Rejection of bad values is tested case by case in test_api.py.
    case.call_and_validate(headers={"X-API-Key": API_KEY},
                           excluded_checks=[schemathesis.checks.negative_data_rejection])
