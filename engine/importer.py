"""Import an existing defect dataset into config.DATA_DIR/NAME in our dataset folder layout, and register it.

Accepted sources:
- our dataset folder: SRC/images/<id>.<ext>, SRC/masks/<id>.<ext>, optional SRC/manifest.csv or meta.csv
  (id, split, defect_types); or a plain folder of images (SRC/<id>.<ext>: good parts, with SRC/masks/ optional);
  without a manifest split, images are split by id, stratified so that a few defects do not all go to train;
- a folder sorted by verdict: SRC/good/ beside folders of defective parts (SRC/crack/, ...), no masks; copied as
  it is, for tuning and evaluating a run on verdicts (engine.data.scan_sorted), not for training;
- MVTec-AD (one category): SRC/train/good/, SRC/test/<type>/, SRC/ground_truth/<type>/<name>_mask.png;
  train/good is split train with a deterministic 10% moved to val, test/* is split test;
- class-map masks in either (pixel values 1..K, optional SRC/classes.txt naming class 1..K one per line):
  stored binary for training, the class ids present kept as the manifest's defect_types and the original
  maps kept in class_masks/.

Masks are always written as 0/255 PNG; images are copied, or symlinked with link=True. Everything is
written into a hidden temporary folder that is renamed into place at the end, so a failed import leaves
nothing half-written. The same content imported twice is recognised by its content hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine import config
from engine.data import (
    IMAGE_LEVEL,
    SPLITS,
    DatasetReport,
    dataset_hash,
    image_level,
    images_in,
    scan_dataset,
    sorted_folders,
    split_for_id,
    stratified_splits,
)
from engine.errors import DatasetError, ImageError
from engine.imageio import decode_raw, encode_png
from engine.progress import Progress
from engine.storage import atomic_write_text, folder_lock, staged_folder

MANIFEST_COLUMNS = ("id", "split", "defect_types", "defect_fraction", "source_path", "label_source")
MAX_CLASS_ID = 32  # without classes.txt, masks whose values stay within 1..32 (and vary) are class maps
VAL_SHARE = 0.1  # share of MVTec train/good moved to val
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TYPE_SEPARATORS = re.compile(r"[;+,|]")


@dataclass
class ImportReport:
    """What an import did: where the dataset is, its counts, sizes, defect fraction and problems."""

    name: str
    path: Path
    source: Path
    layout: str  # "folder", "flat" (a plain folder of images), "sorted" (good/ and defect folders) or "mvtec"
    linked: bool = False
    in_place: bool = False  # SRC already was DATA_DIR/NAME: registered without copying
    class_map: bool = False
    classes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    per_type: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    defect_fraction: float | None = None  # mean share of defect pixels over defective images
    problems: list[str] = field(default_factory=list)
    content_hash: str = ""
    already_imported_as: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    def lines(self, max_problems: int = 10) -> list[str]:
        """Human-readable summary; the last line names the dataset and its counts."""
        out = [f"problem: {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            out.append(f"... and {len(self.problems) - max_problems} more problems")
        if self.per_type:
            out.append("defect types: " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_type.items())))
        if self.sizes:
            common = sorted(self.sizes.items(), key=lambda kv: -kv[1])
            out.append("sizes: " + ", ".join(f"{k} ({v})" for k, v in common[:5])
                       + (f", {len(common) - 5} more" if len(common) > 5 else ""))
        if self.defect_fraction is not None:
            out.append(f"mean defect fraction of defective images: {self.defect_fraction:.4f}")
        c = self.counts
        splits = ("" if self.layout == "sorted"  # no splits: every image tunes or evaluates
                  else f"; train {c.get('train', 0)}, val {c.get('val', 0)}, test {c.get('test', 0)}")
        counts = f"{c.get('images', 0)} images ({c.get('defective', 0)} defective, {c.get('defect_free', 0)} defect-free{splits})"
        if self.already_imported_as:
            renamed = "" if self.name == self.already_imported_as else (
                f"; not registered again as {self.name}: train with --data {self.path}")
            out.append(f"already imported as {self.already_imported_as} ({self.path}): {counts}; nothing "
                       f"copied{renamed}")
        else:
            how = "registered in place" if self.in_place else ("linked" if self.linked else "copied")
            use = (f"tune or evaluate a run with --data {self.path} (sorted by verdict, no masks: not for training)"
                   if self.layout == "sorted" else f"train with --data {self.path}")
            out.append(f"{self.name} ({self.path}): {counts}, {self.layout} layout, {how} in {self.seconds:.1f}s; "
                       f"{use}")
        return out


@dataclass
class _Entry:
    """One image to import."""

    id: str
    image: Path
    mask: Path | None
    split: str
    defect_types: str = ""
    image_level: bool = False  # labelled "defect, not outlined" (engine.data.image_level): defective, no mask


def import_dataset(src: str | Path, name: str, link: bool = False,
                   progress: Progress | None = None) -> ImportReport:
    """Import SRC as config.DATA_DIR/NAME (copy, or symlink images with link), validate and register it."""
    from engine import registry

    start = time.perf_counter()
    src = Path(src).expanduser()
    if not src.is_dir():
        raise DatasetError(f"{src}: no such folder")
    if not _NAME.match(name or ""):
        raise DatasetError(f"dataset name '{name}' is not allowed; use letters, digits, '.', '_' and '-' "
                           "(at most 64, starting with a letter or digit)")
    data_dir = Path(config.DATA_DIR)
    final = data_dir / name
    if final.resolve() == src.resolve():
        return _register_in_place(src, name, start)
    if sorted_folders(src) is not None:
        return _import_sorted(src, name, link, start)
    layout, entries, problems = _gather(src)
    classes = _read_classes(src)
    report = ImportReport(name=name, path=final, source=src.resolve(), layout=layout, linked=link, problems=problems)
    # written whole beside `final`, renamed at the end: a failure leaves nothing; the lock keeps the Label page out
    with folder_lock(final, "imported"), staged_folder(final) as tmp:
        _write(entries, tmp, classes, link, report, progress)
        _publish(tmp, final, report, validate=False)
    report.seconds = time.perf_counter() - start
    if report.already_imported_as:
        return report
    details = {"source": str(report.source), "layout": layout, "linked": link, "class_map": report.class_map,
               "classes": report.classes, "per_type": report.per_type, "sizes": report.sizes,
               "defect_fraction": report.defect_fraction, "splits": {s: report.counts.get(s, 0) for s in SPLITS},
               "problems": report.problems[:50]}
    registry.upsert_dataset(name, str(final.resolve()), report.content_hash, report.counts["images"],
                            report.counts["defective"], report.counts["defect_free"], source="imported",
                            details=details)
    return report


def _import_sorted(src: Path, name: str, link: bool, start: float) -> ImportReport:
    """Copy (or link) a folder sorted by verdict as it is, validate and register it."""
    from engine import registry

    final = Path(config.DATA_DIR) / name
    report = ImportReport(name=name, path=final, source=src.resolve(), layout="sorted", linked=link)
    good, defect_folders = sorted_folders(src)
    with folder_lock(final, "imported"), staged_folder(final) as tmp:
        for folder in [good, *defect_folders]:
            (tmp / folder.name).mkdir()
            for path in images_in(folder):
                if link:
                    (tmp / folder.name / path.name).symlink_to(path.resolve())
                else:
                    shutil.copy2(path, tmp / folder.name / path.name)
        scanned = _publish(tmp, final, report, validate=True)
    report.per_type = dict(Counter(s.defect_types for s in scanned.samples if s.defective))
    report.seconds = time.perf_counter() - start
    if report.already_imported_as:
        return report
    registry.upsert_dataset(name, str(final.resolve()), report.content_hash, report.counts["images"],
                            report.counts["defective"], report.counts["defect_free"], source="imported",
                            details={"source": str(report.source), "layout": "sorted", "linked": link,
                                     "per_type": report.per_type, "problems": report.problems[:50]})
    return report


def _publish(tmp: Path, final: Path, report: ImportReport, validate: bool) -> DatasetReport:
    """Scan the staged folder into the report and rename it to `final`; where the same content is already
    imported, leave it (the staging is removed) and point the report at the import that exists."""
    from engine import registry

    scanned = scan_dataset(tmp, validate=validate)
    report.problems.extend(scanned.problems)
    report.counts = scanned.counts()
    report.content_hash = dataset_hash(scanned.samples)
    existing = registry.find_dataset_by_hash(report.content_hash)
    if existing is not None and Path(existing.path).is_dir():
        report.already_imported_as, report.path = existing.name, Path(existing.path)
        return scanned
    if final.exists():
        raise DatasetError(f"{final} already exists with other content; choose another --name")
    os.rename(tmp, final)
    return scanned


def _register_in_place(folder: Path, name: str, start: float) -> ImportReport:
    """SRC already is DATA_DIR/NAME: validate and register it without copying."""
    from engine import registry
    from engine.data import load_pair

    scanned = scan_dataset(folder, validate=True)
    report = ImportReport(name=name, path=folder.resolve(), source=folder.resolve(), layout="folder",
                          in_place=True, problems=list(scanned.problems), counts=scanned.counts())
    sizes, per_type, fractions = Counter(), Counter(), []
    for sample in scanned.samples:
        image, mask = load_pair(sample)
        sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        if sample.mask_path is not None:
            fractions.append(float(mask.mean()))
            per_type.update({t.strip() for t in _TYPE_SEPARATORS.split(sample.defect_types) if t.strip()})
    report.sizes, report.per_type = dict(sizes), dict(per_type)
    report.defect_fraction = round(float(np.mean(fractions)), 6) if fractions else None
    report.content_hash = dataset_hash(scanned.samples)
    report.seconds = time.perf_counter() - start
    registry.upsert_dataset(name, str(report.path), report.content_hash, report.counts["images"],
                            report.counts["defective"], report.counts["defect_free"], source="imported",
                            details={"source": str(report.source), "layout": "folder", "in_place": True,
                                     "per_type": report.per_type, "sizes": report.sizes,
                                     "defect_fraction": report.defect_fraction, "problems": report.problems[:50]})
    return report


# --------------------------------------------------------------------------------------- layouts


def _gather(src: Path) -> tuple[str, list[_Entry], list[str]]:
    """Detect the layout of src and list its images with mask, split and defect types."""
    if (src / "images").is_dir():
        return ("folder", *_gather_folder(src, src / "images"))
    if images_in(src):  # a plain folder of images: good parts, unless masks/ holds some
        return ("flat", *_gather_folder(src, src))
    if (src / "train" / "good").is_dir() or ((src / "test").is_dir() and (src / "ground_truth").is_dir()):
        return ("mvtec", *_gather_mvtec(src))
    categories = sorted(p.name for p in src.iterdir() if p.is_dir() and (p / "train" / "good").is_dir())
    if categories:
        raise DatasetError(f"{src} looks like the MVTec-AD root ({len(categories)} categories: "
                           f"{', '.join(categories[:5])}{', ...' if len(categories) > 5 else ''}); import one "
                           f"category, e.g. `python -m engine import {src / categories[0]} --name mvtec-{categories[0]}`")
    raise DatasetError(f"{src}: not a dataset folder; expected images (good parts), images/ (+ masks/) or the "
                       "MVTec-AD layout (train/good/, test/<type>/, ground_truth/<type>/)")


def _read_manifest(src: Path) -> dict[str, dict[str, str]]:
    for file_name in ("manifest.csv", "meta.csv"):
        path = src / file_name
        if path.is_file():
            try:
                with path.open(newline="", encoding="utf-8-sig") as handle:
                    return {row["id"]: row for row in csv.DictReader(handle) if row.get("id")}
            except (OSError, csv.Error, UnicodeDecodeError, KeyError) as err:
                raise DatasetError(f"{path}: unreadable manifest ({err}); fix it or remove it") from err
    return {}


def _gather_folder(src: Path, image_dir: Path) -> tuple[list[_Entry], list[str]]:
    manifest = _read_manifest(src)
    masks: dict[str, Path] = {}
    problems: list[str] = []
    if (src / "masks").is_dir():
        for path in images_in(src / "masks"):
            # Several masks for one id (a.png and a.bmp): prefer PNG, the documented format.
            if path.stem not in masks or path.suffix.lower() == ".png":
                masks[path.stem] = path
    entries, seen = [], set()
    for path in images_in(image_dir):
        if path.stem in seen:
            problems.append(f"images/{path.name}: another image has the id '{path.stem}'; skipped")
            continue
        seen.add(path.stem)
        row = manifest.get(path.stem, {})
        split = (row.get("split") or "").strip()
        if split not in SPLITS:
            if split:
                problems.append(f"{path.name}: unknown split '{split}' in the manifest; using {split_for_id(path.stem)}")
            split = ""
        entries.append(_Entry(path.stem, path, masks.get(path.stem), split, (row.get("defect_types") or "").strip(),
                              masks.get(path.stem) is None and image_level(row)))
    # Without a manifest split: by id, but never all of a handful of defective images in train.
    splits = stratified_splits([(e.id, e.mask is not None or e.image_level) for e in entries if not e.split])
    for entry in entries:
        entry.split = entry.split or splits[entry.id]
    problems.extend(f"masks/{masks[m].name} has no image; skipped" for m in sorted(set(masks) - seen))
    return entries, problems


def _gather_mvtec(src: Path) -> tuple[list[_Entry], list[str]]:
    entries, problems = [], []
    good = images_in(src / "train" / "good") if (src / "train" / "good").is_dir() else []
    # A deterministic 10% of train/good goes to val: the ids with the smallest hashes.
    ranked = sorted(good, key=lambda p: hashlib.sha1(p.stem.encode()).hexdigest())
    n_val = round(len(good) * VAL_SHARE) if len(good) >= 10 else min(1, len(good) - 1)
    to_val = {p.name for p in ranked[:n_val]}
    entries += [_Entry(f"train_good_{p.stem}", p, None, "val" if p.name in to_val else "train") for p in good]
    if (src / "train").is_dir():
        for other in sorted(p for p in (src / "train").iterdir() if p.is_dir() and p.name != "good"):
            problems.append(f"train/{other.name}: MVTec train holds only good images; skipped")
    test = src / "test"
    for folder in sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []:
        defect_type = folder.name
        for path in images_in(folder):
            entry_id = f"test_{_slug(defect_type)}_{path.stem}"
            if defect_type == "good":
                entries.append(_Entry(entry_id, path, None, "test"))
                continue
            truth = src / "ground_truth" / defect_type
            mask = next((m for m in (truth / f"{path.stem}_mask.png", truth / f"{path.stem}.png") if m.is_file()), None)
            if mask is None:
                problems.append(f"test/{defect_type}/{path.name}: no ground_truth/{defect_type}/{path.stem}_mask.png; skipped")
                continue
            entries.append(_Entry(entry_id, path, mask, "test", defect_type))
    return entries, problems


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "type"


def _read_classes(src: Path) -> list[str] | None:
    """Class names for ids 1..K from SRC/classes.txt (a first line 'background' is class 0), else None."""
    path = src / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if names and names[0].lower() in ("background", "bg", "_background_", "0"):
        names = names[1:]
    return names


# --------------------------------------------------------------------------------------- writing


def _read_label_mask(path: Path) -> np.ndarray | None:
    """A mask as a 2-D integer array of its stored values (palette PNGs give palette indices), or None."""
    if path.suffix.lower() == ".png":
        try:
            from PIL import Image

            with Image.open(path) as image:
                if image.mode == "P":  # class maps saved with a colour palette: the indices are the classes
                    return np.asarray(image)
        except ImportError:
            pass
        except OSError:
            return None
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        return None
    return mask.max(axis=2) if mask.ndim == 3 else mask


def _write_new(path: Path, image: np.ndarray) -> None:
    # Files inside the temporary folder need no temp-file-and-rename each: the folder rename publishes them all.
    path.write_bytes(encode_png(image))


def _class_name(classes: list[str], class_id: int) -> str:
    return classes[class_id - 1] if class_id <= len(classes) else f"class_{class_id}"


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    """The imported set's manifest.csv, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _label_values(entries: list[_Entry], report: ImportReport) -> tuple[list[_Entry], set[int]]:
    """Pass 1 of _write: the entries whose mask (if any) is readable, and every label value their masks hold
    (which decides binary masks or class maps); masks are not kept in memory."""
    values: set[int] = set()
    kept: list[_Entry] = []
    for entry in entries:
        if entry.mask is not None:
            mask = _read_label_mask(entry.mask)
            if mask is None:
                report.problems.append(f"{entry.mask.name}: unreadable mask; image {entry.image.name} skipped")
                continue
            values.update(int(v) for v in np.unique(mask) if v)
        kept.append(entry)
    return kept, values


def _decoded(path: Path) -> tuple[np.ndarray | None, str]:
    """(the image as decoded, "") or (None, why it cannot be read), by the reader training uses."""
    try:
        return decode_raw(path.read_bytes(), path.name), ""
    except ImageError as err:
        return None, str(err)
    except OSError as err:
        return None, f"{path.name}: cannot read ({err.strerror or err})"


def _write(entries: list[_Entry], out: Path, classes: list[str] | None, link: bool, report: ImportReport,
           progress: Progress | None) -> None:
    """Check every image and mask, then write images, binary masks and the manifest into out."""
    (out / "images").mkdir()
    (out / "masks").mkdir()
    kept, values = _label_values(entries, report)
    report.class_map = classes is not None or (len(values) > 1 and max(values) <= MAX_CLASS_ID)
    top = max(values, default=0)
    if report.class_map:
        names = list(classes or [])
        names += [f"class_{k}" for k in range(len(names) + 1, top + 1)]
        report.classes = names[:max(top, len(classes or []))]
        (out / "class_masks").mkdir()
        if classes is not None:
            atomic_write_text(out / "classes.txt", "\n".join(report.classes) + "\n")
    # Pass 2: check each image against its mask, write the binary mask (and class map), copy or link the image.
    rows, sizes, fractions, per_type, empty = [], Counter(), [], Counter(), 0
    for index, entry in enumerate(kept):
        header, problem = _decoded(entry.image)
        mask = _read_label_mask(entry.mask) if entry.mask is not None else None
        if header is None:
            report.problems.append(f"{problem}; skipped")
        elif mask is not None and mask.shape[:2] != header.shape[:2]:
            report.problems.append(f"{entry.image.name}: mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                                   f"{header.shape[1]}x{header.shape[0]}; skipped")
        else:
            height, width = header.shape[:2]
            del header
            if mask is not None and not mask.any():
                mask, empty = None, empty + 1  # an empty mask means defect-free
            defect_types, fraction = "", 0.0
            if mask is not None:
                fraction = float((mask > 0).mean())
                fractions.append(fraction)
                defect_types = entry.defect_types
                if report.class_map:
                    defect_types = ";".join(_class_name(report.classes, int(k)) for k in np.unique(mask) if k)
                    _write_new(out / "class_masks" / f"{entry.id}.png", mask.astype(np.uint16 if top > 255 else np.uint8))
                _write_new(out / "masks" / f"{entry.id}.png", ((mask > 0) * 255).astype(np.uint8))
                per_type.update({t.strip() for t in _TYPE_SEPARATORS.split(defect_types) if t.strip()})
            target = out / "images" / f"{entry.id}{entry.image.suffix.lower()}"
            if link:
                os.symlink(entry.image.resolve(), target)
            else:
                shutil.copyfile(entry.image, target)
            sizes[f"{width}x{height}"] += 1
            rows.append({"id": entry.id, "split": entry.split, "defect_types": defect_types,
                         "defect_fraction": f"{fraction:.6f}", "source_path": str(entry.image.resolve()),
                         "label_source": IMAGE_LEVEL if entry.image_level and mask is None else ""})
        if progress:
            progress(index + 1, len(kept), "images")
    if empty:
        report.problems.append(f"{empty} empty mask(s): those images were imported as defect-free")
    if not rows:
        raise DatasetError(f"{report.source}: no usable images found"
                           + (f" ({len(report.problems)} problems: {report.problems[0]})" if report.problems else ""))
    _write_manifest(out / "manifest.csv", rows)
    report.sizes = dict(sizes)
    report.per_type = dict(per_type)
    report.defect_fraction = round(float(np.mean(fractions)), 6) if fractions else None
