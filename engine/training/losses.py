"""Segmentation losses, chosen with `train --loss` (LOSSES); each takes logits and a 0/1 target of the same shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch, so that defect-free crops do not dominate."""
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + 1) / (prob.sum() + target.sum() + 1)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus batch soft Dice (the default until 2026-12-08; validation's loss)."""
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(torch.sigmoid(logits), target)


def crop_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the mean soft Dice of the crops that hold a defect: each weighs the same, so a 100-px pit counts as much as
    a stain over half the crop (in batch Dice the pit's pixels are lost among the stain's); 0 where none holds one."""
    dims = tuple(range(1, prob.dim()))
    area = target.sum(dims)
    dice = (2 * (prob * target).sum(dims) + 1) / (prob.sum(dims) + area + 1)
    has_defect = area > 0
    return 1 - dice[has_defect].mean() if has_defect.any() else prob.sum() * 0


def bce_crop_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus the mean of batch soft Dice (which keeps false pixels on clean crops costly) and per-crop soft Dice
    (which gives small defects their weight), so that sets whose defects range from a few pixels to half the image
    learn the small ones too (the default)."""
    prob = torch.sigmoid(logits)
    return (F.binary_cross_entropy_with_logits(logits, target)
            + (soft_dice_loss(prob, target) + crop_dice_loss(prob, target)) / 2)


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (easy background pixels weigh little) plus batch soft Dice."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_true = torch.where(target > 0.5, prob, 1 - prob)
    return ((1 - p_true) ** gamma * bce).mean() * 4 + soft_dice_loss(prob, target)


def bce_tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
    """BCE plus batch Tversky loss, which weighs missed defect pixels (beta) above false ones (alpha)."""
    prob = torch.sigmoid(logits)
    tp = (prob * target).sum()
    tversky = (tp + 1) / (tp + alpha * (prob * (1 - target)).sum() + beta * ((1 - prob) * target).sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + 1 - tversky


LOSSES = {"bce-dice": seg_loss, "bce-crop-dice": bce_crop_dice_loss, "focal-dice": focal_dice_loss,
          "bce-tversky": bce_tversky_loss}
