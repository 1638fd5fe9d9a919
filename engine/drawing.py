"""Pictures for people: heatmaps, overlays and the difference of two masks."""

from __future__ import annotations

import cv2
import numpy as np

from engine.errors import EngineError
from engine.imageio import to_gray_float


def create_heatmap(probability: np.ndarray) -> np.ndarray:
    """RGB uint8 heatmap of a probability map (inferno colour map)."""
    scaled = np.clip(probability * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def to_display(image: np.ndarray) -> np.ndarray:
    """RGB uint8 version of any input image for display."""
    gray = to_gray_float(image) if not (image.ndim == 2 and image.dtype == np.float32) else image
    return cv2.cvtColor(np.clip(gray * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.45) -> np.ndarray:
    """RGB image with the mask tinted and outlined in `color`."""
    rgb = to_display(image)
    mask = mask.astype(bool)
    tinted = rgb.copy()
    tinted[mask] = (1 - alpha) * rgb[mask] + alpha * np.array(color)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tinted, contours, -1, color, 1)
    return tinted


DIFF_COLORS = {"only_a": (255, 140, 0), "only_b": (0, 160, 255), "both": (230, 230, 230)}


def difference_image(image: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """RGB image coding where only mask A (orange), only mask B (blue) or both (white) flag a defect."""
    a, b = mask_a.astype(bool), mask_b.astype(bool)
    if a.shape != b.shape:
        raise EngineError(f"masks differ in size: {a.shape} vs {b.shape}")
    rgb = (to_display(image) * 0.5).astype(np.uint8)  # dim the surface so the coded pixels stand out
    for key, where in (("only_a", a & ~b), ("only_b", b & ~a), ("both", a & b)):
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.array(DIFF_COLORS[key])
    return rgb


def mask_difference(mask_a: np.ndarray, mask_b: np.ndarray) -> dict[str, int]:
    """Pixel counts flagged only by A, only by B, and by both."""
    a, b = mask_a.astype(bool), mask_b.astype(bool)
    return {"only_a": int((a & ~b).sum()), "only_b": int((b & ~a).sum()), "both": int((a & b).sum())}
