"""Segmentation losses for the heads (and the UNet baselines): one concept, one module.

``SegLoss``: weighted cross-entropy (tumour class up-weighted) + soft Dice over the liver
(classes >= 1) and the tumour (class 2), each Dice computed over the whole batch as one region,
because the reported metric is global Dice. Pixels labelled ``IGNORE`` count in neither term.
Optional small-lesion term (``tversky_weight`` > 0): a focal Tversky loss on the tumour class
(Abraham & Khan 2019), which weighs missed tumour pixels more than false alarms (beta > alpha)
and, through the focal exponent, a batch whose tumour is mostly missed more than one nearly right.
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

    def __init__(self, tumour_weight: float = 3.0, dice_weight: float = 1.0,
                 tversky_weight: float = 0.0) -> None:
        super().__init__()
        if tumour_weight < 0 or dice_weight < 0 or tversky_weight < 0:
            raise ValueError(f"Loss weights must be >= 0, got tumour_weight={tumour_weight}, "
                             f"dice_weight={dice_weight}, tversky_weight={tversky_weight}.")
        self.tumour_weight = float(tumour_weight)
        self.dice_weight = float(dice_weight)
        self.tversky_weight = float(tversky_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, C, H, W) against integer ``target`` (N, H, W)."""
        return seg_loss(logits, target, self.tumour_weight, self.dice_weight,
                        tversky_weight=self.tversky_weight)


TVERSKY_ALPHA = 0.3
"""Weight of false-positive tumour pixels in the Tversky index (false negatives: 1 - alpha)."""
TVERSKY_GAMMA = 0.75
"""Focal exponent of the focal Tversky loss, ``(1 - TI) ** gamma`` (Abraham & Khan: 1 / (4/3))."""


def focal_tversky(prob: torch.Tensor, target: torch.Tensor, alpha: float = TVERSKY_ALPHA,
                  gamma: float = TVERSKY_GAMMA) -> torch.Tensor:
    """Batch-global focal Tversky loss ``(1 - TI) ** gamma`` of a probability map vs a 0/1 mask.

    ``TI = TP / (TP + alpha FP + (1 - alpha) FN)`` (smoothed by 1): alpha < 0.5 penalises
    missed pixels more than false alarms, the error that loses small lesions.
    """
    tp = (prob * target).sum()
    fp = (prob * (1 - target)).sum()
    fn = ((1 - prob) * target).sum()
    ti = (tp + 1) / (tp + alpha * fp + (1 - alpha) * fn + 1)
    return (1 - ti).clamp_min(0) ** gamma


def seg_loss(logits: torch.Tensor, target: torch.Tensor, tumour_weight: float = 3.0,
             dice_weight: float = 1.0, *, tversky_weight: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice (liver = classes >= 1, tumour = class 2), batch-global.

    Pixels labelled ``IGNORE`` (255; e.g. unconfident pseudo-labels) count in neither term.
    ``tversky_weight`` (default 0) adds that much :func:`focal_tversky` on the tumour class.
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
    loss = ce + dice_weight * torch.stack(dice_terms).mean()
    if tversky_weight and n > 2:
        loss = loss + tversky_weight * focal_tversky(prob[:, 2], (target == 2).float() * valid)
    return loss
