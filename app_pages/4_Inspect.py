"""Inspect: one image through one or two epochs of a run, at any threshold, against its ground truth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app_pages.ui import (
    epoch_label,
    for_display,
    load_predictor,
    own_test_set,
    pick_run,
    probability_cache,
    progress_bar,
    sample_folder,
)
from engine import config, data, runs
from engine.data import scan_dataset
from engine.drawing import create_heatmap, difference_image, mask_difference, overlay, to_display
from engine.errors import EngineError
from engine.imageio import decode_image, read_mask
from engine.inference import Predictor, model_file
from engine.inspection import Inspection, inspect, why_counted
from engine.inspector import current_recipe
from engine.metrics import dice_score, iou_score
from engine.runrecord import RunRecord
from engine.serving import gated_backends, refusals
from engine.storage import file_version

DEVICES = config.devices()
UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"]
MAX_REGIONS_SHOWN = 8


def probability(predictor: Predictor, image: np.ndarray, key: tuple, label: str) -> np.ndarray:
    """Defect probabilities of an image, computed once per (model file, image) and kept in a bounded cache.

    A large image shows a progress bar with the tiles done; a threshold move reuses the stored map.
    """
    cache = probability_cache()
    stored = cache.get(key)
    if stored is not None:
        return stored
    bar, report = progress_bar(f"Running {label}…")
    proba = predictor.predict_proba(image, progress=report)
    bar.empty()
    proba = proba.astype(np.float16)  # half the memory; the threshold slider moves in steps of 0.01
    cache.put(key, proba)
    return proba


def apply_request() -> None:
    """A request from the Review page: open this run, epochs and sample."""
    request = st.session_state.pop("inspect_request", None)
    if not request:
        return
    st.session_state.update({"inspect_run": request["run"], "inspect_source": "A folder",
                             "inspect_sample": request["sample"], "inspect_folder": request.get("folder"),
                             "inspect_folder_of": request["run"]})
    # A fresh widget key lets the requested epochs be the slider's default value.
    st.session_state["inspect_nonce"] = st.session_state.get("inspect_nonce", 0) + 1
    st.session_state["inspect_epochs_request"] = tuple(request.get("epochs") or ())


def default_run(folders: dict) -> None:
    """Open the latest run unless one is picked (and say so where the picked one is gone)."""
    try:
        latest = runs.resolve_run("latest")
        default = "demo" if latest == config.DEMO_RUN_DIR else latest.name
    except EngineError:
        default = ""
    default = default if default in folders else next(iter(folders))
    if st.session_state.get("inspect_run") not in folders:
        if st.session_state.get("inspect_run"):
            st.warning(f"Run {st.session_state['inspect_run']} no longer exists (deleted?); showing {default}.")
        st.session_state["inspect_run"] = default


def pick_epochs(run_id: str, saved: list, best: int | None) -> tuple:
    """One epoch, or two to compare (a requested pair where the Review page asked for one)."""
    default_epoch = best if best in saved else saved[-1]
    requested = st.session_state.get("inspect_epochs_request") or ()
    value = tuple(requested) if len(requested) == 2 and all(e in saved for e in requested) else (default_epoch,) * 2
    current = st.session_state.get(f"inspect_epochs_{run_id}_{st.session_state.get('inspect_nonce', 0)}")
    if current is not None and not all(e in saved for e in current):  # epochs vanished: start afresh
        st.session_state["inspect_nonce"] = st.session_state.get("inspect_nonce", 0) + 1
    epochs_key = f"inspect_epochs_{run_id}_{st.session_state.get('inspect_nonce', 0)}"
    if len(saved) > 1:
        return st.select_slider("Epochs (one, or two to compare)", options=saved, value=value, key=epochs_key,
                                format_func=lambda e: f"{e}{' ★' if e == best else ''}",
                                help="★ best validation epoch. Drag the ends apart to compare two epochs.")
    st.caption(f"Model: {epoch_label(saved[0])}" + (f" (epoch {best})" if saved[0] == "best" and best else ""))
    return saved[0], saved[0]


def model_sidebar(folders: dict) -> dict:
    """Run, epochs, backend, device and threshold, in the sidebar."""
    with st.sidebar:
        run_id, folder, info, saved, best = pick_run(folders, key="inspect_run")
        picked = pick_epochs(run_id, saved, best)
        backends = ["torch", *gated_backends(folder)]  # a backend that failed its accuracy gate here is not offered
        backend = st.radio("Backend", backends, horizontal=True, key="inspect_backend") if len(backends) > 1 else "torch"
        for reason in refusals(folder).values():
            st.caption(f"Not offered on this CPU: {reason}")
        device = st.radio("Device", DEVICES if backend == "torch" else ["cpu"], horizontal=True, key="inspect_device")
        try:  # the run's inspection rules (threshold, min region area ...); the slider starts at its threshold
            base_recipe = current_recipe(folder)
        except EngineError as err:
            st.error(str(err))
            st.stop()
        threshold = st.slider("Threshold", 0.0, 1.0, base_recipe.threshold, 0.01, key=f"inspect_thr_{run_id}",
                              help=f"The run's recipe threshold: {base_recipe.threshold:.2f} (best validation Dice at "
                                   f"{info.threshold:.2f})")
    epochs: list[int | str] = [picked[0]] if picked[0] == picked[1] or backend != "torch" else list(picked)
    if backend != "torch":
        st.caption(f"The {backend} export holds one model; the epoch slider does not apply.")
    return {"run_id": run_id, "folder": folder, "info": info, "epochs": epochs, "backend": backend,
            "device": device, "recipe": base_recipe.with_overrides(threshold=threshold), "threshold": threshold}


def pick_sample(sample_dir: Path, run_id: str, info: RunRecord):
    """A sample of a folder (a run starts on the test split of its own dataset, on a defect it did not see)."""
    folder_choices = {sample_dir.name: sample_dir, **data.dataset_choices()}
    if st.session_state.get("inspect_folder_of") != run_id:  # a run starts on the test split of its own dataset
        own_folder = own_test_set(info, folder_choices)
        st.session_state.update(inspect_folder_of=run_id, inspect_own_folder=own_folder,
                                inspect_folder=own_folder or sample_dir.name)
    if st.session_state.get("inspect_folder") not in folder_choices:
        st.session_state["inspect_folder"] = sample_dir.name
    picked_folder = st.selectbox("Folder", list(folder_choices), key="inspect_folder",
                                 help="A run starts on the test split of its own dataset (images training did "
                                      "not see); or the sample folder, or any dataset folder")
    try:
        samples = {s.id: s for s in scan_dataset(folder_choices[picked_folder], validate=False).samples}
    except EngineError as err:
        st.error(str(err))
        st.stop()
    if st.session_state.get("inspect_sample") not in samples:
        st.session_state.pop("inspect_sample", None)
        # A labelled defect training did not see, where there is one.
        labelled = [i for i, s in samples.items() if s.defective]
        own = picked_folder == st.session_state.get("inspect_own_folder")  # its test split: not seen in training
        st.session_state["inspect_sample"] = next((i for i in labelled if own and samples[i].split == "test"),
                                                  next(iter(labelled or samples)))
    sample_id = st.selectbox("Sample", list(samples), key="inspect_sample",
                             format_func=lambda i: f"{i} — {samples[i].kind}")
    return samples[sample_id]


def pick_image(sample_dir: Path, run_id: str, info: RunRecord) -> dict:
    """The image (from a folder or uploaded), its sample and ground truth where it has one."""
    source = st.radio("Image", ["A folder", "Upload"], horizontal=True, key="inspect_source")
    truth: np.ndarray | None = None
    has_mask_file = False
    if source == "A folder":
        sample = pick_sample(sample_dir, run_id, info)
        raw, name = sample.image_path.read_bytes(), sample.image_path.name
    else:
        upload = st.file_uploader("Image file", type=UPLOAD_TYPES, key="inspect_upload")
        if upload is None:
            st.info("Upload a PNG, JPEG, BMP or TIFF image (up to 20 MB), or switch to a folder.")
            st.stop()
        raw, name, sample = upload.getvalue(), upload.name, None
    try:
        image = decode_image(raw, name)
        if sample is not None and sample.mask_path is not None:
            truth, has_mask_file = read_mask(sample.mask_path), True
            if truth.shape != image.shape:
                raise EngineError(f"{sample.mask_path.name}: mask size differs from the image")
    except EngineError as err:
        st.error(f"Cannot use this image: {err}")
        st.stop()
    return {"image": image, "name": name, "sample": sample, "truth": truth, "has_mask_file": has_mask_file,
            "sha1": hashlib.sha1(raw).hexdigest()}


def inspect_epochs(model: dict, shot: dict) -> tuple[dict[int | str, Inspection], dict[int | str, str]]:
    """The verdict, regions and mask under the run's recipe per epoch, and what each one is called on the page."""
    inspections: dict[int | str, Inspection] = {}
    labels: dict[int | str, str] = {}
    folder, backend, device = model["folder"], model["backend"], model["device"]
    try:
        for epoch in model["epochs"]:
            version = file_version(model_file(folder, backend, epoch))
            predictor = load_predictor(str(folder), epoch, version, backend, device)
            # An export holds one model: name it by the epoch it was exported from, not by the slider.
            labels[epoch] = epoch_label(epoch) if backend == "torch" else f"{backend} export of epoch {predictor.epoch}"
            key = (str(folder), epoch, backend, device, version, shot["sha1"])
            proba = probability(predictor, shot["image"], key, labels[epoch])  # kept across threshold moves
            inspections[epoch] = inspect(proba, model["recipe"])
    except (EngineError, OSError) as err:
        st.error(f"Cannot load the model: {err}")
        st.stop()
    return inspections, labels


def scores_sidebar(shot: dict, inspections: dict, labels: dict) -> None:
    """Dice and IoU against the truth, or the verdict or flagged pixels where there is no outline."""
    truth, sample = shot["truth"], shot["sample"]
    with st.sidebar:
        st.subheader("Scores")
        if truth is not None:
            for epoch, inspection in inspections.items():
                left, right = st.columns(2)
                left.metric(f"Dice ({labels[epoch]})", f"{dice_score(inspection.mask, truth):.4f}")
                right.metric(f"IoU ({labels[epoch]})", f"{iou_score(inspection.mask, truth):.4f}")
        elif sample is not None and sample.defective:  # sorted into a defect folder: a verdict, no outline
            st.info(f"This image was sorted as {sample.defect_types}, without a mask: it should be flagged, and Dice "
                    "needs an outline.")
            for epoch, inspection in inspections.items():
                st.metric(f"Verdict ({labels[epoch]})", inspection.verdict)
        elif sample is not None:
            st.info("This sample has no mask file, so it is defect-free: every flagged pixel is a false alarm.")
            for epoch, inspection in inspections.items():
                st.metric(f"Flagged pixels ({labels[epoch]})", int(inspection.mask.sum()))
        else:
            st.info("Uploaded images have no ground-truth mask; Dice and IoU need a sample with a mask.")


def input_row(shot: dict, run_id: str) -> None:
    """The input, its ground truth, and what it is."""
    image, sample, truth = shot["image"], shot["sample"], shot["truth"]
    shown_truth = truth if truth is not None else (
        np.zeros(image.shape, np.uint8) if sample is not None and not sample.defective else None)
    top = st.columns(3)
    top[0].image(for_display(to_display(image)), caption=f"Input: {shot['name']}", width="stretch")
    if shown_truth is not None:
        top[1].image(for_display(overlay(image, shown_truth, color=(40, 200, 80))), width="stretch",
                     caption="Ground truth" if shot["has_mask_file"] else "Ground truth (no mask file: defect-free)")
    with top[2]:
        height, width = image.shape
        st.markdown(f"**{shot['name']}** · {width}×{height} px · run **{run_id}**")
        if sample is not None:
            st.caption(f"{sample.kind} · {sample.place}")


def epoch_row(image: np.ndarray, inspection: Inspection, label: str, threshold: float) -> None:
    """One epoch's probability, the regions that count, and its verdict with why."""
    st.markdown(f"**{label}** — threshold {threshold:.2f}")
    heat, over, facts = st.columns(3)
    heat.image(for_display(create_heatmap(inspection.probability)), caption="Defect probability", width="stretch")
    over.image(for_display(overlay(image, inspection.mask)), caption="Detected defects (the regions that count)",
               width="stretch")
    regions, max_score = inspection.regions, float(inspection.probability.max())
    with facts:
        if inspection.flagged:
            st.markdown(f":red-background[**Verdict: defect**] {len(regions)} region(s), max score {max_score:.2f}")
            # A static table: much lighter for the browser than a data grid on every threshold move.
            st.table(pd.DataFrame([{"bbox x,y,w,h": ",".join(map(str, r.bbox)), "shape": r.shape,
                                    "counted": why_counted(r, inspection.recipe)}
                                   for r in regions[:MAX_REGIONS_SHOWN]]).set_index("bbox x,y,w,h"))
            if len(regions) > MAX_REGIONS_SHOWN:
                st.caption(f"… and {len(regions) - MAX_REGIONS_SHOWN} smaller regions")
        else:
            why = (f"no region at or above {threshold:.2f}" if max_score < threshold
                   else f"no region counts under the rule ({inspection.recipe.describe()})")
            st.markdown(f":green-background[**Verdict: ok**] {why} (max score {max_score:.2f})")


def difference(image: np.ndarray, inspections: dict[int | str, Inspection]) -> None:
    """Where two epochs disagree, pixel by pixel."""
    (epoch_a, a), (epoch_b, b) = inspections.items()
    counts = mask_difference(a.mask, b.mask)
    st.subheader(f"Difference: {epoch_label(epoch_a)} vs {epoch_label(epoch_b)}")
    diff, legend = st.columns([1, 2])
    diff.image(for_display(difference_image(image, a.mask, b.mask)), width="stretch",
               caption=f"orange: only {epoch_label(epoch_a)} · blue: only {epoch_label(epoch_b)} · white: both")
    rows = [{"pixels flagged": f"only {epoch_label(epoch_a)}", "count": counts["only_a"]},
            {"pixels flagged": f"only {epoch_label(epoch_b)}", "count": counts["only_b"]},
            {"pixels flagged": "by both", "count": counts["both"]}]
    legend.table(pd.DataFrame(rows).set_index("pixels flagged"))


def main() -> None:
    """The page: model in the sidebar, the image, each epoch's verdict, and where two epochs differ."""
    st.title(":material/search: Inspect")
    try:
        sample_dir = Path(sample_folder())
    except EngineError as err:
        st.error(f"The sample folder could not be created: {err}")
        sample_dir = config.SAMPLE_DIR
    apply_request()
    folders = runs.runs_with_models()
    if not folders:
        st.info("No trained model yet. Train one on the Train page; its epochs appear here.")
        return
    default_run(folders)
    model = model_sidebar(folders)
    shot = pick_image(sample_dir, model["run_id"], model["info"])
    inspections, labels = inspect_epochs(model, shot)
    scores_sidebar(shot, inspections, labels)
    input_row(shot, model["run_id"])
    for epoch, inspection in inspections.items():
        epoch_row(shot["image"], inspection, labels[epoch], model["threshold"])
    if len(inspections) == 2:
        difference(shot["image"], inspections)


main()
