"""Caption metrics against values computed by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import math

import pytest

from captionkit.train.caption_metrics import (
    bleu4,
    caption_metrics,
    cider_d,
    exact_match,
    rouge_l,
    tokenize,
)


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red, CIRCLE.") == ["a", "red", "circle"]


def test_bleu4_hand_computed():
    # precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.537285, abs=1e-6)


def test_bleu4_brevity_penalty_and_zero_and_identity():
    # "the cat sat on" vs "the cat sat on the mat": all precisions 1, BP = exp(1 - 6/4).
    assert bleu4(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(1 - 6 / 4))
    assert bleu4(["a b c"], ["a b c"]) == 0.0  # no 4-grams at all: BLEU-4 is 0 by definition
    assert bleu4(["a red circle and a blue square"], [["x", "a red circle and a blue square"]]) == 1.0


def test_rouge_l_hand_computed():
    # LCS 3, P = 1, R = 0.5, F = (1 + 1.44) * 0.5 / (0.5 + 1.44) = 0.628866
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(1.22 / 1.94)
    assert rouge_l(["a b"], ["c d"]) == 0.0
    assert rouge_l(["x y", "a b"], ["x y", "a c"]) == pytest.approx((1 + 0.5) / 2)


def test_cider_d_hand_computed():
    # Corpus of 2 images; idf weight log(2) for every n-gram except "a" (df 2, weight 0).
    # Image 1 identical: n=1..3 similarity 1, no 4-grams -> mean 0.75 -> x10 = 7.5.
    # Image 2 "a blue square" vs "a green square": unigram sim L^2 / (2 L^2) = 0.5,
    # others 0, equal bigram lengths -> mean 0.125 -> x10 = 1.25. Corpus mean 4.375.
    score = cider_d(["a red circle", "a blue square"], ["a red circle", "a green square"])
    assert score == pytest.approx(4.375)


def test_cider_d_one_image_corpus_is_zero_like_coco():
    assert cider_d(["a red circle"], ["a red circle"]) == 0.0


def test_exact_match_and_bundle():
    assert exact_match(["a  red circle ", "a blue"], ["a red circle", ["x", "a green"]]) == 0.5
    metrics = caption_metrics(["a red circle"] * 2, ["a red circle", "a blue square"])
    assert set(metrics) == {"bleu4", "rouge_l", "cider", "exact_match"}
    assert metrics["exact_match"] == 0.5


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 candidates but 1"):
        bleu4(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l(["a"], [[]])
