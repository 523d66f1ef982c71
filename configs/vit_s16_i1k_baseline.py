""""Better plain ViT baselines for ImageNet-1k" (Beyer, Zhai, Kolesnikov 2022): ViT-S/16, 90 epochs.

Global average pooling instead of the class token, fixed 2-D sin-cos position embeddings,
batch 1024, AdamW with lr 1e-3 (10k warmup steps, cosine decay), decoupled weight decay
1e-4 (written here as 0.1 because optax multiplies it by the lr 1e-3), RandAugment(2, 10),
mixup with α = 0.2, inception crop, no dropout, zero-init head, clipping at 1.

    python -m seqvis.cli.train --config=configs/vit_s16_i1k_baseline.py --workdir=DIR --config.data.data_dir=TFDS_DIR
"""

from seqvis.data.presets import data_config
from seqvis.train.defaults import base_config
from seqvis.train.evaluators import imagenet1k_evals


def get_config(arg: str | None = None):
    c = base_config()
    c.data = data_config(
        "imagenet2012",
        pp_train="decode_jpeg_and_inception_crop(224, area_min=5)|flip_lr|randaugment(2, 10)|value_range(-1, 1)",
    )
    c.data.mixup.p = 1.0
    c.data.mixup.alpha = 0.2
    c.model = dict(name="vit", variant=arg or "S/16", pool="gap", posemb="sincos2d", head_zero_init=True)
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = 90.0
    c.optimizer.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.1, grad_clip_norm=1.0)
    c.schedule.update(name="cosine", base_lr=1e-3, warmup_steps=10_000)
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.evals = imagenet1k_evals(c.data.pp_eval)  # minival, val, ImageNet-v2, ReaL
    c.checkpoint_every_steps = 2000
    return c
