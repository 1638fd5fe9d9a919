"""Segmentation losses, chosen with `train --loss` (LOSSES); each takes logits and a 0/1 target of the same shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch, so that defect-free crops do not dominate."""
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + 1) / (prob.sum() + target.sum() + 1)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus batch soft Dice (the default)."""
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(torch.sigmoid(logits), target)


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


LOSSES = {"bce-dice": seg_loss, "focal-dice": focal_dice_loss, "bce-tversky": bce_tversky_loss}
