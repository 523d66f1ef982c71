"""The CPU scaling study measured the way the scaling papers measure: budgets from cooldown branches,
upstream error and 10-shot linear transfer (Fashion-MNIST pre-training; transfer to MNIST and to
Fashion-MNIST itself). Under an hour on a 2-core CPU.

    flock /tmp/seqvis_cpu.lock python -m experiments.sweep --config=configs/vit.py:fewshot=mnist+fashion_mnist \
        --sweep=configs/sweeps/fewshot_cpu.py --workdir=DIR
    python -m experiments.fewshot_study --results=DIR/results.csv --out=DIR/report

Four ViTs (15k to 1.2M parameters, 7x7 patches), each trained once for 1920 steps of 128 images
(4 epochs) with an rsqrt schedule (warmup 12, timescale 100) and a linear cooldown over the last 20%
of the budget. The budgets of 120, 240, 480 and 960 steps branch their cooldowns off that run
(Zhai et al. 2022, Sec. 3.2), so one run per model gives five budgets. At the end of every budget the
frozen pre-logits features are probed by the closed-form least-squares classifier
(seqvis.evaluation.fewshot) with 10 examples per class, three seeds, on the MNIST and on the
Fashion-MNIST test sets (``fewshot/mnist/10shot``, ``fewshot/fashion_mnist/10shot``).
"""

STEPS = (120, 240, 480, 960, 1920)
COOLDOWN_FRACTION = 0.2
SHOTS = (10,)
# name: (width, depth, mlp_dim, heads, patch)
VITS = {
    "w32_d1": (32, 1, 128, 1, 7),
    "w64_d2": (64, 2, 256, 2, 7),
    "w96_d4": (96, 4, 384, 3, 7),
    "w128_d6": (128, 6, 512, 4, 7),
}
EVALS = ("fewshot_mnist", "fewshot_fashion_mnist")  # made by configs/vit.py:fewshot=mnist+fashion_mnist


def get_sweep(h, arg=None):
    if arg:
        raise ValueError(f"fewshot_cpu takes no argument, got {arg!r}")
    schedule = h.product(h.fixed("schedule.name", "rsqrt"), h.fixed("schedule.timescale", 100),
                         h.fixed("schedule.warmup_steps", 12))
    probes = h.product(*[h.product(h.fixed(f"evals.{e}.shots", SHOTS), h.fixed(f"evals.{e}.every_steps", 0))
                         for e in EVALS])
    points = []
    for width, depth, mlp, heads, patch in VITS.values():
        model = h.product(h.fixed("model.width", width), h.fixed("model.depth", depth), h.fixed("model.mlp_dim", mlp),
                          h.fixed("model.num_heads", heads), h.fixed("model.patch_size", patch))
        points.append(h.product(model, schedule, probes, h.cooldowns(STEPS, fraction=COOLDOWN_FRACTION)))
    return h.chain(*points)
