"""Labelled datasets: what the Label page writes. An ordinary dataset folder (images/, masks/, manifest.csv) whose
manifest adds each label's source and time; the image a label was drawn on is copied, never changed.

Sources: "drawn" (pixels painted by the user), "accepted" (the run's mask kept as it was), "good" (a good part: an
all-zero mask) and "image_level" ("defect, not outlined": no mask; engine.data.image_level makes it count as
defective for detection, false alarms, AP and tuning, and leaves it out of training). Every write holds the dataset's
lock (storage.folder_lock), so a save while the same folder is being imported is refused with one line.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine import config, readiness
from engine.data import (
    IMAGE_LEVEL,
    DatasetReport,
    Sample,
    image_folder,
    image_level,
    images_in,
    listed_as_defective,
    register_dataset,
    scan_dataset,
)
from engine.errors import DatasetError, EngineError
from engine.imageio import decode_raw, encode_png
from engine.metrics import MIN_DEFECTIVE
from engine.storage import atomic_write_bytes, atomic_write_text, folder_lock, replace_folder, staged_folder

LABEL_SOURCES = ("drawn", "accepted", "good", IMAGE_LEVEL)
LABEL_COLUMNS = ("id", "split", "defect_types", "defect_fraction", "label_source", "labelled_at", "source_path")


def labels_folder(name: str) -> Path:
    """Where a labelled dataset of this name lives (under the data folder, like an import)."""
    if not name or name != Path(name).name or name.startswith("."):
        raise EngineError(f"'{name}' is not a dataset name; use letters, digits, '.', '_' and '-', no '/'")
    return Path(config.DATA_DIR) / name


def read_labels(dataset: str | Path) -> dict[str, dict[str, str]]:
    """The labelled dataset's manifest rows by id (empty for a folder not yet written)."""
    path = Path(dataset) / "manifest.csv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return {row["id"]: row for row in csv.DictReader(handle) if row.get("id")}
    except (OSError, csv.Error, UnicodeDecodeError, KeyError) as err:
        raise DatasetError(f"{path}: unreadable manifest ({err}); fix it or remove it") from err


def labelled_sources(dataset: str | Path) -> set[str]:
    """The resolved paths of the images already labelled in a dataset (the queue leaves them out)."""
    return {row["source_path"] for row in read_labels(dataset).values() if row.get("source_path")}


def _label_id(rows: dict[str, dict[str, str]], image_path: Path) -> str:
    """The image's id in the labelled set: its file name's stem, unless another image took it."""
    source = str(image_path.resolve())
    for sample_id, row in rows.items():
        if row.get("source_path") == source:
            return sample_id
    stem = image_path.stem
    if stem not in rows:
        return stem
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def _checked_mask(source: str, mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The 0/255 mask to store for a label, or None for an image-level one; EngineError where they disagree."""
    if source not in LABEL_SOURCES:
        raise EngineError(f"unknown label source '{source}'; use one of {', '.join(LABEL_SOURCES)}")
    if source == IMAGE_LEVEL:
        return None
    if source == "good":
        return np.zeros(shape, np.uint8)
    if mask is None or mask.shape[:2] != shape:
        got = "no mask" if mask is None else f"a {mask.shape[1]}x{mask.shape[0]} mask"
        raise EngineError(f"a '{source}' label needs a mask of the image's size {shape[1]}x{shape[0]}, got {got}")
    if not mask.any():
        raise EngineError("the mask holds no defect pixel; mark the image 'good part' instead")
    return ((mask > 0) * 255).astype(np.uint8)


def save_label(dataset: str | Path, image_path: str | Path, source: str, mask: np.ndarray | None = None,
               defect_types: str = "") -> dict[str, str]:
    """Write one image's label into a labelled dataset (a copy of the image, its mask, its manifest row), each
    file atomically under the dataset's lock; returns the manifest row. Labelling an image again replaces its label."""
    dataset, image_path = Path(dataset), Path(image_path)
    try:
        data = image_path.read_bytes()
    except OSError as err:
        raise EngineError(f"{image_path}: cannot read ({err.strerror or err})") from err
    height, width = decode_raw(data, image_path.name).shape[:2]
    stored = _checked_mask(source, mask, (height, width))
    with folder_lock(dataset, "labelled"):
        rows = read_labels(dataset)
        sample_id = _label_id(rows, image_path)
        # The image goes in last: until it is there, neither its mask nor its row makes a sample (a save cut short
        # leaves a mask that scan_dataset reports as having no image, never a part counted as good).
        mask_path = dataset / "masks" / f"{sample_id}.png"
        if stored is None:
            mask_path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(mask_path, encode_png(stored))
        rows[sample_id] = {"id": sample_id, "split": (rows.get(sample_id) or {}).get("split", ""),
                           "defect_types": defect_types if source != "good" else "",
                           "defect_fraction": f"{(stored > 0).mean():.6f}" if stored is not None else "",
                           "label_source": source,
                           "labelled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "source_path": str(image_path.resolve())}
        _write_manifest(dataset / "manifest.csv", rows.values())
        target = dataset / "images" / f"{sample_id}{image_path.suffix.lower()}"
        for old in (dataset / "images").glob(f"{sample_id}.*") if (dataset / "images").is_dir() else ():
            if old != target:
                old.unlink()  # the same id from a file of another format
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)
        register_dataset(dataset, source="labelled")  # listed with the others, for train, evaluate and tune
    return rows[sample_id]


def _write_manifest(path: Path, rows: Any) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LABEL_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def label_counts(dataset: str | Path) -> dict[str, int]:
    """How many labels of each source the dataset holds."""
    sources = [row.get("label_source") or "" for row in read_labels(dataset).values()]
    return {source: sources.count(source) for source in LABEL_SOURCES}


def training_set(dataset: str | Path, run: str) -> Path:
    """A dataset to fine-tune RUN on: the run's own data (its splits kept) plus every labelled image in train; an
    image of the run's data that was labelled counts once, as labelled, in its own split (a label on a val or test
    image never trains). Where the run's validation holds no real defect (a run on good parts), some labelled defects
    validate instead (validating_labels), so that the fine-tune's readiness is measured on real defects it did not
    train on. Images are linked, not copied; the folder `<labels>+train` is rebuilt whole each time (staged, then
    swapped in)."""
    dataset = Path(dataset)
    labels = read_labels(dataset)
    if not labels:
        raise EngineError(f"{dataset} holds no label yet; label a few images first")
    own, train, val = run_splits(run)
    split_of = {s.id: "val" for s in val} | {s.id: "train" for s in train}  # validation carved as the run carved it
    labelled = {row.get("source_path") for row in labels.values()}
    run_split = {str(s.image_path.resolve()): split_of.get(s.id, s.split) for s in own.samples}
    validating = validating_labels(labels, run_split) if labels_validate(val) else set()
    final = dataset.with_name(f"{dataset.name}+train")
    with folder_lock(final, "written"), staged_folder(final) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rows = []
        for sample in own.samples:
            if str(sample.image_path.resolve()) in labelled or not sample.outlined:
                continue
            _link(sample.image_path, tmp / "images" / f"run-{sample.id}{sample.image_path.suffix}")
            if sample.mask_path is not None:
                _link(sample.mask_path, tmp / "masks" / f"run-{sample.id}.png")
            rows.append({"id": f"run-{sample.id}", "split": split_of.get(sample.id, sample.split),
                         "defect_types": sample.defect_types,
                         "source_path": str(sample.image_path.resolve())})
        for path in images_in(image_folder(dataset)):
            row = labels.get(path.stem)
            if row is None:
                continue
            _link(path, tmp / "images" / path.name)
            if (dataset / "masks" / f"{path.stem}.png").is_file():
                _link(dataset / "masks" / f"{path.stem}.png", tmp / "masks" / f"{path.stem}.png")
            held_out = _held_out(row, run_split)
            split = run_split[row["source_path"]] if held_out else "val" if row["id"] in validating else "train"
            rows.append({**row, "split": split})
        _write_manifest(tmp / "manifest.csv", rows)
        replace_folder(tmp, final)
    return final


def validating_labels(labels: dict[str, dict[str, str]], run_split: dict[str, str]) -> set[str]:
    """Ids of the labelled defects that validate a fine-tune whose run validated on no real defect, of those the run
    did not hold out already: every other one (2nd, 4th, ... in labelling order), and then the latest of the others
    until validation holds the MIN_DEFECTIVE that can show detection, while the first one labelled (the queue's most
    unsure) always trains."""
    defects = sorted((row for row in labels.values() if not _held_out(row, run_split)
                      and (image_level(row) or listed_as_defective(row))),
                     key=lambda row: (row.get("labelled_at") or "", row["id"]))
    validating, training = defects[1::2], defects[0::2]
    while len(validating) < MIN_DEFECTIVE and len(training) > 1:
        validating.append(training.pop())
    return {row["id"] for row in validating}


def labels_validate(val: list[Sample]) -> bool:
    """Whether a fine-tune validates on labelled defects: where the run's validation (`val`) holds no real one."""
    return not any(s.defective for s in val)


def defects_wanted(run: str, dataset: str | Path | None = None) -> int:
    """How many more labelled defects a fine-tune of RUN wants where its validation held no real defect: MIN_DEFECTIVE
    to validate (so that its readiness can be shown) and as many to learn from, as validating_labels shares them out
    (every other one), less those the labelled dataset holds already; none where the run validated on real defects."""
    if not labels_validate(run_splits(run)[2]):
        return 0
    labelled = read_labels(dataset) if dataset else {}
    have = sum(1 for row in labelled.values() if image_level(row) or listed_as_defective(row))
    return max(0, 2 * MIN_DEFECTIVE - have)


def _held_out(row: dict[str, str], run_split: dict[str, str]) -> bool:
    """Whether a label is on an image the run held out (its val or test split): it stays there, never trains."""
    return run_split.get(row.get("source_path") or "") in ("val", "test")


def run_splits(run: str) -> tuple[DatasetReport, list[Sample], list[Sample]]:
    """(the data RUN trained on, its train, its val) as training split it (a val split carved out of train alike)."""
    from engine import runs

    record = runs.read_record(runs.resolve_run(run))
    report = scan_dataset(record.dataset.path, validate=False)
    train, val, _ = report.training_splits(record.param("val_fraction") or 0.15)
    return report, train, val


def _link(source: Path, target: Path) -> None:
    target.symlink_to(source.resolve())


def fine_tune_config(run: str, data: str | Path, minutes: float) -> Any:
    """The TrainConfig of a fine-tune of RUN on `data` for `minutes`: the run's own settings, its weights as the
    start (init = the run), painting and hard negatives decided again for the new data."""
    from engine import runs
    from engine.training.config import TrainConfig

    folder = runs.resolve_run(run)
    params = runs.read_record(folder).params
    saved = {k: v for k, v in params.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**saved)
    return replace(cfg, data=str(Path(data).resolve()), init=folder.name, minutes=minutes, epochs=None,
                   resume=None, run_id=None, command=None, paint=None, hard_share=None,
                   name=f"{params.get('name') or 'run'}-labels")


def start_fine_tune(dataset: str | Path, run: str, minutes: float = 5.0) -> str:
    """Start "Train on my labels": a background fine-tune of RUN on its data plus the labels; returns the run id."""
    from engine import jobs

    return jobs.start_training(fine_tune_config(run, training_set(dataset, run), minutes))


# --------------------------------------------------------------------------------------- drawing (the Label page)

TILE = 512  # a larger image is labelled one tile of at most TILE x TILE px at a time
PAINT, ERASE = (255, 40, 40), (40, 120, 255)  # the brush's colours on the canvas: defect pixels, and erasing them


def tiles(shape: tuple[int, ...], size: int = TILE) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the tiles an image of this shape is labelled in, row by row (one for a small image)."""
    height, width = shape[:2]
    return [(y, min(y + size, height), x, min(x + size, width))
            for y in range(0, height, size) for x in range(0, width, size)]


def canvas_scale(tile: tuple[int, int, int, int], max_side: int = 700) -> float:
    """Canvas px per image px for a tile: it fills at most max_side px, and is never shrunk (so 1 px of the image
    stays at least 1 px on the canvas and a 1 px brush reaches single pixels)."""
    y0, y1, x0, x1 = tile
    return max(1.0, max_side / max(y1 - y0, x1 - x0))


def apply_strokes(mask: np.ndarray, layer: np.ndarray | None, tile: tuple[int, int, int, int]) -> np.ndarray:
    """A copy of the full-size mask with a canvas's strokes over one tile: the canvas's RGBA layer (any size) is
    mapped back to the tile's own pixels; PAINT strokes set defect pixels, ERASE strokes clear them."""
    result = mask.copy()
    if layer is None or layer.ndim != 3 or layer.shape[2] < 4 or not layer[..., 3].any():
        return result
    y0, y1, x0, x1 = tile
    drawn = layer[..., 3] > 0
    red, blue = layer[..., 0].astype(int), layer[..., 2].astype(int)
    for value, where in ((1, drawn & (red > blue)), (0, drawn & (blue >= red))):
        if not where.any():
            continue
        # A pixel of the image is stroked where at least half of its area on the canvas is.
        share = cv2.resize(where.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        result[y0:y1, x0:x1][share >= 0.5] = value
    return result


def source_of(start: np.ndarray, final: np.ndarray) -> str:
    """The label source of a mask saved from the page: good when empty, accepted when it is the run's, else drawn."""
    if not final.any():
        return "good"
    return "accepted" if np.array_equal(start.astype(bool), final.astype(bool)) else "drawn"


def before_after(dataset: str | Path, before: str, after: str, progress: Any = None) -> list[dict[str, Any]]:
    """What labelling changed: for the labelled set (all of it) and the run's validation (as training split it),
    each run's detections and false alarms, and each run's readiness."""
    from engine import runs
    from engine.evaluate import evaluate, select_samples
    from engine.inference import Predictor

    folders = {"before": runs.resolve_run(before), "after": runs.resolve_run(after)}
    rows = []
    for where, samples in (("labelled set", select_samples(dataset, "all")), ("the run's validation",
                                                                            run_splits(before)[2])):
        for when, run_dir in folders.items() if samples else ():
            result = evaluate(Predictor(run_dir), samples, progress=progress)
            rows.append({"set": where, "run": f"{when} ({run_dir.name})",
                         "detected": f"{result['n_detected']} of {result['n_defective']}",
                         "false alarms": f"{result['n_false_alarms']} of {result['n_defect_free']}"})
    for when, run_dir in folders.items():
        ready, reason = readiness.verdict(runs.read_record(run_dir))
        rows.append({"set": "readiness", "run": f"{when} ({run_dir.name})", "detected": "ready" if ready else
                     "not ready", "false alarms": reason or ""})
    return rows
