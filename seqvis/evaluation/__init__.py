"""Evaluation: measures that training itself reports, below ``train`` in the house.

FLOP counts (:mod:`.flops`), caption metrics (:mod:`.caption_metrics`), caption grounding
(:mod:`.grounding`) and the few-shot linear probe (:mod:`.fewshot`). These import only
``models``, ``data`` and ``seqvis.errors``; ``train`` and ``analysis`` use them, never the other
way round.
"""
