"""Review: a run's metrics on every image of a folder with masks, worst first, and the threshold trade-off."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.ui import epoch_label, load_predictor, own_test_set, pick_run, progress_bar, sample_folder
from engine import config, data, readiness, runs
from engine.drawing import overlay, to_display
from engine.errors import EngineError
from engine.evaluate import evaluate, found_by_group, select_samples
from engine.imageio import read_image, read_mask
from engine.inspector import Inspector, current_recipe, recipe_version
from engine.metrics import SIZE_BANDS
from engine.progress import Progress, part
from engine.storage import file_version
from engine.tuning import tune_run


@st.cache_resource
def evaluations() -> tuple[threading.Lock, OrderedDict]:
    """The process-wide store of the last 8 folder evaluations (st.cache_data cannot move a bar drawn outside)."""
    return threading.Lock(), OrderedDict()


def evaluation(run_dir: str, epoch: int | str, version: tuple, folder: str, split: str, threshold: float,
               folder_versions: tuple, recipe: tuple, progress: Progress) -> dict:
    """engine.evaluate over a folder split, with the threshold sweep, once per model, folder, threshold and recipe
    (the 8 latest are kept); the versions (engine.storage.file_version) tell a rewritten file; progress moves the
    page's bar while it runs."""
    key = (run_dir, epoch, version, folder, split, threshold, folder_versions, recipe)
    lock, store = evaluations()
    with lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    result = evaluate(load_predictor(run_dir, epoch, version), select_samples(folder, split), threshold,
                      progress=progress, sweep=True)
    with lock:
        store[key] = result
        while len(store) > 8:
            store.popitem(last=False)
    return result


def choose(folders: dict, sample_dir: Path) -> dict:
    """Run, epochs, folder, split and threshold, in the sidebar."""
    with st.sidebar:
        run_id, run_folder, info, saved, best = pick_run(folders, key="review_run")
        default_epoch = best if best in saved else saved[-1]
        if len(saved) > 1:
            picked = st.select_slider("Epochs (one, or two to compare)", options=saved, value=(default_epoch,) * 2,
                                      key=f"review_epochs_{run_id}",
                                      format_func=lambda e: f"{e}{' ★' if e == best else ''}")
        else:
            picked = (saved[0], saved[0])
        choices = {sample_dir.name: sample_dir, **data.dataset_choices()}
        if st.session_state.get("review_folder_of") != run_id:  # a run starts on the test split of its own dataset
            own = own_test_set(info, choices)
            st.session_state.update(review_folder_of=run_id, review_folder=own or sample_dir.name,
                                    review_split="test" if own else "all")
        folder_name = st.selectbox("Folder", list(choices), key="review_folder")
        split = st.selectbox("Split", ["all", "test", "val", "train"], key="review_split")
        try:
            recipe_threshold = current_recipe(run_folder).threshold
        except EngineError as err:
            st.error(str(err))
            st.stop()
        if st.session_state.pop("review_retune", None) == run_id:  # a recipe was just saved: start at its threshold
            st.session_state[f"review_thr_{run_id}"] = recipe_threshold
            st.session_state.pop(f"inspect_thr_{run_id}", None)
        st.session_state.setdefault(f"review_thr_{run_id}", recipe_threshold)  # the state alone sets it: no warning
        threshold = st.slider("Threshold", 0.0, 1.0, step=0.01, key=f"review_thr_{run_id}",
                              help=f"The run's recipe threshold: {recipe_threshold:.2f} (best validation Dice at "
                                   f"{info.threshold:.2f})")
    return {"run_id": run_id, "run_folder": run_folder, "info": info, "folder_name": folder_name,
            "folder": choices[folder_name], "split": split, "threshold": threshold,
            "recipe_threshold": recipe_threshold, "epochs": [picked[0]] if picked[0] == picked[1] else list(picked)}


def evaluate_epochs(sel: dict) -> dict[int | str, dict]:
    """Each chosen epoch over the folder split, with a bar that moves."""
    folder, run_folder, epochs = sel["folder"], sel["run_folder"], sel["epochs"]
    # images/ and masks/, or good/ and the defect folders of a folder sorted by verdict
    state = tuple(file_version(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()) if folder.is_dir() else ()
    results: dict[int | str, dict] = {}
    bar, report = progress_bar(f"Evaluating {sel['folder_name']}…")
    try:
        for index, epoch in enumerate(epochs):
            version = file_version(runs.checkpoint_path(run_folder, epoch))
            results[epoch] = evaluation(str(run_folder), epoch, version, str(folder), sel["split"], sel["threshold"],
                                        state, recipe_version(run_folder),
                                        part(report, index / len(epochs), 1 / len(epochs), f"{epoch_label(epoch)}: "))
    except (EngineError, OSError) as err:
        st.error(f"Cannot review this folder: {err}")
        st.stop()
    finally:
        bar.empty()
    return results


def set_metrics(sel: dict, results: dict[int | str, dict]) -> None:
    """Dice, IoU, detection and false alarms per epoch, the goal missed, and detection by kind and size."""
    for epoch, result in results.items():
        st.markdown(f"**{epoch_label(epoch)}** on {sel['folder_name']} ({sel['split']}, {result['n_images']} images, "
                    f"{result['n_defective']} with defects) at threshold {sel['threshold']:.2f}")
        a, b, c, d = st.columns(4)
        outlined = result["n_outlined_defective"] > 0  # else Dice reads 1.0 for nothing drawn, or None without masks
        a.metric("Dice", f"{result['dice']:.3f}" if outlined else "—", help=None if outlined else (
            "No masks: the folder is sorted by verdict only" if result["n_defective"]
            else "No defective image here: nothing to outline"))
        b.metric("IoU", f"{result['iou']:.3f}" if outlined else "—")
        c.metric("Detection rate", "—" if result["detection_rate"] is None else f"{result['detection_rate']:.0%}")
        d.metric("False-alarm rate",
                 "—" if result["false_alarm_rate"] is None else f"{result['false_alarm_rate']:.0%}")
        if result["too_few"]:
            st.caption(f"Note: {result['too_few']}; these rates show little.")
        if result["goal_missed"]:
            st.warning(f"{result['goal_missed'][0].upper()}{result['goal_missed'][1:]}.")
        if found_by_group(result):
            st.dataframe(pd.DataFrame(found_by_group(result)), hide_index=True, key=f"review_groups_{epoch}",
                         column_config={"detection": st.column_config.NumberColumn(format="percent")})


def per_image(results: dict[int | str, dict], epochs: list) -> tuple[pd.DataFrame, list[int]]:
    """The per-image table, worst first, filtered by kind and size; returns it and the selected rows."""
    first = epochs[0]
    table = pd.DataFrame(results[first]["per_image"])
    table["verdict"] = table["flagged"].map({True: "defect", False: "ok"})
    table["truth"] = table["has_defect"].map({True: "defect", False: "ok"})
    columns = ["id", "dice", "iou", "verdict", "truth", "false_positive_px", "missed_px", "max_score", "defect_types",
               "size_band", "dropped"]
    if len(epochs) == 2:
        other = pd.DataFrame(results[epochs[1]]["per_image"])[["id", "dice"]].rename(columns={"dice": "dice B"})
        table = table.merge(other, on="id")
        table["Δ dice"] = table["dice B"] - table["dice"]
        columns[2:2] = ["dice B", "Δ dice"]
    # Worst first by Dice; an image sorted into a defect folder has none, so it ranks as a miss (0) or a find (1).
    table["rank"] = table["dice"].fillna(table["flagged"].astype(float))
    # Without an outlined defect (good parts only, a folder sorted by verdict) only false-alarm pixels are left.
    if not results[first]["n_outlined_defective"]:
        columns = [c for c in columns if c not in ("dice", "iou", "dice B", "Δ dice", "missed_px")]
    kinds, sizes = st.columns(2)
    pick_kinds = kinds.multiselect("Defect kinds", sorted({k for row in table["kinds"] for k in row}),
                                   key="review_kinds", help="Show only images of these kinds (none picked: all)")
    pick_sizes = sizes.multiselect("Defect sizes", [b for b in SIZE_BANDS if b in results[first]["by_size"]],
                                   key="review_sizes",
                                   help="Show only images whose defects cover this share of the image")
    if pick_kinds:
        table = table[table["kinds"].map(lambda row: bool(set(pick_kinds) & set(row)))]
    if pick_sizes:
        table = table[table["size_band"].isin(pick_sizes)]
    table = table.sort_values(["rank", "false_positive_px"], ascending=[True, False]).reset_index(drop=True)[columns]
    st.subheader("Per image" + (f" ({epoch_label(first)}; dice B = {epoch_label(epochs[1])})"
                                if len(epochs) == 2 else ""))
    selection = st.dataframe(table, hide_index=True, on_select="rerun", selection_mode="single-row",
                             key="review_table", column_config={
                                 c: st.column_config.NumberColumn(format="%.3f")
                                 for c in ("dice", "iou", "dice B", "Δ dice", "max_score") if c in table})
    return table, (selection.selection.rows if selection else [])


def one_image(sel: dict, sample_id: str) -> None:
    """The selected image, its truth, each epoch's mask, and a way to open it in Inspect."""
    run_folder, epochs = sel["run_folder"], sel["epochs"]
    sample = next(s for s in data.scan_dataset(sel["folder"], validate=False).samples if s.id == sample_id)
    st.subheader(f"Image {sample_id}")
    image = read_image(sample.image_path)
    truth = read_mask(sample.mask_path) if sample.mask_path else None
    views = st.columns(2 + len(epochs))
    views[0].image(to_display(image), caption="Input", width="stretch")
    views[1].image(overlay(image, truth if truth is not None else np.zeros(image.shape, np.uint8),
                           color=(40, 200, 80)), width="stretch",
                   caption="Ground truth" if truth is not None else (
                       f"Sorted as {sample.defect_types}: no outline" if sample.defective else "No mask file: defect-free"))
    for view, epoch in zip(views[2:], epochs):
        version = file_version(runs.checkpoint_path(run_folder, epoch))
        _, inspection = Inspector(load_predictor(str(run_folder), epoch, version)).inspect(image, sel["threshold"])
        view.image(overlay(image, inspection.mask), caption=f"{epoch_label(epoch)}: {inspection.verdict}",
                   width="stretch")
    if st.button("Open in Inspect", key="review_open"):
        st.session_state["inspect_request"] = {"run": sel["run_id"], "sample": sample_id,
                                               "folder": sel["folder_name"], "epochs": [epochs[0], epochs[-1]]}
        st.switch_page("app_pages/4_Inspect.py")


def threshold_sweep(sel: dict, results: dict[int | str, dict]) -> None:
    """Dice and false alarms against the threshold, with the recipe's and the slider's marked."""
    st.subheader("Threshold trade-off")
    figure = go.Figure()
    for epoch, result in results.items():
        sweep = result["sweep"]
        xs = [row["threshold"] for row in sweep]
        figure.add_trace(go.Scatter(x=xs, y=[row["dice"] for row in sweep], name=f"Dice ({epoch_label(epoch)})",
                                    mode="lines+markers"))
        figure.add_trace(go.Scatter(x=xs, y=[row["false_alarm_rate"] for row in sweep], mode="lines",
                                    name=f"false alarms ({epoch_label(epoch)})", line={"dash": "dot"}))
    recipe_threshold, threshold = sel["recipe_threshold"], sel["threshold"]
    figure.add_vline(x=recipe_threshold, line_dash="dash", line_color="gray",
                     annotation_text=f"recipe {recipe_threshold:.2f}")
    if abs(threshold - recipe_threshold) > 1e-9:
        figure.add_vline(x=threshold, line_color="firebrick", annotation_text=f"now {threshold:.2f}",
                         annotation_position="bottom right")
    figure.update_layout(height=360, xaxis_title="threshold", yaxis_title="rate / score", yaxis_range=[0, 1.02],
                         legend={"orientation": "h"}, margin={"l": 10, "r": 10, "t": 20, "b": 10})
    st.plotly_chart(figure, key="review_sweep")


def tune_form(sel: dict) -> None:
    """The line's goals and the button that tunes the run's recipe on this folder and saves it."""
    first, run_folder, info = sel["epochs"][0], sel["run_folder"], sel["info"]
    st.subheader("Tune the inspection recipe")
    st.caption(f"Finds the threshold and minimum region size that flag the most defective images of this folder "
               f"while keeping false alarms on its defect-free images under your goal, and saves them as the run's "
               f"recipe (used by Inspect, `predict` and the API). Uses {epoch_label(first)}; tune on images the model "
               "was not trained on.")
    goal_col, detect_col, bound_col, button_col = st.columns([1, 1, 2, 1])
    goal = goal_col.number_input("Max false alarms (%)", 0.0, 100.0, readiness.false_alarm_goal(info) * 100, 0.5,
                                 key="review_goal", help="The run's own goal (train's --max-false-alarm) until changed.")
    goal_detection = detect_col.number_input(
        "Min detection (%)", 0.0, 100.0, readiness.detection_goal(info) * 100, 1.0, key="review_goal_detection",
        help="The share of defective parts the recipe must find for the run to be ready: the run's own goal "
             "(train's --goal-detection) until changed.")
    on_bound = bound_col.checkbox("Hold the goal at 95 % confidence", value=True, key="review_bound",
                                  help="Apply the goal to the upper 95 % bound of the false-alarm rate, not to the "
                                       "rate measured on these images, so it also holds on new parts. Needs many "
                                       "defect-free images: 0 of 60 flagged still bounds the rate at 4.3 %.")
    if not button_col.button("Tune and save", key="review_tune", type="primary"):
        return
    version = file_version(runs.checkpoint_path(run_folder, first))
    tuning_bar, report = progress_bar("Scoring every image…")
    try:
        tuned, result, notes = tune_run(load_predictor(str(run_folder), first, version),
                                        select_samples(sel["folder"], sel["split"]), goal / 100,
                                        0.95 if on_bound else None,
                                        context={"data": str(sel["folder"]), "split": sel["split"]},
                                        goal_detection=goal_detection / 100, progress=report)
    except (EngineError, OSError) as err:
        tuning_bar.empty()
        st.error(f"Cannot tune on this folder: {err}")
        return
    bound_text = "" if result["false_alarm_bound"] is None else f" (95 % bound {result['false_alarm_bound']:.1%})"
    alarms = "not measured" if result["false_alarm_rate"] is None else f"{result['false_alarm_rate']:.1%}"
    # Shown after the rerun that moves the threshold sliders (here and on Inspect) to the saved recipe.
    st.session_state["review_saved"] = (result["goal_met"], [
        f"Recipe saved: {tuned.describe()}. "
        f"On these {result['n_images']} images: detection {result['detection_rate']:.1%}, "
        f"false alarms {alarms}{bound_text}." + (f" The {result['readiness']}." if result.get("readiness") else ""),
        *notes])
    st.session_state["review_retune"] = sel["run_id"]
    st.rerun()


def saved_message() -> None:
    """What the last tuning saved (shown once, after the rerun that moved the sliders)."""
    message = st.session_state.pop("review_saved", None)
    if message:
        goal_met, (summary, *notes) = message
        (st.success if goal_met else st.warning)(summary)
        for note in notes:
            st.warning(note)


def main() -> None:
    """The page: choices in the sidebar; set figures; the images worst first; the threshold; tuning."""
    st.title(":material/fact_check: Review a folder")
    st.caption("Every image of a folder through the chosen epoch(s): per-image scores worst first, set rates, "
               "and how Dice and false alarms move with the threshold. Click a row to look at the image. A folder "
               "sorted by verdict (good/ beside a folder of rejected parts per defect kind, imported with `python -m "
               "engine import`) needs no masks: it gives the verdict rates and tunes on them.")
    try:
        sample_dir = Path(sample_folder())
    except EngineError as err:
        st.error(f"The sample folder could not be created: {err}")
        sample_dir = config.SAMPLE_DIR
    folders = runs.runs_with_models()
    if not folders:
        st.info("No trained model yet. Train one on the Train page, then review it here.")
        return
    sel = choose(folders, sample_dir)
    results = evaluate_epochs(sel)
    set_metrics(sel, results)
    table, rows = per_image(results, sel["epochs"])
    if rows:
        one_image(sel, str(table.iloc[rows[0]]["id"]))
    threshold_sweep(sel, results)
    tune_form(sel)
    saved_message()


main()
