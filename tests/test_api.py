"""The FastAPI sidecar: every route, every error code, unusual-but-valid images, and a real uvicorn process."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from engine import config, readiness, registry, runs
from engine.imageio import (
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
    decode_upload,
    probe_image,
)
from engine.inference import Predictor
from engine.inspection import inspect
from engine.recipe import load_recipe
from engine.serving import (
    AUTO_MARGIN,
    PredictorCache,
    auto_backend,
    available_backends,
    default_backend,
    gated_backends,
)
from tests.servers import stop_process, wait_until_up

# ---------------------------------------------------------------- images

def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _pil(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header claims width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; decoding would need all of them
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def sample(tiny_dataset: Path) -> np.ndarray:
    """A real 64x64 grayscale image of the tiny dataset (it has a defect)."""
    return cv2.imread(str(sorted((tiny_dataset / "images").glob("*.png"))[0]), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def rgb(sample: np.ndarray) -> Image.Image:
    """The sample as a colour PIL image, for writing formats OpenCV cannot write (CMYK, palette)."""
    gray = sample if sample.ndim == 2 else cv2.cvtColor(sample, cv2.COLOR_BGR2GRAY)
    return Image.fromarray(np.stack([gray, gray, gray], axis=-1))


# ---------------------------------------------------------------- clients

@pytest.fixture
def make_client(monkeypatch: pytest.MonkeyPatch, trained_run: str):
    """Factory: a TestClient (lifespan run) for an app created from the environment, serving trained_run."""
    clients: list[TestClient] = []

    def make(**env: str) -> TestClient:
        monkeypatch.setenv("DEFECTS_API_RUN", trained_run)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        client = TestClient(create_app())
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    """A client of an app without API key and with the default limits."""
    return make_client()


def copy_run(run_id: str, suffix: str) -> str:
    """A copy of a run folder under its own id and without exports; returns the new id."""
    copy_id = f"{run_id}-{suffix}"
    folder = config.RUNS_DIR / copy_id
    shutil.copytree(runs.run_dir(run_id), folder, ignore=shutil.ignore_patterns("export"), dirs_exist_ok=True)
    runs.write_run_json(folder, {**runs.read_run_json(folder), "run_id": copy_id})
    return copy_id


def post(client: TestClient, data: bytes, name: str = "image.png", **params: object) -> httpx.Response:
    """POST /predict with one file."""
    return client.post("/predict", files={"file": (name, data, "application/octet-stream")}, params=params)


# ---------------------------------------------------------------- routes

def test_health_reports_the_default_model(client: TestClient, trained_run: str) -> None:
    body = client.get("/health").json()
    ready, reason = readiness.verdict(runs.read_run_json(runs.resolve_run(trained_run)))  # training's own verdict
    assert body["status"] == "ok" and body["ready"] is ready and body["ready_reason"] == reason
    assert body["model"]["run"] == trained_run
    assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()  # which worker/replica answered
    assert body["model"]["backend"] == default_backend(runs.resolve_run(trained_run))


def test_models_lists_runs_with_their_backends(client: TestClient, trained_run: str) -> None:
    body = client.get("/models").json()
    assert body["default"]["run"] == trained_run
    entry = next(r for r in body["runs"] if r["run"] == trained_run)
    assert "torch" in entry["backends"]
    assert entry["default_backend"] in entry["backends"]
    assert any(m["run"] == trained_run for m in body["loaded"])


def test_a_run_marked_not_ready_says_so_on_health_models_and_predict(make_client, trained_run: str,
                                                                   sample: np.ndarray) -> None:
    # The trained fixture run is real; this copy carries training's verdict that it is not ready.
    run_id = copy_run(trained_run, "not-ready")
    folder = config.RUNS_DIR / run_id
    reason = "validation false alarms 100% above the 5% goal (40 defect-free images)"
    runs.write_run_json(folder, {**runs.read_run_json(folder), "ready": False, "ready_reason": reason})
    client = make_client(DEFECTS_API_RUN=run_id)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["ready"] is False and health["ready_reason"] == reason
    assert health["model"]["ready"] is False and health["model"]["ready_reason"] == reason
    assert health["not_ready_reason"] == health["model"]["not_ready_reason"] == reason  # DESIGN.md's name
    listed = client.get("/models").json()
    entry = next(r for r in listed["runs"] if r["run"] == run_id)
    assert entry["ready"] is False and entry["ready_reason"] == reason
    demo_entry = next(r for r in listed["runs"] if r["run"] == "demo")
    assert demo_entry["ready"] is True and demo_entry["ready_for"] == "generated images only"
    assert entry["ready_for"] is None
    answer = post(client, _png(sample))
    assert answer.status_code == 200 and answer.json()["model"]["ready"] is False
    assert answer.json()["warning"] == f"run {run_id} is not ready ({reason}); its verdicts are not validated for " \
                                       "use on a line"
    assert health["newest_run"] is None  # pinned: nothing passed over
    # Following the newest ready run, /health names the newer run it passed over, and why.
    following = make_client(DEFECTS_API_RUN="ready")
    passed = following.get("/health").json()
    assert passed["model"]["run"] != run_id and passed["ready"] is True
    assert passed["newest_run"] == {"run": run_id, "ready": False, "ready_reason": reason}
    # An answer from the demo says so, and names the user's newest run it passed over.
    demo = post(following, _png(sample), run="demo").json()
    assert demo["model"]["run"] == "demo" and demo["model"]["ready"] is True
    assert demo["model"]["ready_for"] == "generated images only"  # "ready" alone read as "trust this" (issue 39)
    assert demo["warning"].startswith("answered by the demo model, trained on generated images only")
    assert f"your newest run {run_id} is not ready ({reason})" in demo["warning"]


def test_a_default_run_with_a_damaged_checkpoint_is_503_not_a_bad_request(make_client, trained_run: str,
                                                                        sample: np.ndarray) -> None:
    run_id = copy_run(trained_run, "damaged")
    try:
        (config.RUNS_DIR / run_id / "best.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
        client = make_client(DEFECTS_API_RUN=run_id)
        answer = post(client, _png(sample))
        assert answer.status_code == 503 and f"run {run_id}, cannot be loaded" in answer.json()["detail"]
        health = client.get("/health").json()
        assert health["status"] == "no_model" and "cannot be loaded" in health["detail"]
        assert post(client, _png(sample), run=trained_run).status_code == 200  # other runs still answer
    finally:  # a ready copy would become every later test's newest ready run
        shutil.rmtree(config.RUNS_DIR / run_id, ignore_errors=True)
        registry.delete_run(run_id)


def test_predict_answers_the_contract_and_matches_the_predictor(client: TestClient, sample: np.ndarray,
                                                                 trained_run: str) -> None:
    response = post(client, _png(sample), return_mask=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["run"] == trained_run
    assert body["image"] == {"width": sample.shape[1], "height": sample.shape[0]}
    assert set(body["timings_ms"]) >= {"decode", "inference", "total"}
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == sample.shape[:2]
    assert body["defect_fraction"] == pytest.approx(float((mask > 0).mean()), abs=1e-6)
    assert body["verdict"] == ("defect" if body["regions"] else "ok")
    assert sum(r["area_px"] for r in body["regions"]) == int((mask > 0).sum())
    # The same backend run directly on the same pixels gives the same answer.
    predictor = Predictor.from_run(trained_run, backend=body["model"]["backend"])
    direct = inspect(predictor.predict_proba(decode_image(_png(sample))), load_recipe(runs.run_dir(trained_run))).as_dict()
    assert body["threshold"] == pytest.approx(direct["threshold"])
    assert body["max_score"] == pytest.approx(direct["max_score"], abs=1e-4)
    assert body["verdict"] == direct["verdict"]


def test_threshold_query_sets_the_mask(client: TestClient, sample: np.ndarray) -> None:
    everything = post(client, _png(sample), threshold=0.0).json()
    assert everything["threshold"] == 0.0
    assert everything["defect_fraction"] == 1.0 and everything["verdict"] == "defect"
    assert "mask_png_base64" not in everything or everything["mask_png_base64"] is None


def test_large_image_is_processed_at_full_resolution(client: TestClient, sample: np.ndarray) -> None:
    wide = np.tile(sample, (5, 18))[:300, :1100]  # wider than the 1024 px tiling threshold
    body = post(client, _png(wide), return_mask=True).json()
    assert body["image"] == {"width": 1100, "height": 300}
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (300, 1100)


def test_named_run_and_backend_are_served(client: TestClient, trained_run: str, sample: np.ndarray) -> None:
    body = post(client, _png(sample), run=trained_run, backend="torch").json()
    assert body["model"] == {**body["model"], "run": trained_run, "backend": "torch"}


# ---------------------------------------------------------------- unusual but valid images

def _cases(sample: np.ndarray, rgb: Image.Image) -> dict[str, bytes]:
    gray = sample if sample.ndim == 2 else cv2.cvtColor(sample, cv2.COLOR_BGR2GRAY)
    return {
        "png-16bit": _png(gray.astype(np.uint16) * 257),
        "png-rgba": _png(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA)),
        "png-palette": _pil(rgb.convert("P"), "PNG"),
        "png-1bit": _pil(rgb.convert("1"), "PNG"),
        "jpeg-cmyk": _pil(rgb.convert("CMYK"), "JPEG", quality=95),
        "jpeg-gray": _pil(rgb.convert("L"), "JPEG", quality=95),
        "jpeg-progressive": _pil(rgb, "JPEG", quality=95, progressive=True),
        "bmp": _pil(rgb, "BMP"),
        "tiff-lzw": _pil(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-float": _pil(Image.fromarray(gray.astype(np.float32) / 255), "TIFF"),
        "png-named-jpg": _png(gray),
    }


CASES = ["png-16bit", "png-rgba", "png-palette", "png-1bit", "jpeg-cmyk", "jpeg-gray", "jpeg-progressive", "bmp",
         "tiff-lzw", "tiff-float", "png-named-jpg"]


@pytest.mark.parametrize("case", CASES)
def test_unusual_valid_images_work(client: TestClient, sample: np.ndarray, rgb: Image.Image, case: str) -> None:
    data = _cases(sample, rgb)[case]
    response = post(client, data, name="photo.jpg" if case == "png-named-jpg" else f"image.{case.split('-')[0]}")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": sample.shape[1], "height": sample.shape[0]}


def test_cmyk_jpeg_decodes_to_the_same_picture(sample: np.ndarray, rgb: Image.Image) -> None:
    cmyk = decode_upload(_pil(rgb.convert("CMYK"), "JPEG", quality=95))[0]
    plain = decode_upload(_pil(rgb, "JPEG", quality=95))[0]
    assert np.abs(cmyk - plain).mean() < 0.03  # not inverted or scrambled


@pytest.mark.parametrize("case", CASES)
def test_header_probe_matches_the_decoded_size(sample: np.ndarray, rgb: Image.Image, case: str) -> None:
    data = _cases(sample, rgb)[case]
    header = probe_image(data)
    assert (header.height, header.width) == decode_image(data).shape


# ---------------------------------------------------------------- client errors

def _cli_results(trained_run: str, paths: list[Path], capsys: pytest.CaptureFixture) -> dict[str, dict]:
    """`python -m engine predict --backend torch --json` on files (the API calls name torch too): name -> result."""
    from engine.__main__ import main

    capsys.readouterr()
    assert main(["predict", *map(str, paths), "--run", trained_run, "--backend", "torch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return {Path(r["file"]).name: r for r in report["results"]}


def test_12_bit_data_in_a_16_bit_png_reads_like_its_8_bit_original(client: TestClient, sample: np.ndarray,
                                                                   trained_run: str, tmp_path: Path, capsys) -> None:
    gray = sample if sample.ndim == 2 else cv2.cvtColor(sample, cv2.COLOR_BGR2GRAY)
    twelve = np.round(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)  # a 12-bit camera's 16-bit file
    assert np.abs(decode_image(_png(twelve)) - gray / 255.0).max() < 1e-3  # scaled by 4095, not by 65535
    files = {"eight.png": _png(gray), "twelve.png": _png(twelve)}
    api = {name: post(client, data, name=name, backend="torch").json() for name, data in files.items()}
    assert api["twelve.png"]["verdict"] == api["eight.png"]["verdict"]
    assert api["twelve.png"]["max_score"] == pytest.approx(api["eight.png"]["max_score"], abs=0.01)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cli = _cli_results(trained_run, [tmp_path / name for name in files], capsys)
    for name in files:
        assert cli[name]["verdict"] == api[name]["verdict"]
        assert cli[name]["max_score"] == pytest.approx(api[name]["max_score"], abs=1e-4)


def test_exif_orientation_is_ignored_alike_on_the_api_and_the_cli(client: TestClient, sample: np.ndarray,
                                                                  trained_run: str, tmp_path: Path, capsys) -> None:
    gray = sample if sample.ndim == 2 else cv2.cvtColor(sample, cv2.COLOR_BGR2GRAY)
    wide = Image.fromarray(np.ascontiguousarray(gray[:, : gray.shape[1] // 2 * 2][:40]))  # not square
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    files = {"plain.jpg": _pil(wide, "JPEG", quality=95), "rotated.jpg": _pil(wide, "JPEG", quality=95, exif=exif)}
    assert Image.open(io.BytesIO(files["rotated.jpg"])).getexif()[0x0112] == 6
    api = {name: post(client, data, name=name, backend="torch").json() for name, data in files.items()}
    for result in api.values():  # the pixels as stored: width x height of the file, not of its rotated view
        assert (result["image"]["width"], result["image"]["height"]) == wide.size
    assert api["rotated.jpg"]["max_score"] == api["plain.jpg"]["max_score"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cli = _cli_results(trained_run, [tmp_path / name for name in files], capsys)
    assert cli["rotated.jpg"]["max_score"] == pytest.approx(api["rotated.jpg"]["max_score"], abs=1e-4)
    assert cli["rotated.jpg"]["max_score"] == cli["plain.jpg"]["max_score"]


def test_svg_pdf_garbage_empty_and_truncated_files_are_415(client: TestClient, sample: np.ndarray,
                                                           rgb: Image.Image) -> None:
    png, jpeg = _png(sample), _pil(rgb, "JPEG")
    bad = {
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        "paper.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
        "noise.png": (np.random.default_rng(1).bytes(2048), "not an image"),
        "empty.png": (b"", "empty"),
        "cut.png": (png[: len(png) // 2], "truncated"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "header-only.png": (png[:20], "header"),
        "anim.gif": (_pil(rgb, "GIF"), "GIF"),
    }
    for name, (data, words) in bad.items():
        response = post(client, data, name=name)
        assert response.status_code == 415, (name, response.text)
        assert words in response.json()["detail"], (name, response.json())
    assert post(client, png).status_code == 200  # the server is still serving


def test_decompression_bomb_is_refused_from_the_header(client: TestClient) -> None:
    data = png_bomb(30000, 30000)
    assert len(data) < 2000
    started = time.perf_counter()
    response = post(client, data, name="bomb.png")
    assert response.status_code == 413
    assert "30000x30000" in response.json()["detail"]
    assert time.perf_counter() - started < 5
    with pytest.raises(ImageTooLarge):  # the engine refuses it too, even with the API's limit raised
        decode_upload(data, max_pixels=10**12)


def test_non_finite_float_tiff_is_refused() -> None:
    pixels = np.zeros((8, 8), np.float32)
    pixels[2, 3] = np.nan
    with pytest.raises(UnsupportedImage, match="NaN"):
        decode_upload(_pil(Image.fromarray(pixels), "TIFF"))


def test_upload_over_the_limit_is_413_with_and_without_content_length(make_client, sample: np.ndarray) -> None:
    client = make_client(DEFECTS_MAX_UPLOAD_MB="0.02")  # 20 kB
    big = _png(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))  # ~40 kB of noise
    response = post(client, big)
    assert response.status_code == 413
    assert "0.02 MB" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit has to trip while the stream is read
        yield b"x" * 10_000
        yield b"y" * 100_000

    streamed = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413
    assert post(client, _png(sample)).status_code == 200  # a small file still works


@pytest.mark.parametrize("threshold", ["-0.1", "1.5", "abc", "nan"])
def test_threshold_outside_0_1_is_422(client: TestClient, sample: np.ndarray, threshold: str) -> None:
    response = post(client, _png(sample), threshold=threshold)
    assert response.status_code == 422
    assert "threshold" in response.json()["detail"]
    if threshold == "nan":  # not "should be <= 1", which nan is not either
        assert "finite number" in response.json()["detail"]


def test_unknown_backend_and_missing_file_are_422(client: TestClient, sample: np.ndarray) -> None:
    response = post(client, _png(sample), backend="tensorrt")
    assert response.status_code == 422 and "backend" in response.json()["detail"]
    response = client.post("/predict")
    assert response.status_code == 422 and "file" in response.json()["detail"]


def test_unknown_run_is_404_and_path_tricks_are_422(client: TestClient, sample: np.ndarray) -> None:
    response = post(client, _png(sample), run="no-such-run")
    assert response.status_code == 404 and "no-such-run" in response.json()["detail"]
    assert post(client, _png(sample), run="../../etc").status_code == 422


def test_missing_export_is_404_with_the_export_hint(client: TestClient, sample: np.ndarray, trained_run: str) -> None:
    copy_id = copy_run(trained_run, "noexport")
    try:
        response = post(client, _png(sample), run=copy_id, backend="int8")
        assert response.status_code == 404
        assert "python -m engine export" in response.json()["detail"]
    finally:
        shutil.rmtree(config.RUNS_DIR / copy_id)


def test_malformed_multipart_body_is_422(client: TestClient) -> None:
    response = client.post("/predict", content=b"--x\r\nno headers, no end",
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 422
    assert "file" in response.json()["detail"]


def test_api_key_is_required_except_on_health(make_client, sample: np.ndarray) -> None:
    client = make_client(DEFECTS_API_KEY="s3cret-key")
    assert client.get("/health").status_code == 200
    for headers in ({}, {"X-API-Key": "wrong"}):
        for response in (client.get("/models", headers=headers), client.post(
                "/predict", files={"file": ("a.png", _png(sample))}, headers=headers)):
            assert response.status_code == 401
            assert "X-API-Key" in response.json()["detail"]
    assert client.get("/models", headers={"X-API-Key": "s3cret-key"}).status_code == 200
    ok = client.post("/predict", files={"file": ("a.png", _png(sample))}, headers={"X-API-Key": "s3cret-key"})
    assert ok.status_code == 200
    assert "X-API-Key" in str(client.get("/openapi.json").json()["components"]["securitySchemes"])


def test_no_model_is_503_and_health_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              sample: np.ndarray) -> None:
    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")  # no run at all ...
    monkeypatch.setattr(config, "DEMO_RUN_DIR", tmp_path / "no-demo")  # ... and no shipped demo
    monkeypatch.delenv("DEFECTS_API_RUN", raising=False)
    with TestClient(create_app()) as client:
        health = client.get("/health").json()
        assert health["status"] == "no_model" and health["detail"]
        response = post(client, _png(sample))
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        assert "no model available" in response.json()["detail"]
        assert client.get("/models").json() == {"default": None, "loaded": [], "runs": []}


def test_openapi_declares_every_error(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "404", "413", "415", "422", "503"} <= set(responses)
    for code in ("404", "413", "415", "422", "503"):
        assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    file_field = spec["components"]["schemas"][body.rsplit("/", 1)[1]]["properties"]["file"]
    assert file_field["minLength"] == 1  # an empty file is answered 415: the schema must not call it valid
    assert post(client, b"").status_code == 415
    assert client.get("/docs").status_code == 200


def _error_cases(client_for, sample: np.ndarray) -> dict[str, tuple[int, httpx.Response]]:
    """One real request per error status the API gives (413 three ways: header, stream, pixels)."""
    small = client_for()
    keyed = client_for(DEFECTS_API_KEY="k")
    tiny_limit = client_for(DEFECTS_MAX_UPLOAD_MB="0.001")  # 1 kB + multipart slack

    def stream():  # no Content-Length: the limit trips while the body is read
        yield b"x" * 40_000
        yield b"y" * 40_000

    return {
        "401 missing key": (401, keyed.get("/models")),
        "404 unknown route": (404, small.get("/no-such-route")),
        "404 unknown run": (404, post(small, _png(sample), run="no-such-run")),
        "405 wrong method": (405, small.get("/predict")),
        "413 content-length": (413, tiny_limit.post("/predict", content=b"z" * 200_000,
                                                    headers={"content-type": "multipart/form-data; boundary=b"})),
        "413 streamed": (413, tiny_limit.post("/predict", content=stream(),
                                              headers={"content-type": "multipart/form-data; boundary=b"})),
        "413 pixels": (413, post(small, png_bomb(30000, 30000))),
        "415 not an image": (415, post(small, b"<svg/>", name="x.svg")),
        "422 bad parameter": (422, post(small, _png(sample), threshold="2")),
        "422 no file": (422, small.post("/predict")),
    }


def test_every_error_status_is_json_with_a_detail(make_client, sample: np.ndarray) -> None:
    """503 (no model at all) is checked in test_no_model_is_503_and_health_says_why."""
    for name, (status, response) in _error_cases(make_client, sample).items():
        assert response.status_code == status, (name, response.status_code, response.text[:200])
        assert response.headers["content-type"] == "application/json", (name, response.headers)
        assert isinstance(response.json()["detail"], str) and response.json()["detail"], name


def test_docs_pages_load_their_assets_from_the_server(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        scripts = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
        assert scripts, (page, html[:500])
        for url in scripts:
            assert url.startswith("/"), f"{page} loads {url} from outside the server; it would be blank offline"
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 10_000, url


@pytest.mark.slow
def test_exported_onnx_becomes_the_default_backend(client: TestClient, sample: np.ndarray, trained_run: str) -> None:
    from engine.export import export_run

    copy_id = copy_run(trained_run, "onnx")
    try:
        export_run(copy_id)
        run_dir = config.RUNS_DIR / copy_id
        gated = gated_backends(run_dir)  # onnx, and OpenVINO's precisions that passed the gate where installed
        assert gated[0] == "onnx" and "int8" not in gated  # no --int8, no INT8 file
        choice = auto_backend(run_dir)
        assert choice.backend in gated and default_backend(run_dir) == choice.backend
        if len(gated) > 1:  # measured: the pick is the fastest, or a more exact one within the margin
            assert choice.p50_ms[choice.backend] <= min(choice.p50_ms.values()) * (1 + AUTO_MARGIN)
        served = post(client, _png(sample), run=copy_id).json()
        assert served["model"]["backend"] == choice.backend
        reference = post(client, _png(sample), run=copy_id, backend="torch").json()
        exact = choice.backend in ("onnx", "openvino")  # bf16 keeps 8 bits of mantissa; its gate is on Dice
        assert served["max_score"] == pytest.approx(reference["max_score"], abs=1e-3 if exact else 0.05)
        entry = next(r for r in client.get("/models").json()["runs"] if r["run"] == copy_id)
        assert entry["backends"] == available_backends(run_dir) and entry["backends"][:2] == ["torch", "onnx"]
        assert entry["default_backend"] == choice.backend
    finally:
        shutil.rmtree(config.RUNS_DIR / copy_id)


# ---------------------------------------------------------------- the model cache

def test_cache_loads_a_model_once_under_concurrency(trained_run: str) -> None:
    cache = PredictorCache()
    with ThreadPoolExecutor(8) as pool:
        predictors = list(pool.map(lambda _: cache.get(trained_run, backend="torch"), range(16)))
    assert len({id(p) for p in predictors}) == 1
    assert len(cache.loaded()) == 1


def test_cache_reloads_a_rewritten_checkpoint(trained_run: str) -> None:
    cache = PredictorCache()
    first = cache.get(trained_run, backend="torch")
    checkpoint = runs.checkpoint_path(runs.resolve_run(trained_run))
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = cache.get(trained_run, backend="torch")
    assert second is not first
    assert len(cache.loaded()) == 1  # the old version was dropped


# ---------------------------------------------------------------- a real server

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def uvicorn_server(**env: str) -> Iterator[str]:
    """A real `python -m engine serve` process with the given DEFECTS_* variables; yields its base URL."""
    port = _free_port()
    full_env = {**os.environ, **env}
    full_env.pop("DEFECTS_API_KEY", None)
    for key in [k for k in ("DEFECTS_API_RUN",) if k not in env]:
        full_env.pop(key, None)
    # The log goes to a file: a pipe nobody reads fills up under load and blocks the server's access log.
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port)], cwd=config.ROOT,
                              env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, base, log, timeout=90)
        yield base
    finally:
        stop_process(server)
        log.close()


@pytest.mark.slow
def test_real_uvicorn_server(trained_run: str, sample: np.ndarray) -> None:
    with uvicorn_server(DEFECTS_API_RUN=trained_run) as base:
        port = int(base.rsplit(":", 1)[1])
        with httpx.Client(base_url=base, timeout=60) as http:
            bad = http.post("/predict", files={"file": ("x.svg", b"<svg/>")})
            assert bad.status_code == 415
            good = http.post("/predict", files={"file": ("a.png", _png(sample))}, params={"return_mask": "true"})
            assert good.status_code == 200, good.text
            assert good.json()["model"]["run"] == trained_run
            assert good.json()["mask_png_base64"]
        # A client announcing a 1 GB upload is refused from the header, before any of the body is read.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
            reply = b""
            while chunk := raw.recv(4096):  # the server closes the connection after refusing
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, head
            assert b"upload limit" in body, body  # JSON with `detail`, like every other error
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # still serving


@pytest.mark.slow
def test_default_follows_a_new_ready_run_without_restart_or_failed_requests(tmp_path: Path,
                                                                           sample: np.ndarray) -> None:
    """The bar of the first-hour issue: train and export while clients hammer /predict without ?run=."""
    from engine import synth, synthset
    from engine.export import export_run
    from engine.train import TrainConfig, train

    # Validation large enough to vouch for a run (metrics.too_few_to_show): 16 good and 4 defective images.
    data = tmp_path / "vouching"
    synthset.generate_dataset(data, 200, seed=5, params=synth.SynthParams(size=64, defect_free=0.8), workers=1)

    with uvicorn_server() as base:  # DEFECTS_API_RUN unset: `ready`, the newest ready run
        before = httpx.get(f"{base}/health", timeout=30).json()
        assert before["default_run"] == "ready"
        stop, answers = False, []

        def hammer() -> None:
            with httpx.Client(base_url=base, timeout=120) as http:
                while not stop:
                    response = http.post("/predict", files={"file": ("a.png", _png(sample))})
                    answers.append((response.status_code, response.json()["model"] if response.is_success
                                    else response.text))

        with ThreadPoolExecutor(3) as pool:
            clients = [pool.submit(hammer) for _ in range(3)]
            try:
                # A real run that training itself finds ready (the shipped pre-trained start learns this set fast).
                new_run = train(TrainConfig(data=str(data), epochs=3, init="pretrained", crop=64, batch_size=8,
                                            steps_per_epoch=8, name="switch"))
                info = runs.read_run_json(runs.run_dir(new_run))
                assert readiness.verdict(info)[0], f"the new run must be ready: {info['ready_reason']}"
                export_run(new_run)
                seen = len(answers)
                deadline = time.monotonic() + 60
                while len(answers) < seen + 6 and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:  # a failure above must not leave the clients hammering (the pool would wait for them forever)
                stop = True
            for future in clients:
                future.result()
        failed = [a for a in answers if a[0] != 200]
        assert not failed, failed[:3]
        assert answers[0][1]["run"] != new_run
        after = answers[seen + 3:]  # at most three requests were in flight when the export landed
        gated = gated_backends(runs.run_dir(new_run))
        assert after and all(model["run"] == new_run and model["backend"] in gated for _, model in after), after
        assert len({model["backend"] for _, model in after}) == 1  # auto picked once, not per request
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["model"]["run"] == new_run and health["model"]["backend"] == after[0][1]["backend"]
        assert health["backend_choice"]["backend"] == health["model"]["backend"]
        assert health["model"]["epoch"] == runs.read_run_json(runs.run_dir(new_run))["best_epoch"]
        # Pinning stays possible.
        pinned = httpx.post(f"{base}/predict", params={"run": "demo"}, files={"file": ("a.png", _png(sample))},
                            timeout=60).json()
        assert pinned["model"]["run"] == "demo"


@pytest.mark.parametrize("variable, value", [("DEFECTS_API_SLOTS", "0"), ("DEFECTS_MAX_UPLOAD_MB", "abc"),
                                             ("DEFECTS_MAX_IMAGE_PIXELS", str(10**12))])
def test_a_bad_setting_stops_serve_with_one_line_naming_it(variable: str, value: str) -> None:
    env = {**os.environ, variable: value}
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--port", str(_free_port())], cwd=config.ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and lines[0].startswith("error: bad DEFECTS_* API setting"), lines
