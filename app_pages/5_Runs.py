"""Runs: every run in one table, their curves overlaid, one run's lineage, and deleting a run."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.ui import epoch_step, readiness_notice
from engine import registry, runs, runstore
from engine.errors import EngineError
from engine.recipe import verdict_threshold


def runs_table(rows: list[dict]) -> None:
    """Every run in one table, with the threshold its verdicts use."""
    table = pd.DataFrame(rows)
    table["threshold"] = [verdict_threshold(runs.run_dir(r["run_id"]), r["threshold"]) for r in rows]  # the recipe's
    table["duration (min)"] = (table["duration_s"].astype(float) / 60).round(1)
    st.dataframe(table[["run_id", "status", "ready", "dataset", "epochs", "best_epoch", "best_dice", "best_iou",
                        "validated_on", "threshold", "preset", "crop", "batch_size", "lr", "device", "duration (min)",
                        "created_at", "error"]],
                 hide_index=True, key="runs_table",
                 column_config={"best_dice": st.column_config.NumberColumn(
                                    format="%.3f", help="validation Dice, measured on what validated_on says"),
                                "best_iou": st.column_config.NumberColumn(format="%.3f"),
                                "threshold": st.column_config.NumberColumn(format="%.2f")})


def curves(rows: list[dict]) -> None:
    """A metric per epoch, for the runs picked."""
    st.subheader("Curves")
    metrics = {row["run_id"]: runs.read_metrics(runs.run_dir(row["run_id"])) for row in rows}
    with_metrics = [run_id for run_id, values in metrics.items() if values]
    if with_metrics:
        left, right = st.columns([3, 1])
        chosen = left.multiselect("Runs", with_metrics, default=with_metrics[:3], key="runs_curves")
        metric = right.selectbox("Metric", ["val_dice", "val_iou", "val_loss", "train_loss"], key="runs_metric")
        figure = go.Figure()
        for run_id in chosen:
            values = metrics[run_id]
            figure.add_trace(go.Scatter(x=[v["epoch"] for v in values], y=[v.get(metric) for v in values],
                                        name=run_id, mode="lines+markers"))
        last = max((v["epoch"] for run_id in chosen for v in metrics[run_id]), default=1)
        figure.update_xaxes(dtick=epoch_step(last))
        figure.update_layout(height=380, xaxis_title="epoch", yaxis_title=metric,
                             legend={"orientation": "h", "y": 1.12, "x": 0},
                             margin={"l": 10, "r": 10, "t": 40, "b": 10})
        st.plotly_chart(figure, key="runs_figure")
    else:
        st.caption("No run has finished an epoch yet.")


def lineage(rows: list[dict]) -> None:
    """Where a run came from: its dataset, command, machine, versions, parameters and result."""
    st.subheader("Lineage")
    ids = [row["run_id"] for row in rows]
    picked = st.selectbox("Run", ids, key="runs_lineage")
    try:
        record = runs.read_record(runs.run_dir(picked))
    except EngineError as err:
        st.warning(f"{picked}: {err}")
        return
    readiness_notice(record)
    dataset = record.dataset
    known = registry.find_dataset_by_hash(dataset.hash) if dataset.hash else None
    a, b = st.columns(2)
    with a:
        st.markdown(f"**Dataset** `{dataset.path or '?'}`  \nhash `{dataset.hash or '?'}`"
                    + (f" — registered as **{known.name}**" if known else " — not in the registry (changed or moved)"))
        counts = dataset.counts
        if counts:
            st.markdown(f"**Counts** {counts.get('images')} images ({counts.get('defective')} with defects) · "
                        f"{counts.get('train')} train / {counts.get('val')} val / {counts.get('test')} test")
        st.markdown(f"**Command** `{record.command}`")
        st.markdown(f"**Machine** {record.machine or '?'} · device {record.device or '?'} · "
                    f"{record.parameters:,} parameters · stop: {record.stop_reason or '—'}")
        st.markdown("**Versions**")
        st.json(record.versions, expanded=True)
    with b:
        st.markdown("**Training parameters**")
        st.json(record.params, expanded=False)
        st.markdown("**Model and result**")
        st.json(record.model_dump(mode="json", include={"arch", "normalisation", "threshold", "best_epoch",
                                                        "best_dice", "best_iou", "started_at", "finished_at"}),
                expanded=False)


def delete(rows: list[dict]) -> None:
    """Delete a settled run (folder and registry rows), once ticked."""
    st.subheader("Delete a run")
    deletable = [row["run_id"] for row in rows
                 if row["run_id"] != "demo" and row["status"] not in ("queued", "running")]
    if not deletable:
        st.caption("Nothing to delete: the demo run and running runs are kept.")
    else:
        victim = st.selectbox("Run to delete", deletable, index=None, placeholder="choose a run", key="runs_delete")
        if victim:
            sure = st.checkbox(f"Yes, delete {victim}: its folder (checkpoints, exports) and its registry rows",
                               key=f"runs_delete_sure_{victim}")
            if st.button("Delete run", type="primary", disabled=not sure, key="runs_delete_go"):
                try:
                    runs.delete_run(victim)
                except EngineError as err:
                    st.error(str(err))
                else:
                    st.session_state["runs_flash"] = f"Deleted run {victim}."
                    st.rerun()


def main() -> None:
    """The page: the table, curves, lineage, and deleting a run."""
    st.title(":material/history: Runs")
    flash = st.session_state.pop("runs_flash", None)
    if flash:
        st.success(flash)
    rows = runstore.overview()
    if not rows:
        st.info("No runs yet. Train one on the Train page.")
        return
    runs_table(rows)
    curves(rows)
    lineage(rows)
    delete(rows)


main()
