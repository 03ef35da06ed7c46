"""Segmentation losses for the heads (and the UNet baselines): one concept, one module.

``SegLoss``: weighted cross-entropy (tumour class up-weighted) + soft Dice over the liver
(classes >= 1) and the tumour (class 2), each Dice computed over the whole batch as one region,
because the reported metric is global Dice. Pixels labelled ``IGNORE`` count in neither term.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE = 255  # label value that the loss skips (unconfident pseudo-labels)


class SegLoss(nn.Module):
    """Weighted cross-entropy + batch-global soft Dice for (background, liver, tumour) logits.

    Args:
        tumour_weight: cross-entropy weight of the tumour class (background and liver: 1).
        dice_weight: weight of the soft-Dice term.

    Raises:
        ValueError: a negative weight.
    """

    def __init__(self, tumour_weight: float = 3.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        if tumour_weight < 0 or dice_weight < 0:
            raise ValueError(f"Loss weights must be >= 0, got tumour_weight={tumour_weight}, "
                             f"dice_weight={dice_weight}.")
        self.tumour_weight = float(tumour_weight)
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, C, H, W) against integer ``target`` (N, H, W)."""
        return seg_loss(logits, target, self.tumour_weight, self.dice_weight)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, tumour_weight: float = 3.0,
             dice_weight: float = 1.0) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice (liver = classes >= 1, tumour = class 2), batch-global.

    Pixels labelled ``IGNORE`` (255; e.g. unconfident pseudo-labels) count in neither term.
    """
    n = logits.shape[1]
    w = torch.ones(n, device=logits.device)
    if n > 2:
        w[2] = tumour_weight
    ce = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    if not torch.isfinite(ce):  # every pixel ignored
        ce = logits.sum() * 0.0
    valid = (target != IGNORE).float()
    target = torch.where(target == IGNORE, torch.zeros_like(target), target)
    prob = logits.float().softmax(1) * valid[:, None]
    dice_terms = []
    regions = [(prob[:, 1:].sum(1), (target >= 1).float() * valid)]
    if n > 2:
        regions.append((prob[:, 2], (target == 2).float() * valid))
    for p, g in regions:
        inter = (p * g).sum()
        dice_terms.append(1 - (2 * inter + 1) / (p.sum() + g.sum() + 1))
    return ce + dice_weight * torch.stack(dice_terms).mean()
