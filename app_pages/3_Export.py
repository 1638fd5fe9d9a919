"""Export: a run's model to ONNX (and INT8 behind an accuracy gate), then every backend benchmarked side by side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.ui import progress_bar, readiness_notice
from engine import bench, export, jobs, runs, serving
from engine.errors import EngineError
from engine.progress import part
from engine.runfolder import ONNX_FILES, RunFolder


def choose() -> tuple[str, Path, str] | None:
    """The run and epoch to export (None where no run has a model yet)."""
    folders = runs.runs_with_models()
    if not folders:
        st.info("No trained model yet. Train one on the Train page, then export it here.")
        return None
    left, right = st.columns([3, 1])
    run_id = left.selectbox("Run", list(folders), key="export_run")
    folder = folders[run_id]
    epochs = ["best", *[str(e) for e in reversed(runs.epochs_saved(folder))]]
    epoch = right.selectbox("Epoch", epochs, key="export_epoch", help="'best' is the best validation epoch")
    try:
        readiness_notice(runs.read_record(folder))  # an exported model is served as is: say first if it is not ready
    except EngineError as err:
        st.warning(str(err))
    return run_id, folder, epoch


def finished_text(folder: Path, exported: bool) -> str:
    """The bar's last words, from export/report.json as it is on disk now."""
    written = export.read_report(folder) if exported else None
    if written is None:
        return "Done: benchmarked"
    kept = ", ".join(entry["kind"] for entry in written["artifacts"] if entry["accepted"])
    return f"Done: epoch {written['epoch']} exported at {written['created_at']} ({kept}), then benchmarked"


def export_and_bench(run_id: str, folder: Path, epoch: str) -> None:
    """The options, and the buttons that export (in a fresh process) and benchmark, with one bar over both."""
    a, b, c = st.columns(3)
    int8 = a.checkbox("Also quantize to INT8", value=True, key="export_int8")
    max_drop = b.number_input("Largest accepted Dice drop (INT8 vs fp32)", min_value=0.0, max_value=1.0, value=0.01,
                              step=0.005, format="%.3f", key="export_max_drop", disabled=not int8)
    iterations = c.number_input("Benchmark rounds", min_value=5, max_value=500, value=30, step=5, key="export_rounds")
    go_export, go_bench = st.columns([1, 4])
    export_clicked = go_export.button("Export and benchmark", type="primary", key="export_button")
    bench_clicked = go_bench.button("Benchmark only", key="export_bench_button",
                                    disabled=not RunFolder(folder).exported(ONNX_FILES["onnx"]).is_file())
    if not (export_clicked or bench_clicked):
        return
    bar, show_progress = progress_bar("")
    try:
        if export_clicked:
            # In a fresh process: the app keeps none of the memory export and benchmark need.
            report = jobs.run_isolated(export.export_run, folder, epoch, int8=int8, max_dice_drop=max_drop,
                                       progress=part(show_progress, 0.0, 0.6, "export: "))
            st.session_state["export_messages"] = (run_id, report["messages"], report.get("gate"),
                                                   report["check_data"] if report["check_data_is_fallback"] else None)
        start = 0.6 if export_clicked else 0.0
        result = jobs.run_isolated(bench.benchmark, folder, iterations=int(iterations),
                                   progress=part(show_progress, start, 1 - start, "benchmark: "))
        st.session_state["export_bench"] = (run_id, result)
    except EngineError as err:
        bar.empty()
        st.error(str(err))
    else:
        bar.progress(1.0, text=finished_text(folder, export_clicked))


def export_messages(run_id: str) -> None:
    """What the last export said: a gate that failed or a fallback check set as warnings."""
    messages = st.session_state.get("export_messages")
    if messages and messages[0] == run_id:
        _, lines, gate, fallback = messages
        for line in lines:
            if (gate and line == gate["message"] and not gate["accepted"]) or line == fallback:
                st.warning(line)
            else:
                st.success(line)


def bench_table(result: dict) -> None:
    """Every backend side by side: latency, throughput, size and Dice, as a table, a chart and Markdown."""
    st.subheader("Backends side by side")
    table = pd.DataFrame(result["rows"])
    table["size (MB)"] = table["size_bytes"] / 1e6
    shown = table.rename(columns={"latency_p50_ms": "p50 (ms)", "latency_p95_ms": "p95 (ms)",
                                  "latency_vs_torch": "p50 vs torch", "latency_vs_onnx": "p50 vs onnx",
                                  "throughput_ips": "throughput (img/s)",
                                  "dice": "test Dice", "dice_drop": "Dice drop"})
    st.dataframe(shown[["backend", "file", "epoch", "size (MB)", "p50 (ms)", "p95 (ms)", "p50 vs torch", "p50 vs onnx",
                        "throughput (img/s)", "test Dice", "Dice drop"]], hide_index=True, key="export_table",
                 column_config={name: st.column_config.NumberColumn(format=fmt) for name, fmt in
                                {"size (MB)": "%.2f", "p50 (ms)": "%.1f", "p95 (ms)": "%.1f", "p50 vs torch": "%.2fx",
                                 "p50 vs onnx": "%.2fx",
                                 "throughput (img/s)": "%.1f", "test Dice": "%.4f", "Dice drop": "%+.4f"}.items()})
    figure = go.Figure()
    figure.add_trace(go.Bar(x=table["backend"], y=table["latency_p50_ms"], name="p50",
                            error_y={"type": "data", "symmetric": False, "arrayminus": [0] * len(table),
                                     "array": table["latency_p95_ms"] - table["latency_p50_ms"]},
                            text=[f"{v:.1f} ms · {s:.2f} MB · Dice {d:.3f}" for v, s, d in
                                  zip(table["latency_p50_ms"], table["size (MB)"], table["dice"])]))
    figure.update_layout(height=360, yaxis_title=f"batch-1 ms at {result['size']}x{result['size']} (p50, whisker p95)",
                         margin={"l": 10, "r": 10, "t": 20, "b": 10}, showlegend=False)
    st.plotly_chart(figure, key="export_figure")
    st.caption(f"{result['machine']} · {result['iterations']} interleaved rounds · Dice on the {result['split']} "
               f"split at threshold {result['threshold']:.2f}. Markdown for the records:")
    st.code(bench.bench_markdown(result), language="markdown")


def exported_files(run_id: str, folder: Path) -> None:
    """What is exported now, each backend's gate, what `auto` serves here, and the files to download."""
    st.subheader("Exported files")
    report = export.read_report(folder)
    if report is None:
        st.caption("This run has not been exported yet.")
    else:
        st.caption(f"Epoch {report['epoch']} ({report['checkpoint']}), exported {report['created_at']}, "
                   f"opset {report['opset']}.")
        st.dataframe(pd.DataFrame([{
            "kind": entry["kind"], "kept": entry["accepted"], "size (MB)": entry["size_bytes"] / 1e6,
            "val Dice": entry["metrics"].get("val_dice"),
            "max |Δp| vs torch": entry["metrics"].get("parity", {}).get("max_abs_diff"),
            "mask agreement": entry["metrics"].get("parity", {}).get("mask_agreement"),
            "p50 (ms)": entry["metrics"].get("latency_p50_ms")} for entry in report["artifacts"]]),
            hide_index=True, key="export_files",
            column_config={"size (MB)": st.column_config.NumberColumn(format="%.2f"),
                           "val Dice": st.column_config.NumberColumn(format="%.4f"),
                           "max |Δp| vs torch": st.column_config.NumberColumn(
                               format="%.1e", help="The largest difference in one pixel's defect probability from "
                               "PyTorch on the check images. fp32 must stay under 1e-4. INT8 may reach 1 on a few "
                               "pixels near the threshold, so its gate judges the whole mask (val Dice, mask "
                               "agreement)."),
                           "mask agreement": st.column_config.NumberColumn(format="%.5f"),
                           "p50 (ms)": st.column_config.NumberColumn(format="%.1f")})
        gates = report.get("gates", {})
        if gates:
            st.caption("Accuracy gate of each backend (validation Dice within "
                       f"{export.MAX_DICE_DROP} of ONNX fp32): " + ", ".join(
                           f"{name} {'passed' if gate['accepted'] else 'FAILED'} ({gate['val_dice']:.4f})"
                           for name, gate in gates.items()))
        choice = serving.auto_backend(folder, measure=False)
        if choice is None and st.button("Time the gated backends: which one does auto serve here?", key="export_auto"):
            with st.spinner("timing each gated backend at 256x256 ..."):
                choice = serving.auto_backend(folder)
        if choice is not None:
            timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in choice.p50_ms.items())
            st.info(f"On this machine `auto` (the API's and `predict`'s default) serves **{choice.backend}**: "
                    f"{choice.rule}{f' ({timings})' if timings else ''}.")
            for reason in choice.refused.values():  # a gate that failed here, at export or re-checked on this CPU
                st.warning(f"Not served on this machine: {reason}")
    for kind, name in ONNX_FILES.items():
        path = RunFolder(folder).exported(name)
        if path.is_file():
            st.download_button(f"Download {name} ({path.stat().st_size / 1e6:.2f} MB)", data=path.read_bytes(),
                               file_name=f"{run_id}-{name}", mime="application/octet-stream",
                               key=f"export_download_{kind}")


def main() -> None:
    """The page: run and epoch, export and benchmark, what the export said, the backends, the files."""
    st.title(":material/inventory_2: Export")
    st.caption("ONNX for plain CPUs: checked against PyTorch on real images. INT8 (static, per-channel) is kept only "
               "when its validation Dice stays within the gate.")
    chosen = choose()
    if chosen is None:
        return
    run_id, folder, epoch = chosen
    export_and_bench(run_id, folder, epoch)
    export_messages(run_id)
    shown_bench = st.session_state.get("export_bench")
    if shown_bench and shown_bench[0] == run_id:
        bench_table(shown_bench[1])
    exported_files(run_id, folder)


main()
