"""Painted datasets: a folder of good images made into a dataset folder with painted defects (engine.paint)."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import register_dataset, scan_dataset, stratified_splits
from engine.errors import DatasetError, EngineError, ImageError
from engine.imageio import IMAGE_EXTENSIONS, decode_upload, read_image, write_png
from engine.paint import PaintParams, paint
from engine.progress import Progress
from engine.storage import atomic_write_bytes, atomic_write_text, check_replaceable, replace_folder, staged_folder
from engine.synthset import dataset_dir

MANIFEST_COLUMNS = ("id", "split", "defect_types", "defect_fraction", "synthetic", "source")


def good_images(folder: str | Path) -> list[Path]:
    """The defect-free images of a folder: of a dataset folder, its images without a defect (a real defect under a
    painted one would be missing from the mask), else every image of DIR itself."""
    root = Path(folder)
    if (root / "images").is_dir():
        found = sorted(s.image_path for s in scan_dataset(root, validate=False).samples if not s.defective)
        if not found:
            raise DatasetError(f"{root}: every image of this dataset holds a defect; paint onto defect-free images")
        return found
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; pass a folder of defect-free images (or a dataset folder)")
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found


def upload_folder(dataset_name: str) -> Path:
    """Where the good images uploaded for a painted dataset are kept: data/uploads/<name>-good (EngineError for a
    name that is not a usable dataset name)."""
    return dataset_dir(dataset_name).parent / "uploads" / f"{dataset_dir(dataset_name).name}-good"


def store_good_images(files: list[tuple[str, bytes]], folder: str | Path) -> tuple[list[Path], list[str]]:
    """Keep uploaded defect-free images (name, bytes) in folder, each checked by decoding it first and written
    atomically as it came (a file already kept with the same bytes is left as it is), and register the folder as a
    dataset of good parts (to train on directly, painting as it trains); returns the files kept and one line per
    upload left out (corrupt, not an image)."""
    kept, problems, written = [], [], False
    for name, data in files:
        stem, suffix = Path(name).stem or "image", Path(name).suffix.lower()
        target = Path(folder) / f"{stem}{suffix if suffix in IMAGE_EXTENSIONS else '.png'}"
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            kept.append(target)  # the page calls this on every rerun with the same uploads
            continue
        try:
            decode_upload(data, name)
        except ImageError as err:
            problems.append(str(err))
            continue
        kept.append(atomic_write_bytes(target, data))
        written = True
    if written:  # the page calls this on every rerun: register once per new upload, not on every rerun
        register_dataset(folder, source="uploaded")
    return kept, problems


def paint_dataset(onto: str | Path, out: str | Path, count: int, defect_free: float = 0.4, seed: int = 0,
                  params: PaintParams | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Write a dataset folder of `count` images made from the good images in `onto` (cycled through): a share
    `defect_free` left as they are, the others with painted defects and their exact masks, split by source image;
    the manifest marks painted images `synthetic`. An unreadable image is reported once and left out. Registers
    the folder; returns counts."""
    sources, out = good_images(onto), Path(out)
    if count < 1:
        raise EngineError("--count must be at least 1")
    check_replaceable(out, MANIFEST_COLUMNS, "generate --onto")
    with staged_folder(out) as tmp:  # built whole beside `out`, then swapped in: a failure leaves `out` as it was
        rows, skipped, seconds = _paint_into(tmp, sources, count, defect_free, seed, params, progress)
        if not rows:
            raise DatasetError(f"{onto}: none of its images could be read ({skipped[0] if skipped else ''})")
        replace_folder(tmp, out)
    painted = sum(row["synthetic"] for row in rows)
    dataset = register_dataset(out, source="painted", details={"onto": str(Path(onto).resolve()), "seed": seed,
                                                               "defect_free": defect_free, "skipped": skipped[:50]})
    return {"images": len(rows), "defective": painted, "defect_free": len(rows) - painted, "skipped": skipped,
            "seconds": seconds, "dataset": dataset}


def paint_check_set(onto: str | Path, out: str | Path, count: int, params: PaintParams | None = None
                    ) -> tuple[int, int]:
    """A small set for a run's checks where no image holds a labelled defect: up to `count` of the images in `onto`,
    evenly spread, half of them with defects painted on (seeded), all in split val, written into the folder `out`
    (not registered); returns how many images it holds and how many of them a painted defect."""
    sources = good_images(onto)
    if len(sources) > count:
        sources = [sources[i] for i in np.linspace(0, len(sources) - 1, count).round().astype(int)]
    rows, _, _ = _paint_into(Path(out), sources, len(sources), 0.5, 0, params, None, split="val")
    return len(rows), sum(row["synthetic"] for row in rows)


def _paint_into(out: Path, sources: list[Path], count: int, defect_free: float, seed: int, params: PaintParams | None,
                progress: Progress | None, split: str | None = None) -> tuple[list[dict[str, Any]], list[str], float]:
    """paint_dataset's writing, into the folder `out`: (manifest rows, skipped-image lines, seconds); every image in
    `split` if given, else split by its source image, so that every image painted from one good image lands in the
    same split (validation and test never hold a part that training saw under other painted defects), val and test
    one source each from a handful of them (data.stratified_splits)."""
    by_source = {} if split else stratified_splits([(source.name, False) for source in sources])
    start, rows, skipped = time.perf_counter(), [], []
    width = max(6, len(str(count - 1)))
    attempt = 0
    while len(rows) < count and len(skipped) < len(sources):
        source = sources[attempt % len(sources)]
        attempt += 1
        if any(source.name in reason for reason in skipped):
            continue
        try:
            image = read_image(source)
        except ImageError as err:
            skipped.append(str(err))
            print(f"warning: skipped {err}", file=sys.stderr)
            continue
        index = len(rows)
        rng = np.random.default_rng([seed, index])
        sample_id = f"{index:0{width}d}"
        image, mask, types = (image, None, []) if rng.random() < defect_free else paint(image, rng, params)
        write_png(out / "images" / f"{sample_id}.png", np.round(image * 255).astype(np.uint8), durable=False)
        if types:
            write_png(out / "masks" / f"{sample_id}.png", mask * np.uint8(255), durable=False)
        rows.append({"id": sample_id, "split": split or by_source[source.name], "defect_types": " ".join(types),
                     "defect_fraction": round(float(mask.mean()), 6) if types else 0.0,
                     "synthetic": int(bool(types)), "source": str(source)})
        if progress:
            progress(len(rows), count, "images")
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "manifest.csv", buffer.getvalue())
    return rows, skipped, time.perf_counter() - start


def preview(onto: str | Path, n: int = 4, seed: int = 0, params: PaintParams | None = None
            ) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Up to n good images of a folder, evenly spread over it, each painted (seeded): (image, mask, types)."""
    sources = good_images(onto)
    picked = [sources[round(i * (len(sources) - 1) / max(1, n - 1))] for i in range(min(n, len(sources)))]
    out = []
    for index, source in enumerate(picked):
        try:
            image = read_image(source)
        except ImageError:
            continue
        out.append(paint(image, np.random.default_rng([seed, index]), params))
    return out
