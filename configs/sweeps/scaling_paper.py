"""The published study's shape, for GPU/TPU: ViT Ti..H and ResNets on ImageNet-21k / ImageNet-1k budgets.

    python -m experiments.sweep --config=configs/vit.py:B/16,imagenet2012 \
        --sweep=configs/sweeps/scaling_paper.py[:i1k|:i21k] --workdir=DIR --config.data.data_dir=TFDS_DIR
    python -m experiments.scaling_curves --results=DIR/results.csv --out=DIR/report

ViT-Ti/16, S/16, B/32, B/16, L/32, L/16 and H/14 (ViT paper Table 1, the variants of the
scaling figures) and ResNet-50/101 (v1.5, the ResNet recipe of ``configs/resnet.py``), each
trained from scratch for two budgets per dataset:

- ``i1k``: ImageNet-1k (tfds ``imagenet2012``), 90 and 300 epochs;
- ``i21k``: ImageNet-21k, 30 and 90 epochs (the ViT paper pre-trains 90 epochs). It is not
  in the tfds catalogue: register a builder named ``imagenet21k`` with a ``full`` split
  (as big_vision does) and prepare it in ``data_dir``; the first 51,200 images are held
  out for evaluation, as in big_vision.

The ViT recipe is the base config's (``configs/vit.py`` for ImageNet: AdamW, batch 4096,
10k warmup steps, cosine); a point only changes the model, dataset and budget. The
scaling-law papers train on JFT with further budgets; with ImageNet-21k this is the
largest public version of the same grid. A test builds every point and trains one step
of one point on mock data.
"""

VITS = ("Ti/16", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")
RESNETS = ("configs/resnet.py:50,imagenet2012", "configs/resnet.py:101,imagenet2012")
EPOCHS = {"i1k": (90.0, 300.0), "i21k": (30.0, 90.0)}
I21K = {"data.name": "imagenet21k", "data.num_classes": 21843, "data.train_split": "full[51200:]",
        "data.eval_split": "full[:51200]"}


def dataset(h, name):
    fixed = [h.fixed(k, v) for k, v in I21K.items()] if name == "i21k" else []
    return h.product(*fixed, h.sweep("num_epochs", EPOCHS[name]))


def get_sweep(h, arg=None):
    names = [arg] if arg else ["i1k", "i21k"]
    for n in names:
        if n not in EPOCHS:
            raise ValueError(f"unknown argument {n!r}; use scaling_paper.py, scaling_paper.py:i1k or :i21k")
    data = h.chain(*[dataset(h, n) for n in names])
    vits = h.product(h.sweep("model.variant", VITS), data)
    resnets = h.product(h.sweep("config", RESNETS), data)
    return h.chain(vits, resnets)
