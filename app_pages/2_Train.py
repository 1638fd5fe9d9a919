"""Train: start a background training run, watch it live (from the registry), cancel or resume it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots
from streamlit.delta_generator import DeltaGenerator

from app_pages.ui import duration, epoch_step, preset_label, readiness_notice
from engine import config, data, jobs, registry, runs, runstore
from engine.errors import EngineError
from engine.paint import EVERY_KIND
from engine.presets import PRESETS
from engine.synth import DEFECT_TYPES
from engine.training.config import DEFAULT_EPOCHS, PAINT_WITHOUT_LABELS, SUGGESTED_MINUTES, TrainConfig

DEFAULTS = TrainConfig()  # the page offers the same defaults as `python -m engine train`

st.title(":material/model_training: Train")
st.caption("Each run trains in its own process: you may close the tab, reload, or open a second one; "
           "progress comes from the run registry.")

DEVICES = config.devices()
PAINT_SHARES = [round(0.05 * k, 2) for k in range(19)]  # 0 .. 0.9


def curves(rows: list[dict]) -> go.Figure:
    """Loss and validation Dice/IoU per epoch, and validation AP and detection against minutes spent (the epochs
    validated; a run validates within a share of its time)."""
    epochs = [row["epoch"] for row in rows]
    validated = [row for row in rows if row.get("val_score") is not None and row.get("minutes") is not None]
    figure = make_subplots(rows=1, cols=3, subplot_titles=("Loss", "Validation Dice / IoU",
                                                           "Validation AP / detection by minute"))
    for key, name in (("train_loss", "train loss"), ("val_loss", "val loss")):
        figure.add_trace(go.Scatter(x=epochs, y=[row.get(key) for row in rows], name=name, mode="lines+markers",
                                    connectgaps=True), 1, 1)
    for key, name in (("val_dice", "Dice"), ("val_iou", "IoU")):
        figure.add_trace(go.Scatter(x=epochs, y=[row.get(key) for row in rows], name=name, mode="lines+markers",
                                    connectgaps=True), 1, 2)
    for key, name in (("val_ap", "image AP"), ("val_detection", "detection (recipe)")):
        figure.add_trace(go.Scatter(x=[row["minutes"] for row in validated], y=[row.get(key) for row in validated],
                                    name=name, mode="lines+markers"), 1, 3)
    for col in (1, 2):
        figure.update_xaxes(title_text="epoch", dtick=epoch_step(max(epochs, default=1)), col=col)
    figure.update_xaxes(title_text="minutes", col=3)
    figure.update_yaxes(range=[0, 1], row=1, col=2)
    figure.update_yaxes(range=[0, 1], row=1, col=3)
    figure.update_layout(height=340, margin={"l": 10, "r": 10, "t": 60, "b": 10},
                         legend={"orientation": "h", "y": 1.25, "x": 0})
    return figure


def name_after_dataset() -> None:
    """Name the run after the dataset just picked, unless the user named it (a keyed text box keeps its first
    value, the first dataset's name, however the dataset changes)."""
    state = st.session_state
    if state.get("train_name") in (None, "", state.get("train_name_auto")):
        state["train_name"] = state["train_dataset"] or "run"
    state["train_name_auto"] = state["train_dataset"] or "run"


def default_dataset(choices: dict[str, Path]) -> int | None:
    """Index of the dataset to offer first: the one the newest run trained on, else the largest (the newest is
    often a held-out set, made after the training set)."""
    if not choices:
        return None
    names = {path.resolve(): index for index, path in enumerate(choices.values())}
    for run in registry.list_runs():
        if run.dataset_path and Path(run.dataset_path).resolve() in names:
            return names[Path(run.dataset_path).resolve()]
    sizes = {Path(d.path).resolve(): d.n_images for d in registry.list_datasets()}
    return max(range(len(choices)), key=lambda i: sizes.get(list(choices.values())[i].resolve(), 0))


def minutes_asked() -> float:
    """The Minutes last chosen, from the address (so that a reload keeps them), else the suggested budget."""
    try:
        return min(600.0, max(0.5, float(st.query_params.get("minutes", SUGGESTED_MINUTES))))
    except ValueError:
        return SUGGESTED_MINUTES


def remember_minutes() -> None:
    """Keep the Minutes in the address."""
    st.query_params["minutes"] = f"{st.session_state['train_minutes']:g}"


def dataset_summary(choices: dict[str, Path], dataset: str | None) -> tuple[bool, bool]:
    """Show the picked dataset's counts; returns (unusable, good parts only)."""
    if not dataset:
        return False, False
    try:
        counts = data.scan_dataset(choices[dataset], validate=False).counts()
    except EngineError as err:
        st.error(str(err))
        return True, False
    st.caption(f"{counts['images']} images ({counts['defective']} with defects): "
               f"{counts['train']} train / {counts['val']} val / {counts['test']} test")
    return False, counts["images"] > 0 and not counts["defective"]


def budget_and_goals() -> dict:
    """Model size, the budget (minutes or epochs), device and the line's goals, as TrainConfig fields."""
    preset = st.selectbox("Model size", list(PRESETS), index=list(PRESETS).index(DEFAULTS.preset),
                          key="train_preset", format_func=preset_label)
    stop_by = st.radio("Stop after", ["minutes", "epochs"], horizontal=True, key="train_stop_by",
                       help="a minutes budget anneals the learning rate within it (what the README suggests)")
    if stop_by == "epochs":
        epochs, minutes = st.number_input("Epochs", 1, 500, DEFAULT_EPOCHS, key="train_epochs"), None
    else:
        minutes = st.number_input("Minutes", 0.5, 600.0, minutes_asked(), 0.5, key="train_minutes",
                                  on_change=remember_minutes)
        epochs = None  # the wall-time budget ends the run
    device = st.radio("Device", DEVICES, horizontal=True, key="train_device",
                      help=None if len(DEVICES) > 1 else "No CUDA GPU found; training runs on the CPU.")
    false_alarm_col, detection_col = st.columns(2)
    max_false_alarm = false_alarm_col.number_input(
        "Max false alarms (%)", 0.0, 100.0, DEFAULTS.max_false_alarm * 100, 0.5, key="train_goal_false_alarm",
        help="the share of good parts the run may flag; a run whose recipe cannot keep to it is not ready")
    goal_detection = detection_col.number_input(
        "Min detection (%)", 0.0, 100.0, DEFAULTS.goal_detection * 100, 1.0, key="train_goal_detection",
        help="the share of defective parts the run must find on validation to be ready (your line's goal)")
    return {"preset": preset, "epochs": int(epochs) if epochs else None, "minutes": minutes, "device": device,
            "max_false_alarm": max_false_alarm / 100, "goal_detection": goal_detection / 100}


def advanced_options(painting: DeltaGenerator, good_only: bool) -> dict:
    """The Advanced expander's options, as TrainConfig fields (the kinds to paint go first where the set holds
    good parts alone)."""
    with st.expander("Advanced"):
        crop = st.select_slider("Crop (px)", ["auto", 32, 64, 96, 128, 160, 192, 256], value="auto", key="train_crop",
                                help="auto: chosen from the image and defect sizes")
        batch_size = st.number_input("Batch size", 1, 256, DEFAULTS.batch_size, key="train_batch")
        steps = st.number_input("Steps per epoch (0 = one pass over the images)", 0, 10000, 0, key="train_steps")
        lr = st.number_input("Learning rate", 1e-5, 1.0, DEFAULTS.lr, format="%.4f", key="train_lr")
        seed = st.number_input("Seed", 0, 2**31 - 1, DEFAULTS.seed, key="train_seed")
        paint = st.select_slider("Paint defects onto good crops (share)", ["auto", *PAINT_SHARES], value="auto",
                                 key="train_paint", help=f"auto: {PAINT_WITHOUT_LABELS:g} where the training images "
                                 "hold no labelled defect, else 0. The share of the defect-free training crops that "
                                 "gets defects painted on: the set's own labelled defects, moved, where it has some "
                                 "(on KolektorSDD, with 5 or 37 labelled cracks, it won or drew on Dice and drew or lost "
                                 "a little on image AP); else the generator's, so that a set of good images alone can "
                                 "train a model: its validation is painted too, so the run ends not ready until tuned "
                                 "on a few real labelled defects")
        paint_types = (painting if good_only else st).multiselect(
            "Defect types to paint", DEFECT_TYPES, key="train_paint_types", disabled=paint == 0.0,
            placeholder="all of them", help="the generator's defects to paint where a set has no labelled ones: the "
            "kinds your line looks for (empty: all). KolektorSDD's cracks from good parts only: image AP 0.92-0.97 "
            "with scratch and crack against 0.65-0.67 with all, which flag the blobs good parts carry; but half as "
            "many painted pits, dents and stains found (docs/RESULTS.md)")
        paint_size = st.number_input("Size of painted defects", 0.0, 100000.0, DEFAULTS.paint_size, step=0.1,
                                     key="train_paint_size", disabled=paint == 0.0,
                                     help="the side of the square the generator's defects are drawn to: a share of "
                                          "the image's short side (0 to 1) or px of the full-size image (above 1); "
                                          "0: each training crop. Smaller where your defects are far smaller")
        init = st.selectbox("Starting weights", ["auto", "none"], key="train_init",
                            help="auto: the shipped pre-trained weights (default model size); none: from scratch")
        nproc = st.number_input("Training processes", 1, 64, DEFAULTS.nproc, key="train_nproc",
                                help="above 1, torchrun trains in that many processes (DistributedDataParallel) and "
                                     "the batch is split over them: for several GPUs; on one CPU it is not faster")
    return {"crop": None if crop == "auto" else int(crop), "batch_size": int(batch_size),
            "steps_per_epoch": int(steps) or None, "lr": float(lr), "seed": int(seed),
            "paint": None if paint == "auto" else float(paint), "paint_types": ",".join(paint_types) or None,
            "paint_size": float(paint_size), "init": init, "nproc": int(nproc)}


def start(folder: Path, name: str, options: dict, parallel: bool) -> None:
    """Start a run on `folder` in the background and watch it; a refusal shows as one line."""
    try:
        report = data.scan_dataset(folder)
        report.trainable_splits(DEFAULTS.val_fraction)  # refused here at once, as training would refuse it
        run_id = jobs.start_training(replace(DEFAULTS, data=str(folder), name=name, **options), parallel=parallel)
    except EngineError as err:
        st.error(str(err))
        return
    st.query_params["run"] = run_id
    st.session_state["train_watch"] = run_id
    st.session_state["train_started"] = (run_id, report.problems[:5])
    st.rerun()  # at once with the run active: the start button is disabled before a second click lands


def new_run(active: list) -> tuple[str, bool, bool]:
    """The form of a new run and its start button; returns (device, blocked, parallel runs allowed)."""
    st.subheader("New run")
    choices = data.dataset_choices(trainable=True)
    if not choices:
        st.info("No dataset yet: make one on the Generate data page.")
    dataset = st.selectbox("Dataset", list(choices), index=default_dataset(choices), key="train_dataset",
                           on_change=name_after_dataset)
    st.session_state.setdefault("train_name_auto", dataset or "run")
    unusable, good_only = dataset_summary(choices, dataset)
    # A set of good parts alone learns the generator's defects: which kinds is the user's first choice there.
    painting = st.container()
    if good_only:
        painting.caption("No labelled defect in this set, so the generator's defects are painted onto its good "
                         f"images. Name the kinds your line looks for: {EVERY_KIND}.")
    name = st.text_input("Run name", value=dataset or "run", key="train_name")
    options = {**budget_and_goals(), **advanced_options(painting, good_only)}
    allow_parallel = st.checkbox("Allow parallel runs", value=False, key="train_parallel")
    blocked = bool(active) and not allow_parallel
    if blocked:
        st.caption(f"Run {active[0].id} is still {active[0].status}; tick the box to start another.")
    if st.button("Start training", type="primary", disabled=blocked or not dataset or unusable, key="train_start"):
        start(choices[dataset], name or dataset, options, allow_parallel)
    if "train_started" in st.session_state:
        run_id, problems = st.session_state.pop("train_started")
        for problem in problems:
            st.warning(problem)
        st.success(f"Started run {run_id}.")
    return options["device"], blocked, allow_parallel


def show(run_id: str, was_active: bool) -> None:
    """Status, progress bar, curves and the actions that fit the run's state."""
    try:
        state = jobs.progress(run_id)
    except EngineError as err:
        st.warning(str(err))
        return
    if was_active and state["settled"]:
        st.rerun()  # finished: redraw the whole page once (static view, resume offered)
    done, planned = state["epochs_done"], state["epochs_planned"]
    st.progress(state["fraction"] or 0.0, text=f"{state['status']}: epoch {done}" + (f"/{planned}" if planned else ""))
    a, b, c, d = st.columns(4)
    a.metric("Elapsed", duration(state["elapsed_s"]))
    b.metric("Remaining (est.)", duration(state["eta_s"]) if state["active"] else "—")
    c.metric("Best Dice", f"{state['best_dice']:.3f}" if state["best_dice"] is not None else "—")
    d.metric("Best IoU", f"{state['best_iou']:.3f}" if state["best_iou"] is not None else "—")
    if state["metrics"]:
        st.plotly_chart(curves(state["metrics"]), key=f"curves_{run_id}")
    elif state["active"]:
        st.caption("Waiting for the first epoch…")
    if state["active"]:
        if st.button("Cancel run", key=f"cancel_{run_id}"):
            jobs.cancel(run_id)
            st.toast(f"Cancel requested for {run_id}")
    if state["status"] == "completed":
        try:
            readiness_notice(runs.read_record(runs.run_dir(run_id)))
        except EngineError as err:  # its folder was deleted meanwhile
            st.warning(str(err))
    if state["status"] == "failed" and not state["settled"]:
        st.warning(f"No sign of life from the training process: {state['error']}. Still watching: this "
                   "changes if it beats again or records its end.")
    elif state["status"] == "failed":
        st.error(f"Run failed: {state['error'] or 'no reason recorded'}")
        tail = jobs.log_tail(run_id)
        if tail:
            st.code(tail, language="text", wrap_lines=True)


def resume_form(watched: str, device: str, blocked: bool, parallel: bool) -> None:
    """Resume a settled run with more epochs, where it saved some."""
    run = registry.get_run(watched)
    if run is None or watched == "demo" or not runs.epochs_saved(runs.run_dir(watched)):
        return
    st.subheader("Resume with more epochs")
    more = st.number_input("Train up to epoch", run.epochs_done + 1, run.epochs_done + 500,
                           run.epochs_done + 5, key=f"resume_to_{watched}")
    if st.button("Resume", key=f"resume_{watched}", disabled=blocked):
        try:
            jobs.start_training(replace(DEFAULTS, name=run.name, resume=watched, epochs=int(more), device=device),
                                parallel=parallel)
        except EngineError as err:
            st.error(str(err))
        else:
            st.rerun()


def watch(active: list, device: str, blocked: bool, parallel: bool) -> None:
    """The run picked (else the newest active or newest), live while it is active."""
    st.subheader("Progress")
    all_runs = runstore.list_runs()
    if not all_runs:
        st.info("No runs yet. Start one on the left; its progress shows here.")
        return
    ids = [run.id for run in all_runs]
    wanted = st.query_params.get("run")
    default = wanted if wanted in ids else (active[0].id if active else ids[0])
    if st.session_state.get("train_watch") not in ids:
        st.session_state["train_watch"] = default
    statuses = {run.id: run.status for run in all_runs}
    # No status in the label: it would stay as it was when the page last ran while the fragment below updates.
    watched = st.selectbox("Run", ids, key="train_watch")
    st.query_params["run"] = watched
    # A run shown failed only because it has not beaten for a while is watched on: it may beat again, or end.
    was_active = statuses[watched] in registry.ACTIVE_STATUSES or jobs.judged_gone_only(
        next(run for run in all_runs if run.id == watched))
    if was_active:
        st.fragment(show, run_every=2)(watched, was_active)
        return
    show(watched, was_active)
    resume_form(watched, device, blocked, parallel)
    with st.expander("Training log"):
        st.code(jobs.log_tail(watched) or "(no log)", language="text", wrap_lines=True)


def main() -> None:
    """The page: the form of a new run on the left, the run watched on the right."""
    settings, monitor_column = st.columns([1, 2], gap="large")
    active = jobs.active_runs()
    with settings:
        device, blocked, parallel = new_run(active)
    with monitor_column:
        watch(active, device, blocked, parallel)


main()
