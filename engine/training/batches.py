"""The training input pipeline: decoded samples held in memory, augmented crops, batches with their share of defects."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import cv2
import numpy as np
import torch

from engine.data import Sample, load_pair

# (image, rng) -> (painted image, mask, types drawn): engine.paint.paint
Painter = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray, list[str]]]


class Pick(NamedTuple):
    """One training crop to cut from image `index`: around one of its defects (centred), around a point of it
    (spot, (y, x) in the stored image: a hard negative, see DefectBatchSampler), or anywhere."""

    index: int
    centred: bool = False
    spot: tuple[int, int] | None = None


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
