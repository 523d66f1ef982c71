"""Width ablation: the base model at several widths, at several training budgets.

    python -m experiments.sweep --config=configs/vit.py --sweep=configs/sweeps/width.py[:short] --workdir=DIR

The width D changes together with the MLP width (2·D, the ratio of the default job) at a
fixed number of heads (4), so every block keeps its shape; depth is 6 (``ABLATION_DEPTH``, the
base of the committed study) and the patch size that of the base config. ``short`` is the CPU version (fewer widths, shorter budgets).
"""

WIDTHS = {"full": (32, 64, 128, 192, 256, 384), "short": (32, 64, 128, 192)}
MLP_RATIO = 2
HEADS = 4
BUDGETS = {"full": ((1.0, 100), (3.0, 200), (7.0, 200)), "short": ((0.5, 50), (2.0, 100))}


# The committed studies ran on the 6-block base (the default job's depth until 2026-12-02); pinned so the
# commands in their reports still reproduce them now that the default job has 2 blocks.
ABLATION_DEPTH = 6


def get_sweep(h, arg=None):
    arg = arg or "full"
    if arg not in WIDTHS:
        raise ValueError(f"unknown argument {arg!r}; use width.py (full) or width.py:short")
    widths = WIDTHS[arg]
    model = h.zip(h.sweep("model.width", widths), h.sweep("model.mlp_dim", [MLP_RATIO * w for w in widths]),
                  h.sweep("model.num_heads", [HEADS] * len(widths)))
    budgets = h.zip(h.sweep("num_epochs", [e for e, _ in BUDGETS[arg]]),
                    h.sweep("schedule.warmup_steps", [w for _, w in BUDGETS[arg]]))
    return h.product(h.fixed("model.depth", ABLATION_DEPTH), model, budgets)
