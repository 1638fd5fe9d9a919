"""Metal-surface defect segmentation engine: data, model, training, inference, export, registry."""

import os

# OpenCV refuses to decode images above this many pixels (decompression bombs); must be set before
# OpenCV first decodes anything.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(100_000_000))

__version__ = "0.1.0"
