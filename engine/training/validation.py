"""Validation of whole images: the model's logits at each image's own size, and the set's metrics."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engine.inspection import inspect
from engine.metrics import SetMetrics, auroc, average_precision, image_score
from engine.model import UNetTiny
from engine.recipe import Recipe
from engine.training.batches import SegmentationDataset
from engine.training.losses import seg_loss


def pad_to_stride(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, int, int]:
    """Reflect-pad an NCHW tensor so height and width are multiples of stride; returns original H, W."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % stride, (-width) % stride
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(height, width) > max(pad_h, pad_w) else "replicate")
    return x, height, width


def upsample(probability: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities of an image resized for the model, brought to the image's own `shape` (height, width) as the
    Predictor brings them (linear interpolation)."""
    if probability.shape == tuple(shape[:2]):
        return probability
    return cv2.resize(probability, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def image_logits(model: UNetTiny, image: np.ndarray, mean: float, std: float, device: torch.device,
                 memory_format: torch.memory_format) -> torch.Tensor:
    """The model's logits (1, 1, H, W) for one whole image at its own size."""
    x = torch.from_numpy((image - mean) / std)[None, None].to(device)
    x, height, width = pad_to_stride(x, model.stride)
    return model(x.contiguous(memory_format=memory_format))[..., :height, :width]


@torch.no_grad()
def validate(model: UNetTiny, dataset: SegmentationDataset, mean: float, std: float, device: torch.device,
             memory_format: torch.memory_format, indices: list[int] | None = None
             ) -> tuple[float, dict, list[np.ndarray], list[np.ndarray]]:
    """Loss and metrics on whole validation images (each at its own size; those at `indices`, default all);
    returns their probabilities and masks too (set_metrics says what the metrics hold)."""
    model.eval()
    losses, probs, truths = [], [], []
    for index in range(len(dataset.pairs)) if indices is None else indices:
        image, mask = dataset.pairs[index]
        logits = image_logits(model, image, mean, std, device, memory_format)
        target = torch.from_numpy(mask[None, None].astype(np.float32)).to(device)
        losses.append(float(seg_loss(logits.float(), target)))
        probs.append(torch.sigmoid(logits.float())[0, 0].cpu().numpy())
        truths.append(mask)
    model.train()
    return float(np.mean(losses)), set_metrics(probs, truths), probs, truths


def set_metrics(probs: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Metrics of validated images from their probabilities and masks.

    Besides pixel Dice/IoU at 0.5, the metrics hold the image-level average precision and AUROC of the
    images' scores (metrics.image_score; None when the split lacks defective or defect-free images) and `score`,
    the number the best epoch is chosen by: the mean of AP and Dice, or Dice alone without AP.
    """
    metrics = SetMetrics()
    for prob, mask in zip(probs, truths):
        # Before a recipe is tuned, the default one decides: any region at 0.5 flags the image.
        inspection = inspect(prob, Recipe())
        metrics.add(inspection.mask, mask, flagged=inspection.flagged)
    result = metrics.result()
    scores, labels = [image_score(p) for p in probs], [bool(t.any()) for t in truths]
    result["average_precision"] = average_precision(scores, labels)
    result["auroc"] = auroc(scores, labels)
    ap = result["average_precision"]
    result["score"] = result["dice"] if ap is None else (ap + result["dice"]) / 2
    return result


