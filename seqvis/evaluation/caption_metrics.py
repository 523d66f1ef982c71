"""Caption metrics as the COCO caption evaluation computes them: corpus BLEU-1..4, CIDEr-D and ROUGE-L.

Inputs are dicts ``image_id -> [caption]`` (one candidate) and ``image_id -> [ref, ...]``.
Captions are tokenised by lower-casing and dropping punctuation (the PTB tokenizer does
more, but nothing that matters for the captions seqvis generates).

BLEU-N (Papineni et al. 2002), corpus level::

    p_n  = Σ_images Σ_g min(c_cand(g), max_r c_r(g)) / Σ_images Σ_g c_cand(g)   (n-grams g)
    BP   = 1 if c >= r else exp(1 - r/c)     c = Σ candidate lengths,
                                             r = Σ closest reference lengths (ties -> shorter)
    BLEU-N = BP · (Π_{n<=N} p_n)^(1/N)

CIDEr-D (Vedantam et al. 2015), with document frequencies over the reference sets::

    g_n(s)[w] = tf_s(w) · log(|I| / max(1, df(w)))        TF-IDF of the n-grams w of s
    CIDEr-D_n(c, S) = 10/|S| Σ_{s∈S} e^{-(l(c)-l(s))²/(2σ²)} · <min(g_n(c), g_n(s)), g_n(s)> / (|g_n(c)| |g_n(s)|)
    CIDEr-D(c, S) = mean over n = 1..4;   σ = 6

(l is the length as the reference implementation measures it: the number of bigrams.)

ROUGE-L (Lin 2004), per image with the longest common subsequence (LCS) of words, then averaged::

    P = max_{s∈S} LCS(c, s) / l(c)      R = max_{s∈S} LCS(c, s) / l(s)      (maxima taken separately)
    ROUGE-L(c, S) = (1 + β²) P R / (R + β² P),  0 if P or R is 0;   β = 1.2

(l is the number of words here.)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

from seqvis.data.tokenizer import split_words as tokenize  # the captioning vocabulary splits words the same way


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(cands: Mapping, refs: Mapping) -> list:
    missing = set(cands) - set(refs)
    if missing:
        raise ValueError(f"{len(missing)} candidate image ids have no references (e.g. {sorted(missing)[:3]}).")
    for k, v in cands.items():
        if len(v) != 1:
            raise ValueError(f"image {k!r}: expected exactly one candidate caption, got {len(v)}.")
    return sorted(cands)


def bleu(cands: Mapping[object, Sequence[str]], refs: Mapping[object, Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n, like pycocoevalcap's Bleu (option 'closest')."""
    ids = _check(cands, refs)
    matched = [0] * max_n
    total = [0] * max_n
    cand_len = ref_len = 0
    for i in ids:
        c = tokenize(cands[i][0])
        rs = [tokenize(r) for r in refs[i]]
        cand_len += len(c)
        ref_len += min((len(r) for r in rs), key=lambda L: (abs(L - len(c)), L))
        for n in range(1, max_n + 1):
            cc = ngrams(c, n)
            max_ref: Counter = Counter()
            for r in rs:
                for g, k in ngrams(r, n).items():
                    max_ref[g] = max(max_ref[g], k)
            matched[n - 1] += sum(min(k, max_ref[g]) for g, k in cc.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    tiny, small = 1e-15, 1e-9  # the reference implementation's smoothing constants
    ratio = (cand_len + tiny) / (ref_len + small)
    bp = 1.0 if ratio >= 1.0 else math.exp(1.0 - 1.0 / ratio)
    scores, prod = [], 1.0
    for n in range(max_n):
        prod *= (matched[n] + tiny) / (total[n] + small)
        scores.append(bp * prod ** (1.0 / (n + 1)))
    return scores


def _tfidf(words: Sequence[str], df: Counter, log_n: float, max_n: int):
    vecs, norms = [], []
    for n in range(1, max_n + 1):
        v = {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in ngrams(words, n).items()}
        vecs.append(v)
        norms.append(math.sqrt(sum(x * x for x in v.values())))
    return vecs, norms, max(len(words) - 1, 0)


def cider_d(cands: Mapping[object, Sequence[str]], refs: Mapping[object, Sequence[str]],
            max_n: int = 4, sigma: float = 6.0) -> tuple[float, dict]:
    """Corpus CIDEr-D and per-image scores, like pycocoevalcap's CiderD (df from the references)."""
    ids = _check(cands, refs)
    toks_refs = {i: [tokenize(r) for r in refs[i]] for i in ids}
    df: Counter = Counter()
    for i in ids:
        seen = set()
        for r in toks_refs[i]:
            for n in range(1, max_n + 1):
                seen.update(ngrams(r, n))
        df.update(seen)
    log_n = math.log(float(len(ids)))
    per_image = {}
    for i in ids:
        vc, nc, lc = _tfidf(tokenize(cands[i][0]), df, log_n, max_n)
        score = 0.0
        for r in toks_refs[i]:
            vr, nr, lr = _tfidf(r, df, log_n, max_n)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            sims = []
            for n in range(max_n):
                dot = sum(min(x, vr[n][g]) * vr[n][g] for g, x in vc[n].items() if g in vr[n])
                sims.append(dot / (nc[n] * nr[n]) * penalty if nc[n] and nr[n] else 0.0)
            score += sum(sims) / max_n
        per_image[i] = 10.0 * score / len(toks_refs[i])
    return (sum(per_image.values()) / len(per_image) if per_image else 0.0), per_image


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word sequences (O(len(a)·len(b)) dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)  # row[j] = LCS(a[:i], b[:j]) for the current i
    for x in a:
        diag = 0  # LCS(a[:i-1], b[:j-1])
        for j, y in enumerate(b, start=1):
            up = row[j]
            row[j] = diag + 1 if x == y else max(up, row[j - 1])
            diag = up
    return row[-1]


def rouge_l(cands: Mapping[object, Sequence[str]], refs: Mapping[object, Sequence[str]],
            beta: float = 1.2) -> tuple[float, dict]:
    """Mean ROUGE-L over the images and per-image scores, like pycocoevalcap's Rouge (β = 1.2).

    For each image, the LCS precision ``LCS / len(candidate)`` and recall ``LCS / len(reference)`` are
    computed against every reference; the largest precision and the largest recall (possibly from
    different references) give ``F = (1 + β²) P R / (R + β² P)``, 0 when either is 0. An empty candidate
    or reference counts as precision / recall 0.
    """
    ids = _check(cands, refs)
    per_image = {}
    for i in ids:
        c = tokenize(cands[i][0])
        rs = [tokenize(r) for r in refs[i]]
        if not rs:
            raise ValueError(f"image {i!r}: no reference captions.")
        prec = rec = 0.0
        for r in rs:
            common = lcs_length(c, r)
            if common:
                prec = max(prec, common / len(c))
                rec = max(rec, common / len(r))
        per_image[i] = ((1 + beta**2) * prec * rec / (rec + beta**2 * prec)) if prec and rec else 0.0
    return (sum(per_image.values()) / len(per_image) if per_image else 0.0), per_image
