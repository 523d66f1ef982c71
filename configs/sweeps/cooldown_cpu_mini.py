"""Budgets from one run: three ViTs of scaling_cpu_mini, each at 120, 480 and 1920 steps of 128 images
(Fashion-MNIST), with an rsqrt schedule and a linear cooldown over the last 20% of each budget.

    python -m experiments.sweep --config=configs/vit.py --sweep=configs/sweeps/cooldown_cpu_mini.py[:ARG] \
        --workdir=DIR

ARG ``branches`` (the default): per model one run of 1920 steps; the 120- and 480-step budgets branch their
cooldowns off its steps 96 and 384 (Zhai et al. 2022), so they train 24 and 96 steps each. ARG ``scratch``:
the same nine points, each trained from zero. The two give the same numbers (the schedules agree before each
branch step); ``python -m experiments.cooldown_saving`` runs both and reports the wall time saved.

The schedule does not depend on the budget before its cooldown: rsqrt (timescale 100) after a warmup of 12
steps shared by all budgets. (scaling_cpu_mini's cosine budgets, with a warmup of a tenth of each, cannot
be branched.)
"""

STEPS = (120, 480, 1920)
COOLDOWN_FRACTION = 0.2
# name: (width, depth, mlp_dim, heads, patch), as in scaling_cpu_mini
VITS = {
    "w32_d1": (32, 1, 128, 1, 7),
    "w64_d2": (64, 2, 256, 2, 7),
    "w96_d4": (96, 4, 384, 3, 7),
}
ARGS = ("branches", "scratch")


def get_sweep(h, arg=None):
    arg = arg or "branches"
    if arg not in ARGS:
        raise ValueError(f"cooldown_cpu_mini takes one of {ARGS}, got {arg!r}")
    schedule = h.product(h.fixed("schedule.name", "rsqrt"), h.fixed("schedule.timescale", 100),
                         h.fixed("schedule.warmup_steps", 12))
    if arg == "branches":
        budgets = h.cooldowns(STEPS, fraction=COOLDOWN_FRACTION)
    else:
        budgets = h.product(h.sweep("total_steps", sorted(STEPS, reverse=True)),
                            h.fixed("schedule.cooldown_fraction", COOLDOWN_FRACTION))
    points = []
    for width, depth, mlp, heads, patch in VITS.values():
        model = h.product(h.fixed("model.width", width), h.fixed("model.depth", depth), h.fixed("model.mlp_dim", mlp),
                          h.fixed("model.num_heads", heads), h.fixed("model.patch_size", patch))
        points.append(h.product(model, schedule, budgets))
    return h.chain(*points)
