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


def test_focal_tversky_term_is_optional_and_penalises_missed_tumour_more():
    """tversky_weight=0 is the plain loss; the term weighs false negatives above false positives."""
    from samliver.losses import focal_tversky

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, 3, (2, 16, 16))
    assert torch.allclose(seg_loss(logits, target, tversky_weight=0.0), seg_loss(logits, target))
    assert seg_loss(logits, target, tversky_weight=1.0) > seg_loss(logits, target)
    assert torch.allclose(SegLoss(tversky_weight=0.5)(logits, target),
                          seg_loss(logits, target, tversky_weight=0.5))
    gt = torch.zeros(32)
    gt[:16] = 1
    missed = gt.clone()
    missed[:8] = 0  # 8 tumour pixels missed
    extra = gt.clone()
    extra[16:24] = 1  # 8 false alarms
    assert focal_tversky(missed, gt) > focal_tversky(extra, gt)
    assert float(focal_tversky(gt, gt)) < 1e-6
    with pytest.raises(ValueError):
        SegLoss(tversky_weight=-1)
