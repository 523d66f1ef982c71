"""Caption metrics now live in :mod:`seqvis.evaluation.caption_metrics` (the trainer reports them); kept here for old imports."""

from seqvis.evaluation.caption_metrics import bleu, cider_d, ngrams, tokenize  # noqa: F401 - re-exported
