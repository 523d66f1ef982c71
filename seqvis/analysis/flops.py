"""FLOP counting now lives in :mod:`seqvis.evaluation.flops` (the trainer reports it); kept here for old imports."""

from seqvis.evaluation.flops import (  # noqa: F401 - re-exported
    TRAIN_FLOPS_PER_FORWARD, forward_flops_per_example, training_flops, vit_flops_breakdown, vit_forward_flops)
