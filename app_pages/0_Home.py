"""Home: what exists (datasets, runs, exports), what to do next, and links to every page."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app_pages.ui import PAGES, sample_folder
from engine import jobs, registry, runstore
from engine.errors import EngineError


def next_step(run_rows: list[dict], active: list) -> None:
    """What to do next: watch the run training now, start with the demo, or look at the latest run."""
    st.subheader("Next step")
    own_runs = [row for row in run_rows if row["run_id"] != "demo"]
    if active:
        run = active[0]
        planned = f"/{run.epochs_planned}" if run.epochs_planned else ""  # a time budget plans no number of epochs
        st.info(f"Run **{run.id}** is {run.status} (epoch {run.epochs_done}{planned}). Watch it live:")
        st.page_link("app_pages/2_Train.py", label="Training progress", icon=":material/model_training:")
    elif not own_runs:
        if any(row["run_id"] == "demo" for row in run_rows):
            st.info("Start with the demo model on the sample images, then generate a dataset and train your own.")
        else:
            st.info("No trained model yet: generate a dataset, then train a model on it.")
    else:
        latest = own_runs[0]
        dice = f"{latest['best_dice']:.3f}" if latest["best_dice"] is not None else "n/a"
        if latest["ready"] == "no":
            st.warning(f"Latest run **{latest['run_id']}** is {latest['status']} but **not ready**: "
                       f"{latest['ready_reason']}. Runs, Inspect and Review give the next steps.")
        else:
            st.info(f"Latest run **{latest['run_id']}** is {latest['status']} with best validation Dice {dice}. "
                    "Inspect it image by image, review it on its own images, or compare runs.")


def page_links() -> None:
    """A link to every page with a line on what it is for."""
    columns = st.columns(3)
    for index, page in enumerate(PAGES[1:]):
        with columns[index % 3]:
            st.page_link(page.path, label=page.title, icon=page.icon)
            st.caption(page.blurb)


def what_exists(datasets: list, run_rows: list[dict], exports: list) -> None:
    """The datasets, runs and exports there are."""
    st.subheader("Datasets")
    if datasets:
        st.dataframe(pd.DataFrame([{
            "name": d.name, "images": d.n_images, "defective": d.n_defective, "defect-free": d.n_defect_free,
            "source": d.source, "hash": d.content_hash, "path": d.path,
        } for d in datasets]), hide_index=True)
    else:
        st.caption("No datasets registered yet.")

    st.subheader("Runs")
    if run_rows:
        columns = ["run_id", "status", "ready", "dataset", "epochs", "best_epoch", "best_dice", "validated_on",
                   "ready_reason", "created_at"]
        st.dataframe(pd.DataFrame(run_rows)[columns],
                     hide_index=True, column_config={"best_dice": st.column_config.NumberColumn(
                         format="%.3f", help="validation Dice, measured on what validated_on says")})
    else:
        st.caption("No runs yet: train one on the Train page.")

    st.subheader("Exports")
    if exports:
        st.dataframe(pd.DataFrame([{
            "run": a.run_id, "kind": a.kind, "epoch": a.epoch, "size (MB)": round(a.size_bytes / 1e6, 2),
            "created": a.created_at,
        } for a in exports]), hide_index=True)
    else:
        st.caption("No exported models yet.")


def main() -> None:
    """The page: counts, the next step, the pages, and what exists."""
    st.title(":material/precision_manufacturing: Metal-surface defect inspection")
    st.caption("Generate synthetic metal-surface images, train a small U-Net to segment defects, "
               "inspect and compare its predictions, and export it.")
    try:
        sample_folder()
    except EngineError as err:
        st.error(f"The sample folder could not be created: {err}")
    datasets = registry.list_datasets()
    run_rows = runstore.overview()
    exports = registry.list_exports()
    active = jobs.active_runs()
    left, mid, right, far = st.columns(4)
    left.metric("Datasets", len(datasets))
    mid.metric("Runs", len(run_rows))
    right.metric("Training now", len(active))
    far.metric("Exports", len(exports))
    next_step(run_rows, active)
    page_links()
    what_exists(datasets, run_rows, exports)


main()
