"""Reading images of any common format and depth, and writing files atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.errors import ImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000  # refuse decompression bombs before decoding


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Convert a decoded image (gray/BGR/BGRA, 8 or 16 bit, or float) to float32 grayscale in [0, 1]."""
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        elif image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        else:
            image = image[:, :, 0]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode image bytes (PNG, JPEG, BMP, TIFF) to a float32 grayscale array in [0, 1]."""
    if not data:
        raise ImageError(f"{name}: the file is empty")
    buffer = np.frombuffer(data, dtype=np.uint8)
    # Read the header first so a tiny file that claims a huge size is refused before decoding.
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.size == 0:
        raise ImageError(f"{name}: not a readable PNG, JPEG, BMP or TIFF image")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({image.shape[1]}x{image.shape[0]} pixels)")
    return to_gray_float(image)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file to float32 grayscale in [0, 1]; raise ImageError with the reason if unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from err
    return decode_image(data, str(path))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file to uint8 {0, 1} (any value > 0 is defect)."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.exists() else np.zeros(0, np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ImageError(f"{path}: mask missing or not a readable image")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return (mask > 0).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """Encode an array as PNG bytes."""
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ImageError("could not encode PNG")
    return buffer.tobytes()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to path via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write an object as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an array as a PNG file atomically."""
    return atomic_write_bytes(path, encode_png(image))
