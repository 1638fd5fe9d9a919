"""Batch inspection of files and folders: verdicts, masks, overlays, and reports that survive interruption.

With an output folder, every finished image appends one JSON line to OUT/results.jsonl (flushed and fsynced),
so an interrupted batch resumes where it stopped: an image is skipped when a line exists for the same file
(same size and modification time), the same model file and the same recipe, and its outputs are still there.
report.csv, report.json and report.html are regenerated from those lines at the end.

OUT/masks/<name>.png      counted regions, 0/255
OUT/overlays/<name>.png   the image with the counted regions tinted
OUT/thumbs/<name>.jpg     small overlay for the HTML report
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from engine.drawing import overlay
from engine.errors import EngineError
from engine.imageio import IMAGE_EXTENSIONS, read_image, write_png
from engine.inference import Predictor
from engine.inspector import Inspector
from engine.progress import Progress
from engine.recipe import Recipe
from engine.storage import atomic_write_bytes, atomic_write_json, atomic_write_text

RESULTS_FILE = "results.jsonl"
THUMB_SIDE = 160
# The HTML report is a Jinja2 template with autoescaping: file names and errors are never markup.
_TEMPLATES = Environment(loader=PackageLoader("engine", "templates"), autoescape=select_autoescape(["html", "j2"]),
                         trim_blocks=True, lstrip_blocks=True)
CSV_COLUMNS = ["name", "file", "verdict", "regions", "max_score", "defect_fraction", "counted_fraction",
               "largest_region_px", "defect_area_mm2", "width", "height", "inference_ms", "total_ms", "mask",
               "overlay", "error"]


@dataclass(frozen=True)
class BatchItem:
    """One input image and the unique name its outputs get."""

    path: Path
    name: str


@dataclass
class BatchResult:
    """The outcome of a batch: per-image results in input order and how many were computed or reused."""

    model: dict[str, Any]
    recipe: dict[str, Any]
    results: list[dict[str, Any]]
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    out: Path | None = None
    reports: dict[str, Path] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Images, ok, defect and error counts."""
        verdicts = [r.get("verdict") for r in self.results]
        return {"images": len(self.results), "ok": verdicts.count("ok"), "defect": verdicts.count("defect"),
                "errors": sum("error" in r for r in self.results)}

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly report: model, recipe, summary and results (what report.json holds)."""
        summary = {**self.counts(), "computed": self.computed, "reused": self.reused,
                   "seconds": round(self.seconds, 3)}
        return {"model": self.model, "recipe": self.recipe, "summary": summary,
                "results": [_public(r) for r in self.results]}


def _public(result: dict[str, Any]) -> dict[str, Any]:
    """A result without the bookkeeping fields used for resuming."""
    return {k: v for k, v in result.items() if k not in ("fingerprint", "source_stat")}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def collect_inputs(inputs: Iterable[str | Path], exclude: str | Path | None = None) -> list[BatchItem]:
    """Image files named directly or found (recursively) in folders, with unique output names.

    Files under `exclude` (the output folder) are skipped, so a rerun never inspects its own overlays.
    """
    excluded = Path(exclude).resolve() if exclude else None
    items: list[BatchItem] = []
    used: set[str] = set()
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            pairs = [(p, "__".join(p.relative_to(item).with_suffix("").parts)) for p in found]
        elif item.is_file():
            pairs = [(item, item.stem)]
        else:
            raise EngineError(f"{item}: no such file or folder")
        for path, name in pairs:
            if excluded is not None and path.resolve().is_relative_to(excluded):
                continue
            name = base = _safe_name(name)
            suffix = 2
            while name.lower() in used:  # same stem in two places (or differing only by case)
                name, suffix = f"{base}-{suffix}", suffix + 1
            used.add(name.lower())
            items.append(BatchItem(path, name))
    if not items:
        raise EngineError("no images found in the given inputs (PNG, JPEG, BMP or TIFF)")
    return items


def model_fingerprint(predictor: Predictor, recipe: Recipe) -> str:
    """Short hash of the model file (path, size, mtime), backend and recipe rules: what a stored result depends on."""
    stat = predictor.path.stat()
    key = {"model": predictor.describe(), "path": str(predictor.path.resolve()), "size": stat.st_size,
           "mtime_ns": stat.st_mtime_ns, "recipe": recipe.rules()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """Results already in OUT/results.jsonl by resolved file path (a later line wins); a torn last line is dropped."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # killed mid-write: cut the partial line so appends stay valid
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as handle:
            handle.truncate(len(data))
    results = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "file" in entry:
            results[str(Path(entry["file"]).resolve())] = entry
    return results


def _append_result(out: Path, result: dict[str, Any]) -> None:
    with (out / RESULTS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _reusable(entry: dict[str, Any] | None, fingerprint: str, source_stat: list[int], out: Path) -> bool:
    if not entry or entry.get("fingerprint") != fingerprint or entry.get("source_stat") != source_stat:
        return False
    if "error" in entry:
        return True
    return all((out / entry[key]).is_file() for key in ("mask", "overlay", "thumb") if entry.get(key))


def inspect_image(predictor: Predictor, item: BatchItem, recipe: Recipe, out: Path | None) -> dict[str, Any]:
    """Predict one image, apply the recipe and (with out) write its mask, overlay and thumbnail."""
    start = time.perf_counter()
    try:
        image = read_image(item.path)
    except EngineError as err:
        return {"file": str(item.path), "name": item.name, "error": str(err)}
    read_ms = (time.perf_counter() - start) * 1000
    prediction, inspection = Inspector(predictor).inspect(image, recipe=recipe)
    post_start = time.perf_counter()
    result = {"file": str(item.path), "name": item.name, **inspection.as_dict(prediction.timings_ms)}
    post_ms = prediction.timings_ms["inspect"] + (time.perf_counter() - post_start) * 1000
    write_ms = 0.0
    if out is not None:
        write_start = time.perf_counter()
        mask = inspection.mask
        shown = overlay(image, mask)[:, :, ::-1]  # RGB -> BGR for OpenCV
        result["mask"] = f"masks/{item.name}.png"
        result["overlay"] = f"overlays/{item.name}.png"
        result["thumb"] = f"thumbs/{item.name}.jpg"
        write_png(out / result["mask"], mask * 255)
        write_png(out / result["overlay"], shown)
        atomic_write_bytes(out / result["thumb"], _thumbnail(shown))
        write_ms = (time.perf_counter() - write_start) * 1000
    result["timings_ms"] = {"read": round(read_ms, 2), "inference": prediction.timings_ms.get("inference"),
                            "post": round(post_ms, 2), "write": round(write_ms, 2),
                            "total": round((time.perf_counter() - start) * 1000, 2)}
    return result


def _thumbnail(bgr: np.ndarray) -> bytes:
    height, width = bgr.shape[:2]
    scale = min(1.0, THUMB_SIDE / max(height, width))
    if scale < 1.0:
        bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise EngineError("could not encode a thumbnail")
    return buffer.tobytes()


def check_output_folder(out: Path) -> None:
    """Refuse an --out that holds a dataset (images/ or a manifest and no batch results): its masks/ are labels."""
    if (out / RESULTS_FILE).is_file() or not out.is_dir():
        return
    if (out / "images").is_dir() or (out / "manifest.csv").is_file() or (out / "meta.csv").is_file():
        raise EngineError(f"{out} holds a dataset (images/ or a manifest), whose masks/ the results would overwrite; "
                          "nothing was written: choose another --out")


def run_batch(predictor: Predictor, inputs: Sequence[str | Path | BatchItem], out: str | Path | None,
              recipe: Recipe, progress: Progress | None = None,
              on_result: Callable[[dict[str, Any], bool], None] | None = None) -> BatchResult:
    """Inspect every input image; with `out`, write outputs and reports and resume an earlier interrupted batch.

    on_result(result, reused) is called after each image, in input order.
    """
    start = time.perf_counter()
    out_dir = Path(out) if out is not None else None
    items = [i for i in inputs if isinstance(i, BatchItem)]
    if len(items) != len(inputs):
        items = collect_inputs(inputs, exclude=out_dir)
    fingerprint = model_fingerprint(predictor, recipe)
    done: dict[str, dict[str, Any]] = {}
    if out_dir is not None:
        check_output_folder(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        done = read_results(out_dir)
    batch = BatchResult(model=predictor.describe(), recipe=recipe.as_dict(), results=[], out=out_dir)
    for index, item in enumerate(items):
        key = str(item.path.resolve())
        source_stat = _source_stat(item.path)
        previous = done.get(key)
        reused = out_dir is not None and _reusable(previous, fingerprint, source_stat, out_dir)
        if reused:
            result = previous
            batch.reused += 1
        else:
            result = {**inspect_image(predictor, item, recipe, out_dir), "fingerprint": fingerprint,
                      "source_stat": source_stat}
            batch.computed += 1
            if out_dir is not None:
                _append_result(out_dir, result)
        batch.results.append(result)
        if on_result:
            on_result(_public(result), reused)
        if progress:
            progress(index + 1, len(items), "images")
    batch.seconds = time.perf_counter() - start
    if out_dir is not None:
        batch.reports = write_reports(batch, out_dir)
    return batch


def write_reports(batch: BatchResult, out: Path) -> dict[str, Path]:
    """Rewrite results.jsonl to this batch's results and write report.csv, report.json and report.html."""
    lines = "".join(json.dumps(r, default=str) + "\n" for r in batch.results)
    paths = {"results": atomic_write_text(out / RESULTS_FILE, lines),
             "csv": atomic_write_text(out / "report.csv", _csv(batch)),
             "json": atomic_write_json(out / "report.json", batch.as_dict()),
             "html": atomic_write_text(out / "report.html", _html(batch, out))}
    return paths


def _csv_row(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {"name": result["name"], "file": result["file"], "verdict": "error", "error": result["error"]}
    regions = result.get("regions", [])
    return {"name": result["name"], "file": result["file"], "verdict": result["verdict"], "regions": len(regions),
            "max_score": result["max_score"], "defect_fraction": result["defect_fraction"],
            "counted_fraction": result.get("counted_fraction"),
            "largest_region_px": max((r["area_px"] for r in regions), default=0),
            "defect_area_mm2": result.get("defect_area_mm2", ""), "width": result["image"]["width"],
            "height": result["image"]["height"], "inference_ms": result["timings_ms"].get("inference"),
            "total_ms": result["timings_ms"].get("total"), "mask": result.get("mask", ""),
            "overlay": result.get("overlay", ""), "error": ""}


def _csv(batch: BatchResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(_csv_row(r) for r in batch.results)
    return buffer.getvalue()


def _rules_text(rules: dict[str, Any]) -> str:
    parts = [f"threshold {rules.get('threshold')}", f"min region {rules.get('min_region_px')} px"]
    if rules.get("min_region_px_by_shape"):
        parts += [f"{shape} min {area} px" for shape, area in rules["min_region_px_by_shape"].items()]
    if rules.get("max_total_defect_fraction") is not None:
        parts.append(f"ok up to {rules['max_total_defect_fraction']:.4%} of the image")
    if rules.get("px_per_mm"):
        parts.append(f"{rules['px_per_mm']} px/mm")
    return ", ".join(parts)


def _html(batch: BatchResult, out: Path) -> str:
    """report.html: the summary, the model and recipe, and one row per image with its thumbnail inlined."""
    rows = []
    for r in batch.results:
        if "error" in r:
            rows.append({"name": r["name"], "error": r["error"]})
            continue
        thumb = out / r["thumb"] if r.get("thumb") else None
        regions = r.get("regions", [])
        rows.append({
            "name": r["name"], "file": r["file"], "verdict": r["verdict"], "overlay": r.get("overlay"),
            "thumb": base64.b64encode(thumb.read_bytes()).decode("ascii") if thumb and thumb.is_file() else None,
            "regions": len(regions), "shapes": ", ".join(sorted({g["shape"] for g in regions})),
            "largest": max((g["area_px"] for g in regions), default=0), "area_mm2": r.get("defect_area_mm2", 0),
            "max_score": r["max_score"], "total_ms": r["timings_ms"].get("total", 0),
        })
    return _TEMPLATES.get_template("report.html.j2").render(
        counts=batch.counts(), model=batch.model, recipe=batch.recipe, rules=_rules_text(batch.recipe),
        millimetres=bool(batch.recipe.get("px_per_mm")), rows=rows)
