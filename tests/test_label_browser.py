"""A real browser draws a label: Chromium paints a stroke on the Label page's canvas over a 1,250-pixel-high image,
saves it, and the stroke's pixels are in the saved mask at full resolution; "Good part" writes an all-zero mask."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import config, labels
from tests.test_browser import browser, check_and_shoot, page, pick, server, settle, shots, shown_run  # noqa: F401

pytestmark = pytest.mark.browser
HEIGHT, WIDTH = 1250, 500


@pytest.fixture(scope="module")
def tall_folder() -> Path:
    """Two flat 500x1250 images (nothing for the run to flag), as DATA_DIR/tall/images."""
    folder = config.DATA_DIR / "tall"
    for i, level in enumerate((120, 128)):
        path = folder / "images" / f"tall{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.full((HEIGHT, WIDTH), level, np.uint8))
    return folder


def button(page: object, label: str) -> object:
    """The Streamlit button with this label."""
    return page.locator('[data-testid="stButton"] button').filter(has_text=label).first


def test_a_stroke_drawn_in_the_browser_lands_in_the_saved_mask_at_full_resolution(
        page: object, server: str, shots: Path, shown_run: str, tall_folder: Path) -> None:
    page.goto(f"{server}/Label")
    settle(page, 0)
    pick(page, "Run", shown_run)
    settle(page)
    pick(page, "Images to label", "tall")
    settle(page)
    button(page, "Rank images").click()
    settle(page)
    page.get_by_label("Brush (px of the image)").fill("1")
    page.keyboard.press("Enter")
    settle(page)
    canvas = page.locator(".upper-canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    tile = labels.tiles((HEIGHT, WIDTH))[0]
    per_px = box["width"] / (tile[3] - tile[2])  # CSS px per image px
    row, first, last = 300, 100, 300  # image pixels of the stroke
    y = box["y"] + (row + 0.5) * per_px
    page.mouse.move(box["x"] + (first + 0.5) * per_px, y)
    page.mouse.down()
    for x in range(first, last + 1, 10):
        page.mouse.move(box["x"] + (x + 0.5) * per_px, y)
    page.mouse.up()
    settle(page, 500)
    check_and_shoot(page, shots, "label_stroke")
    button(page, "Save and next").click()
    settle(page)
    out = labels.labels_folder("labels-tall")
    saved = cv2.imread(str(out / "masks" / "tall0.png"), cv2.IMREAD_UNCHANGED)
    assert saved is not None and saved.shape == (HEIGHT, WIDTH)
    ys, xs = np.nonzero(saved)
    assert len(ys), "the stroke did not reach the saved mask"
    assert abs(int(ys.min()) - row) <= 2 and abs(int(ys.max()) - row) <= 2, (ys.min(), ys.max())
    assert abs(int(xs.min()) - first) <= 2 and abs(int(xs.max()) - last) <= 2, (xs.min(), xs.max())
    assert labels.read_labels(out)["tall0"]["label_source"] == "drawn"
    button(page, "Good part").click()
    settle(page)
    good = cv2.imread(str(out / "masks" / "tall1.png"), cv2.IMREAD_UNCHANGED)
    assert good is not None and good.shape == (HEIGHT, WIDTH) and not good.any()
    check_and_shoot(page, shots, "label_saved")
