"""Writes caption_metrics_coco.json: BLEU-1..4 and CIDEr-D of a small hand-made set of captions,
computed ONCE by the reference COCO caption evaluator (pycocoevalcap), never by seqvis.

Run in a separate environment; pycocoevalcap is not a dependency of seqvis:

    python -m venv /tmp/cocoeval-venv && /tmp/cocoeval-venv/bin/pip install pycocoevalcap==1.2
    /tmp/cocoeval-venv/bin/python tests/data/make_caption_metrics_fixture.py

The captions are already lower-case words without punctuation, because the evaluator's own
PTB tokenizer needs Java; its Bleu and Cider (CIDEr-D) scorers split on spaces.
tests/test_caption_metrics.py compares seqvis.evaluation.caption_metrics with these numbers.
"""

import json
import os

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

# Candidates and references chosen to exercise clipping (repeated words), brevity (short
# candidates), the closest reference length, images without any 3- or 4-gram match, rare and
# frequent words (CIDEr's IDF) and the length penalty (long candidates).
CANDIDATES = {
    "1": "a red sneaker on the left",
    "2": "the the the bag",
    "3": "an ankle boot",
    "4": "a blue shirt next to a blue shirt next to a bag",
    "5": "a dress",
    "6": "a grey pullover to the right of a white sandal",
    "7": "two bags",
    "8": "a black coat above a red dress and a trouser",
}
REFERENCES = {
    "1": ["a red sneaker on the left", "a red shoe at the left side", "on the left there is a red sneaker"],
    "2": ["a bag", "the bag in the middle", "one brown bag"],
    "3": ["an orange ankle boot on the right", "a boot", "an ankle boot near the top"],
    "4": ["a blue shirt next to a bag", "a shirt and a bag", "a blue shirt beside a yellow bag",
          "two items a shirt and a bag"],
    "5": ["a long green dress in the centre", "a green dress"],
    "6": ["a grey pullover right of a white sandal", "a pullover and a sandal", "a white sandal left of a grey pullover"],
    "7": ["a bag and a bag", "two brown bags", "two bags side by side", "a pair of bags"],
    "8": ["a black coat above a red dress", "a coat a dress and trousers", "a red dress below a black coat"],
}


def main() -> None:
    gts = {k: list(v) for k, v in REFERENCES.items()}
    res = {k: [v] for k, v in CANDIDATES.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    out = {
        "made_by": "tests/data/make_caption_metrics_fixture.py with pycocoevalcap 1.2 (Bleu(4), Cider); "
                   "not seqvis",
        "candidates": CANDIDATES,
        "references": REFERENCES,
        "bleu": [float(b) for b in bleu],
        "cider_d": float(cider),
        "cider_d_per_image": {k: float(s) for k, s in zip(gts, per_image)},
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caption_metrics_coco.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps({"bleu": out["bleu"], "cider_d": out["cider_d"]}))


if __name__ == "__main__":
    main()
