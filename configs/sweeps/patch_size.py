"""Patch-size ablation: the base model with several patch sizes, at several training budgets.

    python -m experiments.sweep --config=configs/vit.py --sweep=configs/sweeps/patch_size.py[:short] --workdir=DIR

Only ``model.patch_size`` changes, on the 6-block base (``ABLATION_DEPTH``) (tokens = (28/p)^2 + 1 on 28x28 images, so a smaller
patch is a longer sequence and more compute for the same parameters, apart from the
patch embedding and position embeddings). Patch sizes divide 28. ``short`` is the CPU
version (no 2x2 patches, shorter budgets).
"""

PATCHES = {"full": (14, 7, 4, 2), "short": (28, 14, 7, 4)}
BUDGETS = {"full": ((1.0, 100), (3.0, 200), (7.0, 200)), "short": ((0.5, 50), (2.0, 100))}


# The committed studies ran on the 6-block base (the default job's depth until 2026-12-02); pinned so the
# commands in their reports still reproduce them now that the default job has 2 blocks.
ABLATION_DEPTH = 6


def get_sweep(h, arg=None):
    arg = arg or "full"
    if arg not in PATCHES:
        raise ValueError(f"unknown argument {arg!r}; use patch_size.py (full) or patch_size.py:short")
    budgets = h.zip(h.sweep("num_epochs", [e for e, _ in BUDGETS[arg]]),
                    h.sweep("schedule.warmup_steps", [w for _, w in BUDGETS[arg]]))
    return h.product(h.fixed("model.depth", ABLATION_DEPTH), h.sweep("model.patch_size", PATCHES[arg]), budgets)
