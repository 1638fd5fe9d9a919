"""The app's page list and the widgets its pages share."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np
import streamlit as st

from engine import config, readiness, runs, synthset
from engine.data import scan_dataset
from engine.errors import EngineError
from engine.presets import PRESETS
from engine.progress import Progress, describe, time_left
from engine.runrecord import RunRecord

if TYPE_CHECKING:
    from engine.inference import Predictor  # imports torch: loaded with the first model, not with every page


@dataclass(frozen=True)
class PageInfo:
    """One page of the app: its file, title, icon, URL path and a line saying what it is for."""

    path: str
    title: str
    icon: str
    url: str  # the page's address after the app's (the browser tests open /Inspect, ...); "" for Home
    blurb: str


# The page list, declared once: Home.py builds the navigation from it, the Home page its links.
PAGES = [page for page in (
    PageInfo("app_pages/0_Home.py", "Home", ":material/precision_manufacturing:", "",
             "what exists and what to do next"),
    PageInfo("app_pages/1_Generate_Data.py", "Generate data", ":material/science:", "Generate_Data",
             "procedural images with exact masks"),
    PageInfo("app_pages/2_Train.py", "Train", ":material/model_training:", "Train",
             "background training with live curves"),
    PageInfo("app_pages/3_Export.py", "Export", ":material/inventory_2:", "Export",
             "ONNX and INT8 models with checks"),
    PageInfo("app_pages/4_Inspect.py", "Inspect", ":material/search:", "Inspect",
             "one image, one or two epochs, any threshold"),
    PageInfo("app_pages/5_Runs.py", "Runs", ":material/history:", "Runs", "all runs, curves, lineage, delete"),
    PageInfo("app_pages/6_Review.py", "Review", ":material/fact_check:", "Review",
             "metrics over a whole folder, worst first"),
    PageInfo("app_pages/7_Label.py", "Label", ":material/brush:", "Label",
             "label what the run is unsure of, then fine-tune on it"),
) if (config.ROOT / page.path).is_file()]  # a deployment may leave a page out (Export)

T = TypeVar("T")
DISPLAY_MAX_SIDE = 1600  # images are sent to the browser at most this large: a page column is narrower anyway
PROBABILITY_CACHE_BYTES = 256 * 2**20  # probability maps kept for threshold moves, all sessions together


def duration(seconds: float | None) -> str:
    """Seconds as a short 'Xm Ys' text ('—' when unknown)."""
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def preset_label(preset: str) -> str:
    """A model preset as the Train page offers it: its width, depth and, for a half-resolution one, its stem."""
    arch = PRESETS[preset]
    half = ", at half resolution" if arch.get("stem", 1) == 2 else ""
    return f"{preset} (width {arch['base']}, depth {arch['depth']}{half})"


def epoch_step(n_epochs: int) -> int:
    """The distance between two ticks of an epoch axis: whole epochs (Plotly picks 0.5 for a few), about 12 ticks."""
    return max(1, -(-n_epochs // 12))


def progress_bar(label: str) -> tuple[Any, Progress]:
    """An st.progress bar and the engine.progress callback that moves it: (bar, progress). Its text says the
    stage (with counts), the time spent and, once the pace says something, about how long is left."""
    bar = st.progress(0.0, text=label)
    started = time.monotonic()

    def update(done: float, total: float, what: str = "") -> None:
        fraction, text = describe(done, total, what)
        elapsed = time.monotonic() - started
        left = time_left(fraction, elapsed)
        timing = f" · {duration(elapsed)}" + (f", about {duration(left)} left" if left is not None else "")
        bar.progress(fraction, text=f"{label} {text}".strip() + timing)

    return bar, update


def run_with_progress(label: str, work: Callable[[Progress], T]) -> T | None:
    """work(progress) under a progress bar; an EngineError is shown as one error line and gives None."""
    bar, update = progress_bar(label)
    try:
        result = work(update)
    except EngineError as err:
        bar.empty()
        st.error(str(err))
        return None
    bar.progress(1.0, text="Done")
    return result


def readiness_notice(record: RunRecord, compact: bool = False) -> None:
    """A warning with the reason and the next steps when a completed run is not ready to serve; compact (for a
    sidebar): one line, the reason and the steps in a closed expander below it."""
    judged = readiness.judge(record)
    if judged.ready or record.status != "completed":
        return
    steps = "\n".join(f"- {step}" for step in judged.next_steps)
    if compact:
        st.warning("**Not ready:** its verdicts are not to be trusted yet.")
        with st.expander("Why, and what to do"):
            st.markdown(f"{judged.reason}.\n\nNext steps:\n{steps}")
        return
    st.warning(f"**Not ready:** {judged.reason}. Its verdicts are not to be trusted yet.\n\nNext steps:\n{steps}")


def for_display(rgb: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """An image shrunk to at most max_side pixels per side for st.image (a 4096² PNG per view stalls the page)."""
    height, width = rgb.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)


class ArrayCache:
    """A thread-safe LRU of numpy arrays bounded by their total bytes (st.cache_data bounds only the count)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        """The array stored under key (now the most recently used), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Hashable, array: np.ndarray) -> None:
        """Store a read-only array; the least recently used ones go until the total fits."""
        array.flags.writeable = False
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key).nbytes
            self._items[key] = array
            self.bytes += array.nbytes
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self.bytes -= self._items.popitem(last=False)[1].nbytes


@st.cache_resource
def probability_cache() -> ArrayCache:
    """The process-wide cache of probability maps (float16) of the Inspect page."""
    return ArrayCache(PROBABILITY_CACHE_BYTES)


@st.cache_resource(show_spinner="Preparing the sample images (first start only)…")
def sample_folder() -> str:
    """Create and register data/procedural_images once per server process (Home, Inspect and Review use it)."""
    return str(synthset.ensure_sample_dataset())


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def load_predictor(run_dir: str, epoch: int | str, version: tuple, backend: str = "torch",
                   device: str = "cpu") -> Predictor:
    """One Predictor per (run, epoch, backend, device) for all sessions; version (engine.storage.file_version of
    the model file) reloads a rewritten model file."""
    from engine.inference import Predictor

    return Predictor(Path(run_dir), epoch, backend, device)


def epoch_label(epoch: int | str) -> str:
    """'epoch 3' or 'best'."""
    return f"epoch {epoch}" if isinstance(epoch, int) else str(epoch)


def own_test_set(record: RunRecord, choices: dict[str, Path]) -> str | None:
    """The name under which `choices` offers the folder the run trained on, where that folder has a test split
    (images training did not see); None otherwise."""
    trained_on = Path(record.dataset.path or "/nonexistent").resolve()
    name = next((name for name, path in choices.items() if path.resolve() == trained_on), None)
    try:
        has_test = name is not None and any(s.split == "test" for s in scan_dataset(trained_on, validate=False).samples)
    except EngineError:
        return None
    return name if has_test else None


def pick_run(folders: dict[str, Path], key: str) -> tuple[str, Path, RunRecord, list[int | str], int | None]:
    """The sidebar's run selector and the run's readiness notice.

    Returns the run id, its folder, its record (run.json), its saved epochs (["best"] when only best.pth is there)
    and its best epoch; stops the page with a message when run.json cannot be read.
    """
    run_id = st.selectbox("Run", list(folders), key=key)
    folder = folders[run_id]
    try:
        record = runs.read_record(folder)
    except EngineError as err:
        st.error(str(err))
        st.stop()
    readiness_notice(record, compact=True)  # the sidebar: Device and Threshold stay in sight below it
    saved: list[int | str] = list(runs.epochs_saved(folder)) or ["best"]
    return run_id, folder, record, saved, record.best_epoch
