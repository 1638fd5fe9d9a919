"""Dataset folders: find image/mask pairs, validate, split, load into memory, augment for training."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
import torch

from engine import config
from engine.errors import DatasetError, ImageError
from engine.imageio import IMAGE_EXTENSIONS, decode_raw, read_image, read_mask

SPLITS = ("train", "val", "test")
# (image, rng) -> (painted image, mask, types drawn): engine.paint.paint
Painter = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray, list[str]]]


class Pick(NamedTuple):
    """One training crop to cut from image `index`: around one of its defects (centred), around a point of it
    (spot, (y, x) in the stored image: a hard negative, see DefectBatchSampler), or anywhere."""

    index: int
    centred: bool = False
    spot: tuple[int, int] | None = None


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


def _listed_as_defective(row: dict[str, str]) -> bool:
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
            sample.has_defect = _listed_as_defective(row)  # the manifest knows; decoding below confirms it
        unoutlined = sample.mask_path is None and image_level(row)
        if unoutlined:
            sample.has_defect = True
        elif sample.mask_path is None and _listed_as_defective(row):
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


def image_stats(images: list[np.ndarray]) -> tuple[float, float]:
    """Mean and standard deviation of pixel values over a list of images (for normalisation)."""
    values = np.concatenate([im[::4, ::4].ravel() for im in images])
    return float(values.mean()), float(max(values.std(), 1e-3))


class SegmentationDataset(torch.utils.data.Dataset):
    """Decoded images held in memory; training items are augmented square crops, some centred on defects.

    An item is asked for by index (a defect-centred crop with probability defect_crop_share) or, from
    DefectBatchSampler, by a Pick, so that every batch holds its share of defect crops and hard negatives.
    """

    def __init__(
        self,
        samples: list[Sample],
        crop: int = 128,
        augment: bool = True,
        defect_crop_share: float = 0.6,
        seed: int = 0,
        scale: float = 1.0,
        pairs: list[tuple[np.ndarray, np.ndarray]] | None = None,
        paint_share: float = 0.0,
        painter: Painter | None = None,
    ) -> None:
        """`pairs` are the samples' decoded (image, mask) at full size when the caller has them already;
        `paint_share` of the crops without a defect get defects painted on by `painter` (engine.paint.paint,
        passed in so that data loading does not depend on the generator)."""
        self.samples = samples
        # Decode (and rescale) once; training is then compute-bound.
        pairs = pairs if pairs is not None else [load_pair(s) for s in samples]
        self.pairs = [rescale_pair(image, mask, scale) for image, mask in pairs]
        self.crop, self.augment, self.defect_crop_share = crop, augment, defect_crop_share
        self.paint_share, self.painter = (paint_share, painter) if painter else (0.0, None)
        self.rng = np.random.default_rng(seed)
        # Defect pixel coordinates per image, to centre some crops on defects.
        self.defect_pixels = [np.argwhere(mask) for _, mask in self.pairs]
        # Quarter turns only where the parts themselves are square; elsewhere orientation is fixed by the
        # fixture (a long part is never seen sideways), so flips (180-degree turns included) are the geometry.
        self.quarter_turns = all(image.shape[0] == image.shape[1] for image, _ in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def defective(self) -> list[int]:
        """Indices of the images that hold at least one defect pixel."""
        return [i for i, pixels in enumerate(self.defect_pixels) if len(pixels)]

    def __getitem__(self, item: int | tuple) -> tuple[torch.Tensor, torch.Tensor]:
        pick = Pick(*item) if isinstance(item, tuple) else Pick(item, self.rng.random() < self.defect_crop_share)
        image, mask = self.pairs[pick.index]
        image, mask = self._random_crop(image, mask, self.focus(pick))
        # A hard negative is shown as it is: it teaches what is not a defect.
        if self.paint_share and pick.spot is None and not mask.any() and self.rng.random() < self.paint_share:
            image, mask, _ = self.painter(image, self.rng)
        if self.augment:
            image, mask = augment_pair(image, mask, self.rng, self.quarter_turns)
        return torch.from_numpy(image[None].copy()), torch.from_numpy(mask[None].astype(np.float32))

    def focus(self, pick: Pick) -> np.ndarray | None:
        """The pixels (N, 2) one of which a picked crop must hold, or None for a crop anywhere."""
        if pick.spot is not None:
            return np.array([pick.spot])
        return self.defect_pixels[pick.index] if pick.centred else None

    def _random_crop(self, image: np.ndarray, mask: np.ndarray,
                     focus: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        image, mask = pad_to_crop(image, mask, self.crop)
        y, x = self.crop_origin(image.shape, focus)
        return image[y : y + self.crop, x : x + self.crop], mask[y : y + self.crop, x : x + self.crop]

    def crop_origin(self, shape: tuple[int, ...], focus: np.ndarray | None) -> tuple[int, int]:
        """Top-left corner of a random crop in an image of this (padded) shape; with pixels given (defect pixels,
        a hard spot), the crop holds one of them."""
        size, (height, width) = self.crop, shape[-2:]
        if focus is not None and len(focus):
            cy, cx = focus[self.rng.integers(len(focus))]
            y = int(np.clip(cy - self.rng.integers(size), 0, height - size))
            x = int(np.clip(cx - self.rng.integers(size), 0, width - size))
        else:
            y, x = int(self.rng.integers(height - size + 1)), int(self.rng.integers(width - size + 1))
        return y, x


def pad_to_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad an image and its mask at the bottom and right up to the crop size where smaller, both reflected (a
    defect mirrored into the padding is labelled there too)."""
    height, width = image.shape
    if height >= size and width >= size:
        return image, mask
    pad = ((0, max(0, size - height)), (0, max(0, size - width)))
    return np.pad(image, pad, mode="reflect"), np.pad(mask, pad, mode="reflect")


class DeviceBatches:
    """Training batches cut and augmented on the training device from images held there: the GPU data path.

    The same crops as SegmentationDataset (a sampler's Picks) and the same augmentation as
    augment_pair, drawn for a whole batch at once on the device, so a GPU does not wait on the CPU. Painting
    is not done here (it runs on the CPU): training uses the CPU loader when it paints.
    """

    def __init__(self, dataset: SegmentationDataset, sampler: DefectBatchSampler, device: torch.device) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        padded = [pad_to_crop(image, mask, dataset.crop) for image, mask in dataset.pairs]
        self.images = [torch.from_numpy(np.ascontiguousarray(image)).to(device) for image, _ in padded]
        self.masks = [torch.from_numpy(np.ascontiguousarray(mask)).to(device) for _, mask in padded]
        self.noise = torch.Generator(device=device)
        self.noise.manual_seed(int(dataset.rng.integers(2**62)))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for items in self.sampler:
            yield self.batch(items)

    def batch(self, items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 1, S, S) float32 and masks (N, 1, S, S) 0/1 float32 for these Picks."""
        size, images, masks = self.dataset.crop, [], []
        for pick in (Pick(*item) for item in items):
            y, x = self.dataset.crop_origin(self.images[pick.index].shape, self.dataset.focus(pick))
            images.append(self.images[pick.index][y : y + size, x : x + size])
            masks.append(self.masks[pick.index][y : y + size, x : x + size])
        images, masks = torch.stack(images)[:, None], torch.stack(masks)[:, None].float()
        if self.dataset.augment:
            images, masks = augment_batch(images, masks, self.dataset.rng, self.noise, self.dataset.quarter_turns)
        return images, masks


def augment_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, noise: torch.Generator,
                  quarter_turns: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """augment_pair for a batch on its own device: each crop gets its own flips, quarter turns (square crops,
    when allowed), brightness/contrast and noise. The per-crop draws come from rng (a few numbers, no device
    synchronisation); the noise pixels from the device generator `noise`."""
    n, device = images.shape[0], images.device

    def per_crop(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=images.dtype).to(device, non_blocking=True)[:, None, None, None]

    for dim, flip in ((3, rng.random(n) < 0.5), (2, rng.random(n) < 0.5)):
        chosen = per_crop(flip) > 0
        images, masks = torch.where(chosen, images.flip(dim), images), torch.where(chosen, masks.flip(dim), masks)
    if quarter_turns and images.shape[-1] == images.shape[-2]:
        turns = rng.integers(4, size=n)
        images, masks = images.clone(), masks.clone()
        for k in (1, 2, 3):
            rows = torch.as_tensor(np.flatnonzero(turns == k), device=device)
            if len(rows):
                images[rows] = torch.rot90(images[rows], k, (2, 3))
                masks[rows] = torch.rot90(masks[rows], k, (2, 3))
    contrast, brightness = per_crop(rng.uniform(0.75, 1.25, n)), per_crop(rng.uniform(-0.1, 0.1, n))
    mean = images.mean((2, 3), keepdim=True)
    images = (images - mean) * contrast + mean + brightness
    sigma = per_crop(np.where(rng.random(n) < 0.3, rng.uniform(0.005, 0.03, n), 0.0))
    images = images + torch.randn(images.shape, generator=noise, device=device, dtype=images.dtype) * sigma
    return images.contiguous(), masks.contiguous()


class DefectBatchSampler(torch.utils.data.Sampler):
    """Batches of Picks where a fixed share of every batch is crops centred on a defect, and another share crops
    around hard negatives: spots where the model last flagged a defect-free image (see `set_hard_spots`).

    With a handful of defective images among many good ones, sampling by image leaves most batches without
    a defect pixel; guaranteeing the share per batch keeps the loss informative. The other crops are drawn
    at random from all images, so good surfaces are seen as often as they occur; random crops seldom land on
    the rare structures of a good part that look like a defect, which the hard negatives show again.
    """

    def __init__(self, dataset: SegmentationDataset, batch_size: int, steps: int, defect_share: float = 0.5,
                 seed: int = 0, hard_share: float = 0.0) -> None:
        self.defective, self.n_images = dataset.defective, len(dataset)
        self.batch_size, self.steps = batch_size, steps
        self.n_centred = round(batch_size * defect_share) if self.defective else 0
        self.n_hard = min(round(batch_size * hard_share), batch_size - self.n_centred)
        self.hard_spots: dict[int, list[tuple[int, int]]] = {}
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def set_hard_spots(self, spots: dict[int, list[tuple[int, int]]]) -> None:
        """Replace the hard spots of the images looked at (image index -> (y, x) points; an empty list clears)."""
        for index, points in spots.items():
            if points:
                self.hard_spots[index] = list(points)
            else:
                self.hard_spots.pop(index, None)

    def __iter__(self):
        for _ in range(self.steps):
            centred = [Pick(int(i), True) for i in self.rng.choice(self.defective, self.n_centred)
                       ] if self.n_centred else []
            spots = [(index, point) for index, points in self.hard_spots.items() for point in points]
            hard = [Pick(spots[k][0], False, spots[k][1]) for k in self.rng.integers(len(spots), size=self.n_hard)
                    ] if spots else []
            n_rest = self.batch_size - len(centred) - len(hard)
            yield centred + hard + [Pick(int(i)) for i in self.rng.integers(self.n_images, size=n_rest)]


# Automatic training geometry: thin defects must stay visible, the image must keep enough context.
MIN_DEFECT_WIDTH_PX = 5  # the thinnest defects (10th percentile of widths) stay at least this wide
MIN_SMALLEST_DEFECT_PX = 3  # and the smallest of all (a rare kind of small pits among wide defects) this wide
MIN_SHORT_SIDE_PX = 224  # images are not shrunk below this short side
CROP_RANGE = (128, 192)  # crops follow the (scaled) short side within this range, in steps of 32


def defect_widths(masks: list[np.ndarray]) -> np.ndarray:
    """Width in px of every defect region (twice its largest inscribed radius)."""
    widths = []
    for mask in masks:
        if not mask.any():
            continue
        binary = (mask > 0).astype(np.uint8)
        count, labels = cv2.connectedComponents(binary, connectivity=8)
        radius = cv2.distanceTransform(binary, cv2.DIST_L2, 3)
        peaks = np.zeros(count, np.float32)
        np.maximum.at(peaks, labels.ravel(), radius.ravel())
        widths.extend(2 * peaks[1:])
    return np.asarray(widths, np.float32)


def auto_geometry(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """Training scale and crop from the images' sizes and the defects' widths (the choice `train` makes alone).

    Scale: as small as keeps the median short side >= MIN_SHORT_SIDE_PX, the thinnest defects >=
    MIN_DEFECT_WIDTH_PX wide and the smallest one >= MIN_SMALLEST_DEFECT_PX, in steps of 1/8, never above 1. Crop:
    the scaled short side, in steps of 32, within CROP_RANGE.
    """
    short = float(np.median([min(image.shape) for image, _ in pairs]))
    widths = defect_widths([mask for _, mask in pairs])
    need = MIN_SHORT_SIDE_PX / short
    if len(widths):
        need = max(need, MIN_DEFECT_WIDTH_PX / max(float(np.percentile(widths, 10)), 1e-3),
                   MIN_SMALLEST_DEFECT_PX / max(float(widths.min()), 1e-3))
    scale = min(1.0, math.ceil(need * 8) / 8)
    crop = int(np.clip(int(short * scale) // 32 * 32, *CROP_RANGE))
    return scale, crop


def rescale_pair(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (area interpolation) and its mask (pixels at least half covered) by scale."""
    if scale == 1.0:
        return image, mask
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    mask = (cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5).astype(np.uint8)
    return image, mask


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 quarter_turns: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, quarter turns (square crops, when allowed), brightness/contrast and noise."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if quarter_turns and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-0.1, 0.1)
    image = (image - image.mean()) * contrast + image.mean() + brightness
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.005, 0.03), image.shape).astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)


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
