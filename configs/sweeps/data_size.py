"""Data-size study: does a ViT need more data than a ResNet? (ViT paper Fig. 3 and 4, at toy scale)

    flock /tmp/seqvis_cpu.lock python -m experiments.sweep --config=configs/vit.py \
        --sweep=configs/sweeps/data_size.py:short --workdir=DIR          # 2-core CPU, <= 60 min
    python -m experiments.data_size --results=DIR/results.csv --out=DIR/report
    python -m experiments.sweep --config=configs/vit.py --sweep=configs/sweeps/data_size.py --workdir=DIR   # GPU

Every point trains one model from scratch on ``config.data.train_examples`` examples of the
Fashion-MNIST training split (a class-balanced subset; the subsets of one ``subset_seed`` are
nested, see ``seqvis/data/subset.py``) and is tested on the whole 10k test split. Two ViTs
and two ResNet-18 widths, each with its family's own recipe (ViT: AdamW, lr 1.5e-3, weight
decay 0.05, grad clip 1; ResNet: SGD + Nesterov, lr 0.1, weight decay 1e-4; batch 128, cosine
schedule, warmup a tenth of the run up to 200 steps) and the same augmentation (random crop
with 2 px padding + horizontal flip).

Training length: ``steps(n) = max(min_steps, steps_full · (n / 60k)^p)`` with ``p < 1``, so a
small set gets many more epochs than the full one (``full``: p = 0.5 and at least 4,000 steps,
i.e. 1,024 epochs of 500 images and 30 of 60k), or a preset's explicit ``steps`` per size
(``:short``: 450 steps = 115 epochs of 500 images, 500 = 12.8 epochs of 5k, 560 = 1.2 epochs of
60k). Longer-training points (twice the steps, seed 0) at the small sizes test whether that is
enough: the report says whether they change the error by less than a point.

History of ``:short``: its first version (4 sizes, 193 steps at 500 and 273 at 2k, 36 points)
took 60 min 4 s, and doubling its steps lowered the error by 2-10 points at 500 and 2k, ViTs the
most, so it compared the families at a budget too short for the small sets. The second version
(this one) spends the hour on fewer points with more steps: 3 sizes, 2.3x the steps at 500.

Seeds: ``seed`` and ``subset_seed`` move together, so seed k is another initialisation, data
order and subset (the spread covers all three); more seeds where the variance is large.

``:short`` is what a 2-core CPU can do in an hour (measured: ResNet-18 w16 trains at ~100
img/s there, so the ResNets are w4 and w8, and the full set gets 1.2 epochs: compute-limited).
Its cost per point, fitted on the first version's 36 points (wall seconds of the point's whole
process): ViT w64/d2 12.6 + 0.095·steps, ViT w96/d4 21.4 + 0.224·steps, ResNet-18 w4 39.4 +
0.201·steps, w8 26.5 + 0.354·steps; the grid below predicts 50 min.
The default preset is the GPU version.
"""

import math

N_FULL = 60_000
AUG = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)"
NO_AUG = "decode|value_range(-1, 1)"
RESNET = "configs/resnet.py:18,fashion_mnist"

PRESETS = {
    # 2-core CPU, <= 60 min: 3 sizes, 2 seeds at 500, 1 above; a longer-training check at 500.
    "short": dict(
        vits=((64, 2, 256, 2), (96, 4, 384, 3)),  # (width, depth, MLP, heads): 105k and 455k parameters
        resnet_widths=(4, 8),  # ResNet-18: 45k and 176k parameters
        sizes=(500, 5_000, 60_000), seeds={500: 2, 5_000: 1, 60_000: 1},
        steps={500: 450, 5_000: 500, 60_000: 560},  # explicit steps per size (instead of the rule below)
        steps_full=560, exponent=0.0, min_steps=0,
        longer=((500, 2.0),),  # (size, step multiplier), seed 0
        no_aug_sizes=(),  # the augmentation axis does not fit the hour
    ),
    # GPU: larger models, 7 sizes, 3 seeds everywhere, 30 epochs of the full set.
    "full": dict(
        vits=((128, 6, 512, 4), (192, 12, 768, 3)),  # 1.2M, ViT-Ti 5.4M
        resnet_widths=(16, 32),  # 0.7M, 2.8M
        sizes=(500, 1_000, 2_000, 5_000, 10_000, 20_000, 60_000), seeds={},  # {}: 3 seeds at every size
        steps_full=14_063, exponent=0.5, min_steps=4_000,  # 30 epochs of 60k; >= 4k steps below 4.9k
        longer=((500, 2.0), (2_000, 2.0), (10_000, 2.0)),
        no_aug_sizes=(500, 5_000, 60_000),  # the augmentation axis: none vs crop + flip, seed 0
    ),
}


def steps_for(size: int, p: dict) -> int:
    """Training steps for ``size`` examples: the preset's ``steps[size]`` when it lists the size, else
    ``max(min_steps, steps_full · (size / 60k)^exponent)``."""
    if size in p.get("steps", {}):
        return int(p["steps"][size])
    return max(int(p["min_steps"]), int(round(p["steps_full"] * (size / N_FULL) ** p["exponent"])))


def _budget(h, steps):
    return h.product(h.fixed("total_steps", steps), h.fixed("schedule.warmup_steps", min(200, steps // 10)))


def _models(h, p):
    vits = [h.product(h.fixed("model.width", w), h.fixed("model.depth", d), h.fixed("model.mlp_dim", mlp),
                      h.fixed("model.num_heads", heads), h.fixed("model.patch_size", 7))
            for w, d, mlp, heads in p["vits"]]
    resnets = [h.product(h.fixed("config", RESNET), h.fixed("model.width", w)) for w in p["resnet_widths"]]
    return [*vits, *resnets]


def _point(h, model, size, seed, steps, pp):
    return h.product(model, h.fixed("data.train_examples", size), h.fixed("seed", seed),
                     h.fixed("data.subset_seed", seed), h.fixed("data.pp_train", pp), _budget(h, steps))


def get_sweep(h, arg=None):
    arg = arg or "full"
    if arg not in PRESETS:
        raise ValueError(f"unknown argument {arg!r}; use data_size.py (full, GPU) or data_size.py:short (CPU)")
    p = PRESETS[arg]
    models = _models(h, p)
    main, extra = [], []
    # The cheap points first: an interrupted sweep has whole small-data curves.
    for size in sorted(p["sizes"]):
        steps = steps_for(size, p)
        for seed in range(p["seeds"].get(size, 3)):
            for m in models:
                main += _point(h, m, size, seed, steps, AUG)
    for size, mult in p["longer"]:
        for m in models:
            extra += _point(h, m, size, 0, int(round(mult * steps_for(size, p))), AUG)
    for size in p["no_aug_sizes"]:
        for m in models:
            extra += _point(h, m, size, 0, steps_for(size, p), NO_AUG)
    return h.chain(main, extra)
