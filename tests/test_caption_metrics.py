"""BLEU and CIDEr-D on hand-worked examples and against the reference COCO evaluator's numbers."""

import json
import math
import os

import pytest

from seqvis.evaluation.caption_metrics import bleu, cider_d, tokenize


def test_tokenize():
    assert tokenize("A red Sneaker, to the left.") == ["a", "red", "sneaker", "to", "the", "left"]


def test_bleu_worked_example():
    # Unigrams 6/6, bigrams 5/5, trigrams 3/4, 4-grams 2/3; lengths equal so BP = 1.
    cands = {1: ["the cat sat on the mat"]}
    refs = {1: ["the cat is on the mat", "a cat sat on the mat"]}
    b = bleu(cands, refs)
    assert b[0] == pytest.approx(1.0, abs=1e-9)
    assert b[1] == pytest.approx(1.0, abs=1e-9)
    assert b[2] == pytest.approx(0.75 ** (1 / 3), rel=1e-6)
    assert b[3] == pytest.approx((0.75 * 2 / 3) ** 0.25, rel=1e-6)


def test_bleu_brevity_penalty_and_clipping():
    b = bleu({1: ["the cat"]}, {1: ["the cat sat on the mat"]}, max_n=1)
    assert b[0] == pytest.approx(math.exp(1 - 6 / 2), rel=1e-6)
    b = bleu({1: ["the the the"]}, {1: ["the cat"]}, max_n=1)
    assert b[0] == pytest.approx(1 / 3, rel=1e-6)


def test_bleu_is_corpus_level_not_mean_of_sentences():
    cands = {1: ["a b"], 2: ["c d e f"]}
    refs = {1: ["a b"], 2: ["c x e y"]}
    # Pooled unigrams: (2 + 2) / (2 + 4) = 2/3; a mean of sentence scores would give 0.75.
    assert bleu(cands, refs, max_n=1)[0] == pytest.approx(2 / 3, rel=1e-6)


def test_bleu_closest_reference_length():
    # Candidate of 3 words, references of 2 and 5 words: the closest (2) is used, so no penalty.
    b = bleu({1: ["a b c"]}, {1: ["a b", "a b c d e"]}, max_n=1)
    assert b[0] == pytest.approx(1.0, abs=1e-9)


def test_cider_d_worked_example():
    cands = {"A": ["a red bag"], "B": ["a blue bag"]}
    refs = {"A": ["a red bag"], "B": ["a blue shoe"]}
    score, per = cider_d(cands, refs)
    # A: cosine 1 for n = 1..3, no 4-grams -> 10 * 3/4. B: 1/2 for n = 1, 2, 0 after -> 10 * 1/4.
    assert per["A"] == pytest.approx(7.5, rel=1e-6)
    assert per["B"] == pytest.approx(2.5, rel=1e-6)
    assert score == pytest.approx(5.0, rel=1e-6)


def test_against_the_reference_coco_evaluator():
    # Numbers computed once by pycocoevalcap (the COCO caption evaluation's Bleu(4) and Cider
    # scorers) on hand-made captions: see tests/data/make_caption_metrics_fixture.py. The set
    # exercises clipping, brevity, the closest reference length, IDF and the length penalty.
    with open(os.path.join(os.path.dirname(__file__), "data", "caption_metrics_coco.json")) as f:
        ref = json.load(f)
    cands = {k: [v] for k, v in ref["candidates"].items()}
    b = bleu(cands, ref["references"])
    # pycocoevalcap adds 1e-15 / 1e-9 to the n-gram precisions' numerator / denominator.
    assert b == pytest.approx(ref["bleu"], rel=1e-8)
    score, per = cider_d(cands, ref["references"])
    assert score == pytest.approx(ref["cider_d"], rel=1e-9)
    assert per == pytest.approx(ref["cider_d_per_image"], rel=1e-9)


def test_errors():
    with pytest.raises(ValueError, match="no references"):
        bleu({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError, match="exactly one candidate"):
        cider_d({1: ["a", "b"]}, {1: ["a"]})
