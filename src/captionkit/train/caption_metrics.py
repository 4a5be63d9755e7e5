"""Caption metrics for validation: BLEU-4, ROUGE-L, CIDEr-D and exact match, in plain Python.

Why our own: the reference implementations (pycocoevalcap) need Java for tokenisation
and pull in extra packages; validation during training only needs the formulas. These
follow the COCO caption evaluation code so the numbers are on the scale users know:

- BLEU-4: corpus-level (Papineni et al.), clipped n-gram precision for n=1..4, uniform
  weights, brevity penalty against the closest reference length.
- ROUGE-L: per caption LCS F-measure with beta=1.2 (max precision and recall over the
  references), averaged over the corpus.
- CIDEr-D: TF-IDF n-gram cosine similarity (n=1..4) with the document frequency taken
  over the corpus's references, clipped candidate weights, a Gaussian length penalty
  (sigma=6) and the factor 10, as ``pycocoevalcap``'s ``CiderScorer``. Papers usually
  print it times 100 (Florence-2-base: 133.0 means 1.330 here). Like the original, the
  length used by the penalty is the bigram count, and a one-image corpus scores 0
  because every n-gram then has the maximum document frequency.

Tokenisation: lower case, punctuation removed, split on white space (the PTB tokenizer
used by COCO does nearly the same for plain captions).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens without punctuation."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[index : index + n]) for index in range(len(tokens) - n + 1))


def _as_reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[reference] if isinstance(reference, str) else list(reference) for reference in references]


def _check(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference sets")
    refs = _as_reference_lists(references)
    if any(not group for group in refs):
        raise ValueError("every candidate needs at least one reference caption")
    return refs


def bleu4(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1]; each reference entry is a caption or a list of captions."""
    refs = _check(candidates, references)
    matches = [0] * 4
    totals = [0] * 4
    candidate_length = 0
    reference_length = 0
    for candidate, group in zip(candidates, refs, strict=True):
        tokens = tokenize(candidate)
        group_tokens = [tokenize(reference) for reference in group]
        candidate_length += len(tokens)
        # Closest reference length; ties go to the shorter one (as in COCO and NLTK).
        reference_length += min((abs(len(ref) - len(tokens)), len(ref)) for ref in group_tokens)[1]
        for n in range(1, 5):
            counts = _ngrams(tokens, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for ref in group_tokens:
                for gram, count in _ngrams(ref, n).items():
                    max_ref[gram] = max(max_ref[gram], count)
            matches[n - 1] += sum(min(count, max_ref[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(tokens) - n + 1, 0)
    if candidate_length == 0 or any(match == 0 for match in matches):
        return 0.0
    log_precision = sum(math.log(match / total) for match, total in zip(matches, totals, strict=True)) / 4
    brevity = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / candidate_length)
    return brevity * math.exp(log_precision)


def _lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for column, other in enumerate(second, start=1):
            current.append(previous[column - 1] + 1 if item == other else max(previous[column], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[str | Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (COCO's beta=1.2)."""
    refs = _check(candidates, references)
    if not candidates:
        return 0.0
    scores = []
    for candidate, group in zip(candidates, refs, strict=True):
        tokens = tokenize(candidate)
        precisions, recalls = [], []
        for reference in group:
            ref_tokens = tokenize(reference)
            lcs = _lcs_length(tokens, ref_tokens)
            precisions.append(lcs / len(tokens) if tokens else 0.0)
            recalls.append(lcs / len(ref_tokens) if ref_tokens else 0.0)
        precision, recall = max(precisions), max(recalls)
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return sum(scores) / len(scores)


def cider_d(
    candidates: Sequence[str], references: Sequence[str | Sequence[str]], sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D (mean over images, factor 10 as in pycocoevalcap)."""
    refs = _check(candidates, references)
    if not candidates:
        return 0.0

    def counts(text: str) -> Counter[tuple[str, ...]]:
        tokens = tokenize(text)
        total: Counter[tuple[str, ...]] = Counter()
        for n in range(1, 5):
            total.update(_ngrams(tokens, n))
        return total

    candidate_counts = [counts(candidate) for candidate in candidates]
    reference_counts = [[counts(reference) for reference in group] for group in refs]
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for group in reference_counts:
        document_frequency.update({gram for ref in group for gram in ref})
    log_corpus = math.log(float(len(candidates)))

    def vectorize(gram_counts: Counter[tuple[str, ...]]):
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(4)]
        norms = [0.0] * 4
        length = 0
        for gram, term_frequency in gram_counts.items():
            n = len(gram) - 1
            weight = float(term_frequency) * (log_corpus - math.log(max(1.0, document_frequency[gram])))
            vectors[n][gram] = weight
            norms[n] += weight**2
            if n == 1:
                length += term_frequency
        return vectors, [math.sqrt(norm) for norm in norms], length

    scores = []
    for candidate, group in zip(candidate_counts, reference_counts, strict=True):
        vec, norm, length = vectorize(candidate)
        total = [0.0] * 4
        for reference in group:
            ref_vec, ref_norm, ref_length = vectorize(reference)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(4):
                value = sum(min(weight, ref_vec[n].get(gram, 0.0)) * ref_vec[n].get(gram, 0.0)
                            for gram, weight in vec[n].items())
                if norm[n] != 0 and ref_norm[n] != 0:
                    value /= norm[n] * ref_norm[n]
                total[n] += value * penalty
        scores.append(sum(total) / 4 / len(group) * 10.0)
    return sum(scores) / len(scores)


def normalize_caption(text: str) -> str:
    """Collapse white space; exact match ignores only spacing at the ends and between words."""
    return " ".join(text.split())


def exact_match(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Share of candidates equal to one of their references (after :func:`normalize_caption`)."""
    refs = _check(candidates, references)
    if not candidates:
        return 0.0
    hits = sum(
        normalize_caption(candidate) in {normalize_caption(reference) for reference in group}
        for candidate, group in zip(candidates, refs, strict=True)
    )
    return hits / len(candidates)


def caption_metrics(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """All validation metrics at once, keyed as they are logged."""
    return {
        "bleu4": bleu4(candidates, references),
        "rouge_l": rouge_l(candidates, references),
        "cider": cider_d(candidates, references),
        "exact_match": exact_match(candidates, references),
    }
