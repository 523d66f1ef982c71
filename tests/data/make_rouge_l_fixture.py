"""Writes rouge_l_coco.json: ROUGE-L of 20 seeded random caption sets, computed ONCE by the
reference COCO caption evaluator (pycocoevalcap's Rouge), never by seqvis.

Run in a separate environment; pycocoevalcap is not a dependency of seqvis:

    python3 -m venv /tmp/cocoeval && /tmp/cocoeval/bin/pip install pycocoevalcap==1.2
    /tmp/cocoeval/bin/python tests/data/make_rouge_l_fixture.py

The captions are lower-case letters and single spaces, so the evaluator's ``split(" ")`` and
seqvis' tokenizer see the same words. Words come from a vocabulary of 8, so that captions share
words in varying orders; lengths 1..12 words, 1..5 references per image. Three images are set
by hand: a candidate equal to one reference, a candidate with no word in any reference, and a
candidate of one repeated word. tests/test_caption_metrics.py compares
seqvis.evaluation.caption_metrics.rouge_l with these numbers.
"""

import json
import os
import random

from pycocoevalcap.rouge.rouge import Rouge

VOCAB = ["a", "red", "bag", "shoe", "left", "of", "the", "dress"]


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 12)))


def main() -> None:
    rng = random.Random(27)
    res, gts = {}, {}
    for k in range(17):
        res[str(k)] = [caption(rng)]
        gts[str(k)] = [caption(rng) for _ in range(rng.randint(1, 5))]
    gts["17"] = [caption(rng), "a red bag left of the dress", caption(rng)]
    res["17"] = ["a red bag left of the dress"]
    gts["18"] = [caption(rng) for _ in range(3)]
    res["18"] = ["trouser coat sandal"]
    gts["19"] = [caption(rng) for _ in range(4)]
    res["19"] = ["bag bag bag bag"]
    score, per_image = Rouge().compute_score(gts, res)
    out = {
        "made_by": "tests/data/make_rouge_l_fixture.py with pycocoevalcap 1.2 (Rouge); not seqvis",
        "candidates": {k: v[0] for k, v in res.items()},
        "references": gts,
        "rouge_l": float(score),
        "rouge_l_per_image": {k: float(s) for k, s in zip(gts, per_image)},
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rouge_l_coco.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps({"rouge_l": out["rouge_l"], "per_image": out["rouge_l_per_image"]}))


if __name__ == "__main__":
    main()
