"""The tag-vectorised metrics equal the per-tag loops they replaced (random data, ties, tags without positives)."""

from __future__ import annotations

import numpy as np
import pytest

from captionkit.train import tagger_metrics
from captionkit.train.tagger_metrics import best_thresholds, compute_metrics, per_tag_average_precision

# -- the per-tag code as it was (captionkit before the vectorised metrics), kept as the reference --


def reference_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    hits = targets[order].astype(np.float64)
    true_positives = np.cumsum(hits)
    ranks = np.arange(1, hits.size + 1)
    last_of_tie = np.r_[np.nonzero(np.diff(sorted_scores))[0], hits.size - 1]
    true_positives, ranks = true_positives[last_of_tie], ranks[last_of_tie]
    recall_gain = np.diff(np.r_[0.0, true_positives]) / positives
    return float((true_positives / ranks * recall_gain).sum())


def reference_best_thresholds(scores: np.ndarray, targets: np.ndarray, default: float = 0.5):
    count, num_tags = scores.shape
    thresholds = np.full(num_tags, default, dtype=np.float64)
    best_f1 = np.zeros(num_tags, dtype=np.float64)
    for j in range(num_tags):
        positives = targets[:, j].sum()
        if positives == 0:
            continue
        order = np.argsort(-scores[:, j], kind="mergesort")
        sorted_scores = scores[order, j]
        hits = targets[order, j].astype(np.float64)
        tp = np.cumsum(hits)
        fp = np.arange(1, count + 1) - tp
        fn = positives - tp
        denominator = 2 * tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        distinct = np.append(sorted_scores[:-1] != sorted_scores[1:], True)
        f1 = np.where(distinct, f1, -1.0)
        k = int(np.argmax(f1))
        lower = sorted_scores[k + 1] if k + 1 < count else 0.0
        thresholds[j] = float((sorted_scores[k] + lower) / 2.0)
        best_f1[j] = f1[k]
    return thresholds.astype(np.float32), best_f1


def random_validation(seed: int, count: int, num_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to few levels (many ties, as low-precision logits give), rare and absent tags."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((count, num_tags)), rng.integers(1, 4))
    scores[:, : num_tags // 8] = 0.5  # constant columns: one tie group
    targets = (rng.random((count, num_tags)) < rng.choice([0.0, 0.01, 0.1, 0.5], num_tags)).astype(np.int64)
    targets[:, -3:] = 0  # tags without positives
    targets[0, -4] = 1  # a tag with a single positive
    return scores, targets


@pytest.mark.parametrize(("seed", "count", "num_tags", "block"), [
    (0, 200, 64, 4_000_000), (1, 37, 300, 4_000_000), (2, 150, 90, 1000), (3, 1, 16, 4_000_000), (4, 9, 40, 7),
])
def test_vectorised_metrics_equal_the_per_tag_code(monkeypatch, seed, count, num_tags, block):
    monkeypatch.setattr(tagger_metrics, "BLOCK_ELEMENTS", block)  # small blocks: the tags in several slices
    scores, targets = random_validation(seed, count, num_tags)
    reference_ap = np.array([reference_average_precision(scores[:, j], targets[:, j]) for j in range(num_tags)])
    ap = per_tag_average_precision(scores, targets)
    assert np.array_equal(np.isnan(ap), np.isnan(reference_ap)) and np.isnan(ap).sum() >= 3
    np.testing.assert_allclose(ap, reference_ap, rtol=1e-12, atol=1e-15)  # the same terms, summed in another order
    thresholds, f1 = best_thresholds(scores, targets, default=0.4)
    reference_thresholds, reference_f1 = reference_best_thresholds(scores, targets, default=0.4)
    assert np.array_equal(thresholds, reference_thresholds) and thresholds.dtype == np.float32
    assert np.array_equal(f1, reference_f1)
    metrics = compute_metrics(scores, targets, threshold=0.4)
    assert np.array_equal(metrics.thresholds, reference_thresholds)
    valid = targets.sum(axis=0) > 0
    assert metrics.map == pytest.approx(float(np.mean(reference_ap[valid])), rel=1e-12)
    assert metrics.tuned_macro_f1 == pytest.approx(float(reference_f1[valid].mean()), rel=1e-12)


def test_no_validation_rows_give_no_ap_and_default_thresholds():
    thresholds, f1 = best_thresholds(np.zeros((0, 3)), np.zeros((0, 3)), default=0.3)
    assert np.allclose(thresholds, 0.3) and not f1.any()
    assert np.isnan(per_tag_average_precision(np.zeros((0, 3)), np.zeros((0, 3)))).all()
