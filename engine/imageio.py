"""Reading images of any common format and depth.

Two decisions hold everywhere (training, CLI, app, API) because every image passes `decode_raw` and
`to_gray_float`:
- EXIF orientation is ignored: pixels are used as stored, the way line cameras write them and masks are drawn.
- 16-bit data is scaled by the bit depth it uses, the smallest of 10, 12, 14 or 16 bits that holds its largest
  value (machine-vision cameras store 10- and 12-bit pixels in 16-bit files), so a 12-bit image is not read
  as a nearly black 16-bit one.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import ImageError
from engine.storage import atomic_write_bytes

# A damaged file is reported once, by our one-line error; OpenCV's own warnings would say it again on stderr.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000  # refuse decompression bombs before decoding
SIXTEEN_BIT_DEPTHS = (10, 12, 14, 16)


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
        return image.astype(np.float32) / float(2 ** bits_used(image) - 1)
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def bits_used(image: np.ndarray) -> int:
    """The bit depth a 16-bit image uses: the smallest of 10, 12, 14 or 16 bits that holds its largest value."""
    top = int(image.max()) if image.size else 0
    return next(bits for bits in SIXTEEN_BIT_DEPTHS if top < 2**bits)


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode image bytes (PNG, JPEG, BMP, TIFF) to a float32 grayscale array in [0, 1]."""
    return to_gray_float(decode_raw(data, name))


def decode_raw(data: bytes, name: str = "image") -> np.ndarray:
    """Decode image bytes to the array OpenCV gives (gray/BGR/BGRA, 8/16 bit or float), unconverted."""
    if not data:
        raise ImageError(f"{name}: the file is empty")
    buffer = np.frombuffer(data, dtype=np.uint8)
    # Read the header first so a tiny file that claims a huge size is refused before decoding.
    try:
        header = probe_image(data, name)
    except ImageError:
        header = None  # not a format Pillow reads lazily: OpenCV decides below
    if header is not None and header.width * header.height > MAX_PIXELS:
        raise ImageError(f"{name}: declares {header.width}x{header.height} px "
                         f"({header.width * header.height:,} px); the limit is {MAX_PIXELS:,} px")
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as err:  # OpenCV asserts (e.g. OPENCV_IO_MAX_IMAGE_PIXELS) instead of returning None
        raise ImageError(f"{name}: not a readable PNG, JPEG, BMP or TIFF image (OpenCV refused it)") from err
    if image is None or image.size == 0:
        raise ImageError(f"{name}: not a readable PNG, JPEG, BMP or TIFF image")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({image.shape[1]}x{image.shape[0]} pixels)")
    return image


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


def write_png(path: str | Path, image: np.ndarray, durable: bool = True) -> Path:
    """Write an array as a PNG file atomically."""
    return atomic_write_bytes(path, encode_png(image), durable)


# --- Untrusted uploads (the API): format by content, dimensions from the header, limits before decoding ---

UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# Pillow only reads headers here (OpenCV decodes the pixels), so its decompression-bomb guard, which refuses
# without saying the size, gives way to ours: MAX_PIXELS checked against the declared width x height.
Image.MAX_IMAGE_PIXELS = None
_OTHER_SIGNATURES = {b"%PDF": "a PDF document", b"<svg": "an SVG image", b"<?xml": "an XML/SVG document",
                     b"GIF8": "a GIF image", b"RIFF": "a RIFF (WebP/AVI) file", b"PK\x03\x04": "a ZIP archive",
                     b"II+\x00": "a BigTIFF image", b"MM\x00+": "a BigTIFF image", b"\x00\x00\x00\x0cjP": "a JPEG 2000 image"}


class UnsupportedImage(ImageError):
    """The bytes are not a PNG, JPEG, BMP or TIFF image, or the image is corrupt or truncated."""


class ImageTooLarge(ImageError):
    """The upload, or the image size its header declares, is above the configured limit."""


@dataclass(frozen=True)
class ImageHeader:
    """Format and size read from an image header, before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Number of pixels the image declares."""
        return self.width * self.height


def sniff_format(data: bytes) -> str | None:
    """'PNG', 'JPEG', 'BMP' or 'TIFF' from the leading magic bytes (never from a file name), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def probe_image(data: bytes, name: str = "upload") -> ImageHeader:
    """Format and dimensions of image bytes from the header alone; UnsupportedImage if neither can be read."""
    if not data:
        raise UnsupportedImage(f"{name}: the file is empty")
    kind = sniff_format(data)
    if kind is None:
        head = data[:16].lstrip()
        what = next((text for magic, text in _OTHER_SIGNATURES.items() if head.startswith(magic)), "not an image")
        raise UnsupportedImage(f"{name}: {what}; send a {', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]} image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings about odd but readable headers
            with Image.open(io.BytesIO(data), formats=[kind]) as image:  # lazy: reads the header, no pixel
                width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, IndexError, KeyError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise UnsupportedImage(f"{name}: corrupt or truncated {kind} header")
    return ImageHeader(kind, width, height)


def read_limited(stream: BinaryIO, limit_bytes: int, name: str = "upload", chunk_size: int = 1 << 20) -> bytes:
    """Read a file-like object in chunks and refuse it (ImageTooLarge) as soon as it passes limit_bytes."""
    chunks, total = [], 0
    while chunk := stream.read(chunk_size):
        total += len(chunk)
        if total > limit_bytes:
            raise ImageTooLarge(f"{name}: larger than the upload limit of {limit_bytes / 1e6:g} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_upload(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, ImageHeader]:
    """Check untrusted bytes (format by content, size from the header) and only then decode to float32 gray."""
    header = probe_image(data, name)
    limit = min(max_pixels, MAX_PIXELS)
    if header.pixels > limit:
        raise ImageTooLarge(f"{name}: the {header.format} declares {header.width}x{header.height} pixels "
                            f"({header.pixels:,} px); the limit is {limit:,} px")
    try:
        raw = decode_raw(data, name)
    except ImageError as err:
        raise UnsupportedImage(f"{err}; the {header.format} may be truncated or corrupt") from err
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():  # float TIFF; to_gray_float would hide it
        raise UnsupportedImage(f"{name}: the image contains NaN or infinite pixel values")
    return to_gray_float(raw), header
