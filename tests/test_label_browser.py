"""A real browser draws a label: Chromium paints a stroke on the Label page's canvas over a 1,250-pixel-high image,
erases part of it and undoes that, saves, and the stroke's pixels are in the saved mask at full resolution; "Good
part" writes an all-zero mask."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import config, labels
from tests.test_browser import browser, check_and_shoot, page, pick, server, settle, shots, shown_run  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]
HEIGHT, WIDTH = 1250, 500


@pytest.fixture(scope="module")
def tall_folder() -> Path:
    """Three flat 500x1250 images (nothing for the run to flag), as DATA_DIR/tall/images."""
    folder = config.DATA_DIR / "tall"
    for i, level in enumerate((120, 128, 136)):
        path = folder / "images" / f"tall{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.full((HEIGHT, WIDTH), level, np.uint8))
    return folder


def button(page: object, label: str) -> object:
    """The Streamlit button with this label."""
    return page.locator('[data-testid="stButton"] button').filter(has_text=label).first


def stroke(page: object, row: int, first: int, last: int) -> None:
    """Drag the mouse along image row `row` from column `first` to `last` on the canvas of the first tile."""
    canvas = page.locator(".upper-canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    tile = labels.tiles((HEIGHT, WIDTH))[0]
    per_px = box["width"] / (tile[3] - tile[2])  # CSS px per image px
    y = box["y"] + (row + 0.5) * per_px
    page.mouse.move(box["x"] + (first + 0.5) * per_px, y)
    page.mouse.down()
    for x in [*range(first, last, 10), last]:
        page.mouse.move(box["x"] + (x + 0.5) * per_px, y)
    page.mouse.up()
    settle(page, 500)


def shown(page: object) -> str:
    """The id of the image the page shows (its heading: "<id> (N left in the queue)")."""
    return page.get_by_text("left in the queue").first.inner_text().split()[0]


def draw_and_erase(page: object, undo: bool) -> str:
    """A 1 px stroke along row 300 (columns 100-300), folded in; then columns 100-200 erased with a 9 px brush and
    folded in; then, with `undo`, that erasing taken back; then saved. Returns the image's id."""
    name = shown(page)
    page.get_by_label("Brush (px of the image)").fill("1")
    page.keyboard.press("Enter")
    settle(page)
    page.locator('[data-testid="stRadio"]').get_by_text("paint defect", exact=True).click()
    settle(page)
    stroke(page, 300, 100, 300)
    button(page, "Apply strokes").click()
    settle(page)
    page.locator('[data-testid="stRadio"]').get_by_text("erase", exact=True).click()
    settle(page)
    page.get_by_label("Brush (px of the image)").fill("9")
    page.keyboard.press("Enter")
    settle(page)
    stroke(page, 300, 100, 200)
    button(page, "Apply strokes").click()
    settle(page)
    if undo:
        button(page, "Undo").click()
        settle(page)
    button(page, "Save and next").click()
    settle(page)
    return name


def saved_mask(name: str) -> np.ndarray:
    """The mask the page saved for one of the tall images, at full resolution."""
    mask = cv2.imread(str(labels.labels_folder("labels-tall") / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.shape == (HEIGHT, WIDTH)
    return mask


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
    first = draw_and_erase(page, undo=True)  # the whole stroke
    ys, xs = np.nonzero(saved_mask(first))
    assert len(ys), "the stroke did not reach the saved mask"
    assert abs(int(ys.min()) - 300) <= 2 and abs(int(ys.max()) - 300) <= 2, (ys.min(), ys.max())
    assert abs(int(xs.min()) - 100) <= 2 and abs(int(xs.max()) - 300) <= 2, (xs.min(), xs.max())
    assert labels.read_labels(labels.labels_folder("labels-tall"))[first]["label_source"] == "drawn"
    second = draw_and_erase(page, undo=False)  # what is left of it
    ys, xs = np.nonzero(saved_mask(second))
    assert len(ys) and abs(int(ys.min()) - 300) <= 2 and abs(int(ys.max()) - 300) <= 2
    assert 200 <= int(xs.min()) <= 210 and abs(int(xs.max()) - 300) <= 2, (xs.min(), xs.max())
    check_and_shoot(page, shots, "label_stroke")
    third = shown(page)
    button(page, "Good part").click()
    settle(page)
    assert len({first, second, third}) == 3 and not saved_mask(third).any()
    check_and_shoot(page, shots, "label_saved")
