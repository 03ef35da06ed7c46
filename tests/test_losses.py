"""The segmentation loss of the heads and baselines."""

import pytest
import torch

from samliver.losses import IGNORE, SegLoss, seg_loss


def test_seg_loss_skips_ignored_pixels():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    masked = target.clone()
    masked[..., :4] = IGNORE
    # ignoring the left half is the same as cropping it away
    assert torch.allclose(seg_loss(logits, masked), seg_loss(logits[..., 4:], target[..., 4:]))
    assert seg_loss(logits, torch.full_like(target, IGNORE)).item() == 0.0


def test_segloss_module_matches_the_function_and_checks_weights():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randint(0, 3, (2, 8, 8))
    loss = SegLoss(tumour_weight=2.0, dice_weight=0.5)(logits, target)
    assert torch.allclose(loss, seg_loss(logits, target, 2.0, 0.5))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="weights must be >= 0"):
        SegLoss(tumour_weight=-1)
