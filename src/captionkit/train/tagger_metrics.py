"""Multi-label metrics for tagger validation: mAP, micro/macro F1, per-tag thresholds.

Pure numpy so they run anywhere and are easy to check by hand. Tags with no positive
example in the validation set have no defined AP or recall; they are left out of mAP
and macro F1 (and counted), which is what the published tagger numbers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one tag: sum over score thresholds of precision × recall gained (sklearn's definition).

    Tied scores form one threshold, so the result does not depend on the order of the
    data (low-precision logits tie often).
    """
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


def per_tag_average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP per tag (NaN where a tag has no positives)."""
    return np.array([average_precision(scores[:, j], targets[:, j]) for j in range(scores.shape[1])])


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def best_thresholds(
    scores: np.ndarray, targets: np.ndarray, default: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tag F1-optimal thresholds and the F1 each reaches (default where no positives).

    Candidate thresholds are the observed scores; the chosen value is the midpoint
    between the cut score and the next lower one, so a threshold tuned on validation
    does not sit exactly on a training-set score.
    """
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
        f1 = _f1(tp, fp, fn)
        # Only cut between distinct scores: equal scores cannot be separated.
        distinct = np.append(sorted_scores[:-1] != sorted_scores[1:], True)
        f1 = np.where(distinct, f1, -1.0)
        k = int(np.argmax(f1))
        lower = sorted_scores[k + 1] if k + 1 < count else 0.0
        thresholds[j] = float((sorted_scores[k] + lower) / 2.0)
        best_f1[j] = f1[k]
    return thresholds.astype(np.float32), best_f1


@dataclass
class TaggerMetrics:
    """One validation pass. ``tuned_macro_f1`` uses the per-tag thresholds tuned on the same set."""

    map: float
    micro_f1: float
    macro_f1: float
    tuned_macro_f1: float
    tags_without_positives: int
    thresholds: np.ndarray

    def as_dict(self) -> dict[str, float]:
        return {
            "map": self.map,
            "micro_f1": self.micro_f1,
            "macro_f1": self.macro_f1,
            "tuned_macro_f1": self.tuned_macro_f1,
            "tags_without_positives": float(self.tags_without_positives),
        }


def compute_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> TaggerMetrics:
    """mAP, micro/macro F1 at ``threshold`` and per-tag F1-optimal thresholds."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = (np.asarray(targets) > 0.5).astype(np.int64)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {scores.shape} and targets {targets.shape} must be the same [N, tags] shape"
        )
    has_positive = targets.sum(axis=0) > 0
    ap = per_tag_average_precision(scores, targets)
    predicted = scores >= threshold
    tp = (predicted & (targets == 1)).sum(axis=0).astype(np.float64)
    fp = (predicted & (targets == 0)).sum(axis=0).astype(np.float64)
    fn = (~predicted & (targets == 1)).sum(axis=0).astype(np.float64)
    micro = float(_f1(tp.sum(), fp.sum(), fn.sum()))
    per_tag_f1 = _f1(tp, fp, fn)
    thresholds, tuned_f1 = best_thresholds(scores, targets, default=threshold)
    valid = has_positive
    return TaggerMetrics(
        map=float(np.nanmean(ap[valid])) if valid.any() else 0.0,
        micro_f1=micro,
        macro_f1=float(per_tag_f1[valid].mean()) if valid.any() else 0.0,
        tuned_macro_f1=float(tuned_f1[valid].mean()) if valid.any() else 0.0,
        tags_without_positives=int((~valid).sum()),
        thresholds=thresholds,
    )
