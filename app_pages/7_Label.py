"""Label: the images a run is least sure of, one at a time, its mask as the start; paint or erase defect pixels, or
mark a good part or a defect not outlined; save into a labelled dataset; then fine-tune the run on the labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import streamlit as st
from streamlit_drawable_canvas import st_canvas

from app_pages.ui import load_predictor, pick_run, run_with_progress
from engine import data, labelqueue, labels, runs
from engine.drawing import overlay
from engine.errors import EngineError
from engine.imageio import decode_raw, encode_png, read_image
from engine.inspector import Inspector
from engine.storage import file_version

st.title(":material/brush: Label what the run is unsure of")
st.caption("The queue ranks the images by how unsure the run is: wrong verdicts where the folder has labels, then, "
           "where the run validated on no real defect, the likeliest defects (a fine-tune needs a few to learn from "
           "and to show its detection), then images on which the best and an earlier epoch disagree, then scores "
           "nearest the threshold. Each image opens with the run's mask: paint or erase pixels, or mark it with one "
           "click. Labels go into a labelled dataset (your images are copied, never changed); 'Train on my labels' "
           "fine-tunes the run on them.")
HEX = "#{:02x}{:02x}{:02x}"


def the_queue(run_id: str, folder: Path, labels_dir: Path, top: int) -> None:
    """Rank the folder's unlabelled images for this run into the session (a progress bar while it predicts)."""
    queue = run_with_progress("Ranking the images", lambda progress: labelqueue.label_queue(
        run_id, folder, top, labels=labels_dir, progress=progress, keep_masks=True))
    if queue is not None:
        st.session_state.label_queue = {"key": (run_id, str(folder)), "items": labelqueue.as_rows(queue),
                                        "masks": {item.id: item.mask_png for item in queue}}
        st.session_state.pop("label_item", None)


def open_item(row: dict[str, Any], run_dir: Path, mask_png: bytes | None) -> dict[str, Any]:
    """The editing state of a queue image: the image, the run's mask (the start: kept from the ranking, else
    predicted), the mask being edited, the undo history, the tile shown and the canvas's generation (a new one
    clears its strokes)."""
    image = read_image(row["path"])
    start = (decode_raw(mask_png, "mask") > 0).astype(np.uint8) if mask_png else None
    if start is None or start.shape != image.shape:
        predictor = load_predictor(str(run_dir), "best", file_version(runs.checkpoint_path(run_dir, "best")))
        start = Inspector(predictor).inspect(image)[1].mask.astype(np.uint8)
    return {"row": row, "image": image, "start": start, "mask": start.copy(), "history": [], "tile": 0, "gen": 0,
            "strokes": None}


def commit_strokes() -> None:
    """Fold the canvas's strokes into the mask (one undo step) and start a clean canvas."""
    item = st.session_state.label_item
    tile = labels.tiles(item["image"].shape)[item["tile"]]
    merged = labels.apply_strokes(item["mask"], item["strokes"], tile)
    if not np.array_equal(merged, item["mask"]):
        item["history"].append(item["mask"])
        item["mask"] = merged
    item["strokes"], item["gen"] = None, item["gen"] + 1


def change_tile(key: str) -> None:
    """Keep the strokes of the tile left, then show the one picked."""
    commit_strokes()
    st.session_state.label_item["tile"] = st.session_state[key]


def undo() -> None:
    """Undo within the image: the canvas's strokes first, then the last change folded into the mask."""
    item = st.session_state.label_item
    if item["strokes"] is not None:
        item["strokes"], item["gen"] = None, item["gen"] + 1
    elif item["history"]:
        item["mask"], item["gen"] = item["history"].pop(), item["gen"] + 1


def save(labels_dir: Path, source: str | None) -> None:
    """Write the image's label (`source` None: the edited mask, drawn or accepted) and move to the next image."""
    item = st.session_state.label_item
    if source is None:
        commit_strokes()
        source = labels.source_of(item["start"], item["mask"])
    try:
        mask = None if source == labels.IMAGE_LEVEL else item["mask"]
        labels.save_label(labels_dir, item["row"]["path"], source, mask)
    except EngineError as err:
        st.session_state.label_error = str(err)
        return
    st.session_state.label_saved = f"{item['row']['id']} saved as {source.replace('_', '-')}"
    st.session_state.label_queue["items"].pop(0)
    st.session_state.pop("label_item", None)


def canvas(item: dict[str, Any]) -> None:
    """The tile picker, the brush and the canvas; the canvas's strokes are kept in the item."""
    grid = labels.tiles(item["image"].shape)
    if len(grid) > 1:
        key = f"label_tile_{item['row']['id']}"
        st.selectbox("Tile", range(len(grid)), index=item["tile"], key=key, on_change=change_tile, args=(key,),
                     format_func=lambda i: f"{i + 1} of {len(grid)}: rows {grid[i][0]}–{grid[i][1]}, "
                                           f"columns {grid[i][2]}–{grid[i][3]}")
    tile = grid[item["tile"]]
    y0, y1, x0, x1 = tile
    scale = labels.canvas_scale(tile)
    left, right = st.columns(2)
    brush = left.number_input("Brush (px of the image)", min_value=1, max_value=200, value=3, step=1)
    erase = right.radio("Brush does", ["paint defect", "erase"], horizontal=True) == "erase"
    shown = overlay(item["image"][y0:y1, x0:x1], item["mask"][y0:y1, x0:x1])
    result = st_canvas(stroke_width=max(1, round(brush * scale)),
                       stroke_color=HEX.format(*(labels.ERASE if erase else labels.PAINT)),
                       background_image=encode_png(cv2.cvtColor(shown, cv2.COLOR_RGB2BGR)),
                       height=round((y1 - y0) * scale), width=round((x1 - x0) * scale), drawing_mode="freedraw",
                       return_image_data=True, key=f"label_canvas_{item['row']['id']}_{item['gen']}")
    layer = result.image_data if result is not None and result.json_data else None
    item["strokes"] = layer if layer is not None and layer.ndim == 3 and layer[..., 3].any() else None


def editor(labels_dir: Path, run_dir: Path) -> None:
    """The queue's next image: why it is next, the canvas and the buttons that save it."""
    queue = st.session_state.label_queue["items"]
    if not queue:
        st.success("The queue is empty: every ranked image is labelled. Rank again, or train on your labels.")
        return
    row = queue[0]
    if st.session_state.get("label_item", {}).get("row", {}).get("id") != row["id"]:
        try:
            mask_png = st.session_state.label_queue.get("masks", {}).get(row["id"])
            st.session_state.label_item = open_item(row, run_dir, mask_png)
        except EngineError as err:
            st.error(f"{row['id']} cannot be opened: {err}")
            st.button("Skip it", on_click=queue.pop, args=(0,))
            return
    item = st.session_state.label_item
    st.subheader(f"{row['id']} ({len(queue)} left in the queue)")
    st.info(f"**Why this image:** {row['reason']}; the run says {row['verdict']}.")
    canvas(item)
    cols = st.columns(5)
    cols[0].button("Undo", on_click=undo, disabled=item["strokes"] is None and not item["history"])
    cols[1].button("Apply strokes", on_click=commit_strokes, disabled=item["strokes"] is None,
                   help="fold the strokes into the mask and show it (saving does it too)")
    cols[2].button("Save and next", type="primary", on_click=save, args=(labels_dir, None))
    cols[3].button("Good part", on_click=save, args=(labels_dir, "good"), help="no defect: an all-zero mask")
    cols[4].button("Defect, not outlined", on_click=save, args=(labels_dir, labels.IMAGE_LEVEL),
                   help="a defect whose pixels you do not draw: it counts for detection and tuning, not training")


def fine_tune(labels_dir: Path, run_id: str) -> None:
    """'Train on my labels' and, once that run has ended, the before/after comparison."""
    st.divider()
    st.subheader("Train on my labels")
    counts = labels.label_counts(labels_dir)
    st.caption(f"{labels_dir}: " + ", ".join(f"{n} {source.replace('_', '-')}" for source, n in counts.items()))
    minutes = st.number_input("Minutes", min_value=0.1, max_value=120.0, value=5.0, step=1.0, key="label_minutes")
    if st.button("Train on my labels", disabled=not sum(counts.values())):
        try:
            st.session_state.label_tuned = (run_id, labels.start_fine_tune(labels_dir, run_id, minutes))
        except EngineError as err:
            st.error(str(err))
    if "label_tuned" in st.session_state:
        before, after = st.session_state.label_tuned
        ended = runs.read_record(runs.run_dir(after)).status in ("completed", "failed", "cancelled")
        st.fragment(fine_tune_status, run_every=None if ended else 5)(labels_dir, before, after, not ended)


def fine_tune_status(labels_dir: Path, before: str, after: str, polling: bool) -> None:
    """The fine-tune's status (refreshed every 5 s while it runs) and, once it completed, before and after."""
    status = runs.read_record(runs.run_dir(after)).status
    if polling and status in ("completed", "failed", "cancelled"):
        st.rerun()  # the whole page again: the fragment stops polling, so what the button shows stays
    if status != "completed":
        st.info(f"Fine-tune {after} is {status}; the Train page shows its progress. Before / after comes here when "
                "it has completed.")
        return
    if st.button("Show before / after", help="evaluates both runs on the labelled set and on the run's validation"):
        rows = run_with_progress("Comparing", lambda progress: labels.before_after(labels_dir, before, after, progress))
        if rows:
            st.dataframe(rows, hide_index=True)


def main() -> None:
    """The page: run, folder and labelled set in the sidebar; the queue; the editor; fine-tuning."""
    folders = runs.runs_with_models()
    choices = data.dataset_choices()
    if not folders:
        st.info("Train a run first: the queue ranks a folder's images by how unsure a run is of them.")
        return
    with st.sidebar:
        run_id, run_dir, _, _, _ = pick_run(folders, "label_run")
        name = st.selectbox("Images to label", list(choices), key="label_data")
        typed = st.text_input("Or a folder", key="label_folder", placeholder="/path/to/images",
                              help="any folder of images (or DIR/images with DIR/masks) instead of the one above")
        folder = Path(typed).expanduser() if typed.strip() else choices.get(name)
        if folder is None:
            st.info("Pick or type a folder of images to label.")
            return
        label_name = st.text_input("Labelled dataset", value=f"labels-{folder.name}", key=f"label_name_{folder.name}")
        top = st.number_input("Queue length", min_value=1, max_value=500, value=20)
    try:
        labels_dir = labels.labels_folder(label_name)
    except EngineError as err:
        st.error(str(err))
        return
    for key, show in (("label_error", st.error), ("label_saved", st.success)):
        if key in st.session_state:
            show(st.session_state.pop(key))
    if st.button("Rank images", type="primary"):
        the_queue(run_id, folder, labels_dir, int(top))
    queue = st.session_state.get("label_queue")
    if queue and queue["key"] == (run_id, str(folder)):
        with st.expander(f"The queue ({len(queue['items'])} images)"):
            st.dataframe(queue["items"], hide_index=True, column_order=("rank", "id", "verdict", "score", "reason"))
        editor(labels_dir, run_dir)
    fine_tune(labels_dir, run_id)


main()
