"""Depth ablation: the base model at several depths, at several training budgets.

    python -m experiments.sweep --config=configs/vit.py --sweep=configs/sweeps/depth.py --workdir=DIR
    python -m experiments.sweep --config=configs/vit.py --sweep=configs/sweeps/depth.py:short --workdir=DIR

Only ``model.depth`` changes; width, MLP, heads and patch size are those of the base config
(the default job: width 128, MLP 256, 4 heads, 7x7 patches). ``short`` is the CPU version
(fewer depths, shorter budgets).
"""

DEPTHS = {"full": (1, 2, 4, 6, 8, 12), "short": (1, 2, 4, 6, 8)}
# (epochs, warmup steps): each budget is its own run with its own cosine schedule.
BUDGETS = {"full": ((1.0, 100), (3.0, 200), (7.0, 200)), "short": ((0.5, 50), (2.0, 100))}


def get_sweep(h, arg=None):
    arg = arg or "full"
    if arg not in DEPTHS:
        raise ValueError(f"unknown argument {arg!r}; use depth.py (full) or depth.py:short")
    budgets = h.zip(h.sweep("num_epochs", [e for e, _ in BUDGETS[arg]]),
                    h.sweep("schedule.warmup_steps", [w for _, w in BUDGETS[arg]]))
    return h.product(h.sweep("model.depth", DEPTHS[arg]), budgets)
