"""A ViT scaling study that runs end to end on a 2-core CPU in under an hour (Fashion-MNIST).

    flock /tmp/seqvis_cpu.lock python -m experiments.sweep --config=configs/vit.py \
        --sweep=configs/sweeps/scaling_cpu_mini.py --workdir=DIR
    python -m experiments.scaling_curves --results=DIR/results.csv --out=DIR/report

The shape of Zhai et al. (2022) at toy scale: ViTs from 15k parameters up to ViT-Ti
(width 192, depth 12, MLP 768, 3 heads), 7x7 patches (16 tokens + class token), each
trained for several budgets (every budget is its own run with its own cosine schedule,
batch 128), so that compute spans three orders of magnitude. Budgets shrink as models
grow to fit the hour: the small models get the long runs where they saturate, the large
ones the short runs where they are compute-bound. Three extra ViTs around the w96/d4
model (twice the depth, ~twice the FLOPs through width, 4x4 patches) test the ablation
findings, and ResNet-18s (3x3 stem, widths 8 and 16) the ViT-vs-ResNet comparison.

Budgets are in steps of 128 images: 120, 480, 1920, 7680 steps = 0.26, 1, 4, 16 epochs.
"""

STEPS = (120, 480, 1920, 7680)
# name: (width, depth, mlp_dim, heads, patch, number of budgets from the smallest)
VITS = {
    "w32_d1": (32, 1, 128, 1, 7, 4),
    "w64_d2": (64, 2, 256, 2, 7, 4),
    "w96_d4": (96, 4, 384, 3, 7, 4),
    "w128_d6": (128, 6, 512, 4, 7, 3),
    "Ti_w192_d12": (192, 12, 768, 3, 7, 2),  # ViT-Ti
    # around w96_d4, for the depth / width / patch findings
    "w96_d8": (96, 8, 384, 3, 7, 2),
    "w136_d4": (136, 4, 544, 4, 7, 2),
    "w96_d4_p4": (96, 4, 384, 3, 4, 2),
}
RESNETS = {"r18_w8": 8, "r18_w16": 16}  # ResNet-18 widths, first two budgets each
RESNET_BUDGETS = 2


def budget(h, n):
    steps = STEPS[:n]
    return h.zip(h.sweep("total_steps", steps), h.sweep("schedule.warmup_steps", [min(200, s // 10) for s in steps]))


def get_sweep(h, arg=None):
    if arg:
        raise ValueError(f"scaling_cpu_mini takes no argument, got {arg!r}")
    vits = []
    for width, depth, mlp, heads, patch, n in VITS.values():
        model = h.product(h.fixed("model.width", width), h.fixed("model.depth", depth), h.fixed("model.mlp_dim", mlp),
                          h.fixed("model.num_heads", heads), h.fixed("model.patch_size", patch))
        vits.append(h.product(model, budget(h, n)))
    resnets = [h.product(h.fixed("config", "configs/resnet.py:18,fashion_mnist"), h.fixed("model.width", w),
                         budget(h, RESNET_BUDGETS)) for w in RESNETS.values()]
    return h.chain(*vits, *resnets)
