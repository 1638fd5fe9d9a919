"""Hard negatives: where the model still flags defect-free training images, the spots the next epochs train on."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from engine.model import UNetTiny
from engine.training.batches import SegmentationDataset
from engine.training.prepare import TrainData
from engine.training.validation import image_logits

# Hard negatives: after each epoch this many defect-free training images are looked at (a rotating slice: about
# 2 s at KolektorSDD's size on 2 CPU cores), and up to HARD_SPOTS_PER_IMAGE regions above HARD_THRESHOLD (below
# the 0.5 of the default recipe, as tuned recipes often are) become crops of the next epochs (the share of the
# batch they take: HARD_SHARE_WHEN_PAINTING in engine/training/config.py).
HARD_SCAN_IMAGES = 48
HARD_SCAN_MIN = 8  # the fewest looked at when their time is bounded (--val-share of the epoch's training time)
HARD_SPOTS_PER_IMAGE = 4
HARD_THRESHOLD = 0.25


def hard_scan_slice(dataset: SegmentationDataset, epoch: int, rank: int = 0, world_size: int = 1,
                    count: int = HARD_SCAN_IMAGES) -> list[int]:
    """The defect-free training images to look at for hard negatives after `epoch`: the next `count` of them in turn
    (each process of a group its own part of those)."""
    good = [i for i, pixels in enumerate(dataset.defect_pixels) if not len(pixels)]
    n = min(len(good), count)
    return [good[((epoch - 1) * n + k) % len(good)] for k in range(n)][rank::world_size]


@torch.no_grad()
def find_hard_spots(model: UNetTiny, data: TrainData, indices: list[int], device: torch.device,
                    memory_format: torch.memory_format) -> dict[int, list[tuple[int, int]]]:
    """Where the model flags these defect-free training images: image index -> the (y, x) centres of up to
    HARD_SPOTS_PER_IMAGE regions above HARD_THRESHOLD, most confident first (empty where nothing is flagged)."""
    model.eval()
    spots = {}
    for index in indices:
        image, _ = data.train_set.pairs[index]
        prob = torch.sigmoid(image_logits(model, image, data.mean, data.std, device, memory_format).float())
        prob = prob[0, 0].cpu().numpy()
        count, labels, _, centres = cv2.connectedComponentsWithStats((prob > HARD_THRESHOLD).astype(np.uint8))
        peak = np.zeros(count, np.float32)
        np.maximum.at(peak, labels.ravel(), prob.ravel())
        peaks = sorted(range(1, count), key=lambda k: -peak[k])[:HARD_SPOTS_PER_IMAGE]
        spots[index] = [(int(round(centres[k][1])), int(round(centres[k][0]))) for k in peaks]
    model.train()
    return spots


