"""Multi-label metrics for tagger validation: mAP, micro/macro F1, per-tag thresholds.

Pure numpy so they run anywhere and are easy to check by hand. Tags with no positive
example in the validation set have no defined AP or recall; they are left out of mAP
and macro F1 (and counted), which is what the published tagger numbers do.

Every tag is ranked in one array operation (a block of tags at a time, so memory stays
bounded), not in a Python loop per tag: with a Danbooru vocabulary of 5,000-10,000 tags
the loop cost more than the validation forward on a small set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Ranks computed at once: images × tags per block (a few arrays of this many 8-byte values).
BLOCK_ELEMENTS = 4_000_000


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one tag: sum over score thresholds of precision × recall gained (sklearn's definition).

    Tied scores form one threshold, so the result does not depend on the order of the
    data (low-precision logits tie often).
    """
    return float(per_tag_average_precision(np.asarray(scores).reshape(-1, 1), np.asarray(targets).reshape(-1, 1))[0])


@dataclass
class _Ranked:
    """One block of tags, a row per tag, each row sorted by descending score."""

    scores: np.ndarray  # [tags, N] sorted scores
    true_positives: np.ndarray  # [tags, N] positives at or above each rank
    positives: np.ndarray  # [tags, 1]
    last_of_tie: np.ndarray  # [tags, N] True where the next score differs (or at the end)


def _rank(scores: np.ndarray, targets: np.ndarray) -> _Ranked:
    """Rank a block given tag-major ([tags, N], each row contiguous: sorting rows is what is fast).

    The sort need not be stable: every result is read at the last score of a tie group, where
    the count of positives does not depend on the order inside the group.
    """
    order = np.argsort(-scores, axis=1)
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    hits = np.take_along_axis(targets, order, axis=1).astype(np.float64)
    true_positives = np.cumsum(hits, axis=1)
    last_of_tie = np.ones(scores.shape, dtype=bool)
    last_of_tie[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    return _Ranked(sorted_scores, true_positives, true_positives[:, -1:], last_of_tie)


def _blocks(scores: np.ndarray, targets: np.ndarray):
    """(tag slice, ranked block) over all tags, ``BLOCK_ELEMENTS`` values at a time."""
    count, num_tags = scores.shape
    if count == 0:
        return  # nothing ranked: no AP, default thresholds
    step = max(1, BLOCK_ELEMENTS // count)
    for start in range(0, num_tags, step):
        columns = slice(start, min(start + step, num_tags))
        yield columns, _rank(np.ascontiguousarray(scores[:, columns].T), np.ascontiguousarray(targets[:, columns].T))


def _average_precision(ranked: _Ranked) -> np.ndarray:
    """AP per tag: at each last score of a tie group, precision × the recall the group adds."""
    count = ranked.scores.shape[1]
    ranks = np.arange(1, count + 1, dtype=np.float64)
    ends = ranked.last_of_tie
    true_positives = np.where(ends, ranked.true_positives, 0.0)
    # positives at the previous group end: the running maximum of the ends' counts, shifted by one
    before = np.zeros_like(true_positives)
    before[:, 1:] = np.maximum.accumulate(true_positives, axis=1)[:, :-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = true_positives / ranks * ((true_positives - before) / ranked.positives)
        ap = np.where(ends, terms, 0.0).sum(axis=1)
    return np.where(ranked.positives[:, 0] > 0, ap, np.nan)


def per_tag_average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP per tag (NaN where a tag has no positives)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    result = np.full(scores.shape[1], np.nan)
    for columns, ranked in _blocks(scores, targets):
        result[columns] = _average_precision(ranked)
    return result


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def _thresholds(ranked: _Ranked, default: float) -> tuple[np.ndarray, np.ndarray]:
    """F1-optimal threshold and its F1 per tag (``default`` and 0 where a tag has no positives)."""
    num_tags, count = ranked.scores.shape
    tp = ranked.true_positives
    fp = np.arange(1, count + 1, dtype=np.float64) - tp
    fn = ranked.positives - tp
    # Only cut between distinct scores: equal scores cannot be separated.
    f1 = np.where(ranked.last_of_tie, _f1(tp, fp, fn), -1.0)
    k = np.argmax(f1, axis=1)
    rows = np.arange(num_tags)
    cut = ranked.scores[rows, k]
    lower = np.where(k + 1 < count, ranked.scores[rows, np.minimum(k + 1, count - 1)], 0.0)
    has_positive = ranked.positives[:, 0] > 0
    thresholds = np.where(has_positive, (cut + lower) / 2.0, default)
    return thresholds, np.where(has_positive, f1[rows, k], 0.0)


def best_thresholds(
    scores: np.ndarray, targets: np.ndarray, default: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tag F1-optimal thresholds and the F1 each reaches (default where no positives).

    Candidate thresholds are the observed scores; the chosen value is the midpoint
    between the cut score and the next lower one, so a threshold tuned on validation
    does not sit exactly on a training-set score.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    num_tags = scores.shape[1]
    thresholds = np.full(num_tags, default, dtype=np.float64)
    best_f1 = np.zeros(num_tags, dtype=np.float64)
    for columns, ranked in _blocks(scores, targets):
        thresholds[columns], best_f1[columns] = _thresholds(ranked, default)
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
    num_tags = scores.shape[1]
    ap = np.full(num_tags, np.nan)
    thresholds, tuned_f1 = np.full(num_tags, threshold, dtype=np.float64), np.zeros(num_tags)
    for columns, ranked in _blocks(scores, targets):  # one ranking serves both
        ap[columns] = _average_precision(ranked)
        thresholds[columns], tuned_f1[columns] = _thresholds(ranked, threshold)
    predicted = scores >= threshold
    tp = (predicted & (targets == 1)).sum(axis=0).astype(np.float64)
    fp = (predicted & (targets == 0)).sum(axis=0).astype(np.float64)
    fn = (~predicted & (targets == 1)).sum(axis=0).astype(np.float64)
    micro = float(_f1(tp.sum(), fp.sum(), fn.sum()))
    per_tag_f1 = _f1(tp, fp, fn)
    valid = has_positive
    return TaggerMetrics(
        map=float(np.nanmean(ap[valid])) if valid.any() else 0.0,
        micro_f1=micro,
        macro_f1=float(per_tag_f1[valid].mean()) if valid.any() else 0.0,
        tuned_macro_f1=float(tuned_f1[valid].mean()) if valid.any() else 0.0,
        tags_without_positives=int((~valid).sum()),
        thresholds=thresholds.astype(np.float32),
    )
