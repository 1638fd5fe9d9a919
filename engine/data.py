"""The dataset catalogue: find image/mask pairs, validate, split, load one pair, register; no torch here.

The torch input pipeline that turns these samples into training batches is engine.training.batches."""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from engine import config
from engine.errors import DatasetError, ImageError
from engine.imageio import IMAGE_EXTENSIONS, decode_raw, read_image, read_mask

SPLITS = ("train", "val", "test")
@dataclass
class Sample:
    """One image of a dataset and its mask (None means defect-free)."""

    id: str
    image_path: Path
    mask_path: Path | None
    split: str
    defect_types: str = ""
    has_defect: bool | None = None  # from the mask's pixels once decoded; None: not looked at yet
    sorted_into: str = ""  # the folder of a set sorted by verdict it was found in (scan_sorted); such sets have no splits

    @property
    def defective(self) -> bool:
        """Whether the image holds a defect: by mask content when known, else by the mask file's presence."""
        return self.mask_path is not None if self.has_defect is None else self.has_defect

    @property
    def outlined(self) -> bool:
        """Whether its defect pixels are known: a mask, or no defect. An image sorted into a defect folder, or labelled
        "defect, not outlined" (image_level), counts for verdicts (detection, false alarms, ranking) but not for pixel
        metrics nor training."""
        return self.mask_path is not None or not self.defective

    def holds_defect(self, truth: np.ndarray) -> bool:
        """Whether the image holds a defect, given its decoded mask: pixels in it, or sorted into a defect folder."""
        return bool(truth.any()) or not self.outlined

    @property
    def place(self) -> str:
        """Where it sits in its dataset, for lists: its split, or the folder of a set sorted by verdict."""
        return f"folder {self.sorted_into}/" if self.sorted_into else f"split {self.split}"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The defect types its manifest names, one each ("crack;stain" gives two); empty where none is named."""
        return tuple(sorted({t.strip() for t in re.split(r"[;+]", self.defect_types) if t.strip()}))

    @property
    def kind(self) -> str:
        """Its defect types, else "defect (type not given)" or "defect-free": what a list of samples shows."""
        return self.defect_types or ("defect (type not given)" if self.defective else "defect-free")


@dataclass
class DatasetReport:
    """What scan_dataset found: usable samples and a list of problems (one line each)."""

    root: Path
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)
    sorted_by_folder: bool = False  # good/ and defect folders, no masks and no splits (see scan_sorted)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split."""
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, int]:
        """Image counts overall, defective, defect-free and per split."""
        counts = {
            "images": len(self.samples),
            "defective": sum(s.defective for s in self.samples),
            "defect_free": sum(not s.defective for s in self.samples),
        }
        counts.update({name: len(self.split(name)) for name in SPLITS})
        return counts

    def training_splits(self, val_fraction: float = 0.15) -> tuple[list[Sample], list[Sample], bool]:
        """(train, val, carved): the val split, or when the set has none, one carved out of train; images labelled
        "defect, not outlined" (no pixels) are left out.

        Carving is stratified (defective and defect-free images apart) and stable: images are ordered by a
        hash of their id, so the same set always gives the same split, whatever the seed.
        """
        # An image labelled defective without its pixels cannot be trained on, nor validated by pixels.
        train, val = ([s for s in self.split(name) if s.outlined] for name in ("train", "val"))
        if val or len(train) < 2:
            return train, val, False
        carved: set[str] = set()
        for group in ([s for s in train if s.defective], [s for s in train if not s.defective]):
            n_val = round(len(group) * val_fraction) or (1 if len(group) >= 2 else 0)
            ordered = sorted(group, key=lambda s: hashlib.sha1(s.id.encode()).hexdigest())
            carved.update(s.id for s in ordered[:n_val])
        return [s for s in train if s.id not in carved], [s for s in train if s.id in carved], True

    def trainable_splits(self, val_fraction: float = 0.15) -> tuple[list[Sample], list[Sample], bool]:
        """training_splits, or DatasetError where they leave no image to train or none to validate on (what `train`
        and the Train page refuse before any work)."""
        train, val, carved = self.training_splits(val_fraction)
        if not train or not val:
            raise DatasetError(f"{self.root.name} needs at least 2 training images (found {self.counts()}); "
                               "generate or import more images")
        return train, val, carved


def split_for_id(sample_id: str) -> str:
    """Deterministic 80/10/10 split derived from the id alone (used when there is no manifest)."""
    bucket = int(hashlib.sha1(sample_id.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def stratified_splits(items: list[tuple[str, bool]]) -> dict[str, str]:
    """Split of each (id, defective) without a manifest: split_for_id, then, within the defective images and
    within the good ones apart, train gives val one image when it has none (from 2 images of the kind) and test
    one (from 3), lowest hash first, so a handful of labelled defects never all land in train; and val and test
    each give back to train what they hold beyond a tenth of the kind (at least one), highest hash first, so that
    a handful never mostly leaves train either (6 defects: 4 train, 1 val, 1 test)."""
    splits = {sample_id: split_for_id(sample_id) for sample_id, _ in items}
    for kind in (True, False):
        ids = sorted((i for i, defective in items if defective == kind),
                     key=lambda i: hashlib.sha1(i.encode()).hexdigest())
        for split, needed in (("val", 2), ("test", 3)):
            train = [i for i in ids if splits[i] == "train"]
            if len(ids) >= needed and train and not any(splits[i] == split for i in ids):
                splits[train[0]] = split
            held = [i for i in ids if splits[i] == split]
            for extra in held[max(1, round(len(ids) * 0.1)):]:
                splits[extra] = "train"
    return splits


def image_folder(root: Path) -> Path:
    """Where a dataset's images are: DIR/images, or DIR itself when it holds images directly (good parts)."""
    if (root / "images").is_dir() or not root.is_dir():
        return root / "images"
    if any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".") for p in root.iterdir()):
        return root
    return root / "images"


def _read_manifest(root: Path) -> dict[str, dict[str, str]]:
    for name in ("manifest.csv", "meta.csv"):
        path = root / name
        if path.is_file():
            with path.open(newline="") as handle:
                return {row["id"]: row for row in csv.DictReader(handle) if row.get("id")}
    return {}


IMAGE_LEVEL = "image_level"  # label_source of an image labelled "defect, not outlined" (engine.labels)


def image_level(row: dict[str, str]) -> bool:
    """Whether a manifest row marks its image defective without outlining it (label_source image_level): it counts
    for verdicts (detection, false alarms, AP, tuning) but has no pixels to train or measure Dice on."""
    return (row.get("label_source") or "").strip() == IMAGE_LEVEL


def listed_as_defective(row: dict[str, str]) -> bool:
    """Whether a manifest row gives its image a defect fraction above 0 (a number that is not one: no)."""
    try:
        return float(row.get("defect_fraction") or 0) > 0
    except ValueError:
        return False


GOOD_FOLDERS = ("good", "ok")  # names of the folder of good parts in a folder sorted by verdict
MASK_FOLDERS = ("masks", "mask", "ground_truth", "labels")


def images_in(folder: Path) -> list[Path]:
    """The image files directly in a folder (by extension, hidden ones left out), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not p.name.startswith("."))


def sorted_folders(root: Path) -> tuple[Path, list[Path]] | None:
    """(good folder, defect folders) where DIR is sorted by verdict: no DIR/images, no images directly in DIR, a
    good/ (or ok/) folder and at least one other folder of images; else None."""
    if not root.is_dir() or (root / "images").is_dir() or images_in(root):
        return None
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and images_in(p)]
    if any(p.name.lower() in MASK_FOLDERS for p in folders):
        return None  # masks beside the bins: not a layout of ours, and never defective parts
    good = [p for p in folders if p.name.lower() in GOOD_FOLDERS]
    defect = [p for p in folders if p.name.lower() not in GOOD_FOLDERS]
    return (good[0], defect) if len(good) == 1 and defect else None


def scan_sorted(root: Path, good: Path, defect_folders: list[Path], validate: bool = True) -> DatasetReport:
    """A folder sorted by verdict (DIR/good/ and DIR/<defect kind>/ of images, no masks): what a line has in its
    bins of passed and rejected parts. Every image is one sample of split "test" (id "<folder>-<name>"); those
    outside good/ are defective, typed by their folder's name, with no outline, so they tune and evaluate a
    run's verdicts (detection, false alarms, ranking) but give no pixel metrics and cannot train."""
    samples, problems = [], []
    for folder in [good, *defect_folders]:
        defective = folder is not good
        for path in images_in(folder):
            sample = Sample(f"{folder.name}-{path.stem}", path, None, "test", folder.name if defective else "",
                            has_defect=defective, sorted_into=folder.name)
            if validate:
                try:
                    check_pair(sample)
                except ImageError as err:
                    problems.append(str(err))
                    continue
            samples.append(sample)
    if not any(s.defective for s in samples) or all(s.defective for s in samples):
        raise DatasetError(f"{root}: a folder sorted by verdict needs readable images in {good.name}/ and in at "
                           "least one folder of defective parts")
    return DatasetReport(root, samples, problems, sorted_by_folder=True)


def scan_dataset(root: str | Path, validate: bool = True) -> DatasetReport:
    """Find image/mask pairs in DIR/images and DIR/masks (or DIR's images: good parts; or DIR/good/ and defect
    folders: scan_sorted); with validate, decode each and report problems."""
    root = Path(root)
    sorted_layout = sorted_folders(root)
    if sorted_layout is not None:
        return scan_sorted(root, *sorted_layout, validate=validate)
    image_dir, mask_dir = image_folder(root), root / "masks"
    if not image_dir.is_dir():
        named = config.DATA_DIR / root.name
        if len(root.parts) == 1 and root.name not in ("", ".", "..") and named.is_dir():  # the name of an import
            raise DatasetError(f"{root}: no such folder here; the dataset imported as {root.name} is --data {named}")
        raise DatasetError(f"{root}: no images found; a dataset is a folder of images (good parts), or DIR/images/ "
                           "with DIR/masks/ holding a mask of the same name for each image with a defect, or DIR/good/ beside "
                           "folders of defective parts (to tune and evaluate a run on verdicts alone)")
    manifest = _read_manifest(root)
    masks = {p.stem: p for p in mask_dir.glob("*.png")} if mask_dir.is_dir() else {}
    samples, problems, unsplit = [], [], set()
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        row = manifest.get(path.stem, {})
        split = row.get("split") or ""
        if not split:
            unsplit.add(path.stem)
            split = split_for_id(path.stem)
        elif split not in SPLITS:
            problems.append(f"{path.name}: unknown split '{split}' in manifest; using {split_for_id(path.stem)}")
            split = split_for_id(path.stem)
        sample = Sample(path.stem, path, masks.get(path.stem), split, row.get("defect_types", "") or "")
        if sample.mask_path is not None and (row.get("defect_fraction") or "").strip():
            sample.has_defect = listed_as_defective(row)  # the manifest knows; decoding below confirms it
        unoutlined = sample.mask_path is None and image_level(row)
        if unoutlined:
            sample.has_defect = True
        elif sample.mask_path is None and listed_as_defective(row):
            problems.append(f"{path.name}: manifest lists a defect but masks/{path.stem}.png is missing")
            continue
        if validate:
            try:
                sample.has_defect = check_pair(sample) or unoutlined
            except ImageError as err:
                problems.append(str(err))
                continue
        samples.append(sample)
    splits = stratified_splits([(s.id, s.defective) for s in samples if s.id in unsplit])
    for sample in samples:
        sample.split = splits.get(sample.id, sample.split)
    image_ids = {p.stem for p in image_dir.iterdir()}
    problems.extend(f"masks/{m}.png has no image" for m in sorted(set(masks) - image_ids))
    if not samples:
        raise DatasetError(f"{root}: no usable images found" + (f" ({len(problems)} problems: {problems[0]})" if problems else ""))
    return DatasetReport(root, samples, problems)


def check_pair(sample: Sample) -> bool:
    """Whether the mask holds a defect pixel; ImageError if image or mask is unreadable or their sizes differ."""
    try:  # the reader training uses, so that an image passed here also loads there
        header = decode_raw(sample.image_path.read_bytes(), sample.image_path.name)
    except OSError as err:
        raise ImageError(f"{sample.image_path.name}: cannot read ({err.strerror or err})") from err
    if sample.mask_path is not None:
        mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise ImageError(f"{sample.mask_path.name}: unreadable or corrupt mask")
        if mask.shape[:2] != header.shape[:2]:
            raise ImageError(
                f"{sample.image_path.name}: mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                f"{header.shape[1]}x{header.shape[0]}"
            )
        return bool(mask.any())
    return False


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Load an image (float32 gray in [0, 1]) and its mask (uint8 0/1; zeros when defect-free)."""
    image = read_image(sample.image_path)
    if sample.mask_path is None:
        return image, np.zeros(image.shape, np.uint8)
    mask = read_mask(sample.mask_path)
    if mask.shape != image.shape:
        raise ImageError(f"{sample.image_path.name}: mask size {mask.shape} differs from image {image.shape}")
    return image, mask


def dataset_hash(samples: list[Sample]) -> str:
    """Content hash of a dataset: ids, splits and the bytes of every image and mask."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.id):
        digest.update(f"{s.id}:{s.split}".encode())
        digest.update(s.image_path.read_bytes())
        if s.mask_path is not None:
            digest.update(s.mask_path.read_bytes())
    return digest.hexdigest()[:16]


def seen_in_training(dataset_path: str | Path | None, samples: list[Sample]) -> list[Sample]:
    """The samples whose image file is byte for byte one that training saw (the train or val split of the folder
    it trained on): tuning or judging a model on them would measure what it learned, not how it does on new parts."""
    folder = Path(dataset_path or "")
    if not dataset_path or not folder.is_dir():
        return []
    try:
        used = [s.image_path for s in scan_dataset(folder, validate=False).samples if s.split in ("train", "val")]
    except DatasetError:
        return []
    by_size: dict[int, list[Path]] = {}
    for path in used:
        by_size.setdefault(path.stat().st_size, []).append(path)
    candidates = [s for s in samples if s.image_path.stat().st_size in by_size]  # equal bytes need equal sizes
    sizes = {s.image_path.stat().st_size for s in candidates}
    seen = {hashlib.sha1(p.read_bytes()).digest() for size in sizes for p in by_size[size]}
    return [s for s in candidates if hashlib.sha1(s.image_path.read_bytes()).digest() in seen]


def register_dataset(path: str | Path, source: str = "imported", details: dict | None = None,
                     name: str | None = None):
    """Scan a dataset folder (DatasetError if unusable) and record it in the registry; returns the row."""
    from engine import registry  # registry is not needed for training-time data loading

    root = Path(path)
    report = scan_dataset(root, validate=False)
    counts = report.counts()
    return registry.upsert_dataset(name or root.name, str(root.resolve()), dataset_hash(report.samples),
                                   counts["images"], counts["defective"], counts["defect_free"], source=source,
                                   details=details)


def dataset_choices(trainable: bool = False) -> dict[str, Path]:
    """Datasets a user can pick: registered ones whose folder still exists plus folders under DATA_DIR with images/;
    folders sorted by verdict (no masks) too, unless `trainable`."""
    from engine import config, registry

    choices: dict[str, Path] = {}
    for dataset in registry.list_datasets():
        path = Path(dataset.path)
        # DIR/images, or a plain folder of good parts, or good/ beside defect folders (to review and tune on)
        if image_folder(path).is_dir() or (not trainable and sorted_folders(path) is not None):
            choices.setdefault(dataset.name, path)
    known = {path.resolve() for path in choices.values()}
    if config.DATA_DIR.is_dir():
        for folder in sorted(p for p in config.DATA_DIR.iterdir() if (p / "images").is_dir()):
            if folder.resolve() not in known:
                choices.setdefault(folder.name, folder)
    return choices
