"""Tagger losses (BCE, ASL stable in half precision) and validation metrics, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captionkit.train.losses import AsymmetricLoss, BCELoss, build_loss
from captionkit.train.tagger_metrics import average_precision, best_thresholds, compute_metrics


def test_asl_without_focusing_equals_bce():
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * 3
    targets = (torch.rand(8, 5) > 0.5).float()
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets)
    assert asl.item() == pytest.approx(BCELoss()(logits, targets).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_asl_is_finite_for_half_precision_logits_and_extremes(dtype):
    logits = torch.tensor([[40.0, -40.0, 0.0, 12.0], [-65000.0, 65000.0, 3.0, -12.0]]).to(dtype)
    logits.requires_grad_(True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    loss = AsymmetricLoss()(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(logits.grad.float()).all()


def test_asl_down_weights_easy_negatives():
    targets = torch.zeros(1, 1)
    easy = AsymmetricLoss()(torch.tensor([[-3.0]]), targets).item()
    assert easy == pytest.approx(0.0, abs=1e-6)  # probability 0.047 < clip 0.05: discarded
    hard = AsymmetricLoss()(torch.tensor([[2.0]]), targets).item()
    assert hard > 0.1
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal")


def test_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    targets = np.array([1, 0, 1, 0])
    assert average_precision(scores, targets) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert np.isnan(average_precision(scores, np.zeros(4)))


def test_metrics_at_threshold_and_tuned_thresholds():
    scores = np.array([[0.9, 0.2, 0.1], [0.8, 0.6, 0.2], [0.3, 0.4, 0.3], [0.1, 0.45, 0.2]])
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]])
    metrics = compute_metrics(scores, targets, threshold=0.5)
    assert metrics.map == pytest.approx(1.0)  # each tag's positives rank first
    # tag 0: tp 2; tag 1: tp 1 (0.6), fn 2 (0.4, 0.45); micro = 2*3 / (2*3 + 0 + 2)
    assert metrics.micro_f1 == pytest.approx(6 / 8)
    assert metrics.macro_f1 == pytest.approx((1.0 + 0.5) / 2)  # tag 2 has no positives: left out
    assert metrics.tags_without_positives == 1
    assert metrics.tuned_macro_f1 == pytest.approx(1.0)
    assert 0.2 < metrics.thresholds[1] <= 0.4  # cut between 0.4 and 0.2
    assert metrics.thresholds[2] == pytest.approx(0.5)  # no positives: the default


def test_best_threshold_never_splits_equal_scores():
    scores = np.array([[0.5], [0.5], [0.1]])
    targets = np.array([[1], [0], [0]])
    thresholds, f1 = best_thresholds(scores, targets)
    assert 0.1 < thresholds[0] <= 0.5 and f1[0] == pytest.approx(2 / 3)


def test_average_precision_groups_tied_scores_like_sklearn():
    import numpy as np

    from captionkit.train.tagger_metrics import average_precision

    constant = np.full(4, 0.5)
    assert average_precision(constant, np.array([1, 0, 0, 0])) == 0.25
    assert average_precision(constant, np.array([0, 0, 0, 1])) == 0.25  # order does not matter
    assert abs(average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) - (0.5 + 0.5 * 2 / 3)) < 1e-12
