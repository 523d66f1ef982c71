"""BLEU, CIDEr-D and ROUGE-L on hand-worked examples and against the reference COCO evaluator's numbers."""

import itertools
import json
import math
import os
import random

import pytest

from seqvis.evaluation.caption_metrics import bleu, cider_d, lcs_length, rouge_l, tokenize


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


def _brute_force_lcs(a, b):
    # The longest subsequence of a (tried longest first) that is also a subsequence of b.
    def is_subsequence(sub, seq):
        it = iter(seq)
        return all(x in it for x in sub)

    for k in range(len(a), 0, -1):
        if any(is_subsequence(sub, b) for sub in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_length_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == lcs_length(b, a) == _brute_force_lcs(a, b), (a, b)


def test_rouge_l_worked_example():
    # LCS "red bag left" = 3 of 6 candidate and 5 reference words: P = 1/2, R = 3/5.
    # F = 2.44 * 0.3 / (0.6 + 1.44 * 0.5) = 0.732 / 1.32 = 61/110.
    cands, refs = {1: ["a red bag on the left"]}, {1: ["the red bag is left"]}
    assert lcs_length(tokenize(cands[1][0]), tokenize(refs[1][0])) == 3
    score, per = rouge_l(cands, refs)
    assert per[1] == pytest.approx(61 / 110, rel=1e-12) and score == per[1]
    # beta = 1 is the harmonic mean of P and R: 2 * 0.3 / 1.1 = 6/11.
    assert rouge_l(cands, refs, beta=1.0)[0] == pytest.approx(6 / 11, rel=1e-12)
    # Repeated words match once each: LCS("the the the", "the cat the") = 2, P = R = 2/3, so F = 2/3.
    assert rouge_l({1: ["the the the"]}, {1: ["the cat the"]})[0] == pytest.approx(2 / 3, rel=1e-12)


def test_rouge_l_perfect_match_no_overlap_and_tokenisation():
    assert rouge_l({1: ["A red bag."]}, {1: ["a red bag", "a shoe"]})[0] == pytest.approx(1.0, abs=1e-12)
    assert rouge_l({1: ["a red bag"]}, {1: ["two blue shoes", "one coat"]})[0] == 0.0
    assert rouge_l({1: [""]}, {1: ["a red bag"]})[0] == 0.0  # an empty candidate scores 0
    # The corpus score is the mean over images: (1 + 0) / 2.
    score, per = rouge_l({"x": ["a b"], "y": ["c"]}, {"x": ["a b"], "y": ["d"]})
    assert per == {"x": 1.0, "y": 0.0} and score == 0.5


def test_rouge_l_takes_max_precision_and_max_recall_separately():
    # "a b": LCS 2, P = 2/4, R = 2/2.  "a b c d e f g h": LCS 4, P = 4/4, R = 4/8.
    # No single reference has F = 1, but max P = max R = 1, so F = 1.
    score, _ = rouge_l({1: ["a b c d"]}, {1: ["a b", "a b c d e f g h"]})
    assert score == pytest.approx(1.0, abs=1e-12)
    # "a b": P = 1/2, R = 1.  "a b c x x x": LCS 3, P = 3/4, R = 1/2.  Max P = 3/4 (second),
    # max R = 1 (first): F = 2.44 * 0.75 / (1 + 1.44 * 0.75) = 1.83 / 2.08 = 183/208.
    score, _ = rouge_l({1: ["a b c d"]}, {1: ["a b", "a b c x x x"]})
    assert score == pytest.approx(183 / 208, rel=1e-12)


def test_rouge_l_against_the_reference_coco_evaluator():
    # Made once by pycocoevalcap 1.2's Rouge on 20 seeded random caption sets (1..12 words from a
    # vocabulary of 8, 1..5 references): see tests/data/make_rouge_l_fixture.py.
    with open(os.path.join(os.path.dirname(__file__), "data", "rouge_l_coco.json")) as f:
        ref = json.load(f)
    # The evaluator splits on " "; the fixture's words are such that seqvis' tokenizer agrees.
    for text in list(ref["candidates"].values()) + [r for rs in ref["references"].values() for r in rs]:
        assert tokenize(text) == text.split(" ")
    score, per = rouge_l({k: [v] for k, v in ref["candidates"].items()}, ref["references"])
    # Same operations in the same order per image; the corpus mean may differ by summation order.
    assert per == pytest.approx(ref["rouge_l_per_image"], abs=1e-12)
    assert score == pytest.approx(ref["rouge_l"], abs=1e-12)
    assert min(per.values()) == 0.0 and max(per.values()) == 1.0


def test_rouge_l_errors():
    with pytest.raises(ValueError, match="no references"):
        rouge_l({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError, match="exactly one candidate"):
        rouge_l({1: ["a", "b"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="no reference captions"):
        rouge_l({1: ["a"]}, {1: []})
