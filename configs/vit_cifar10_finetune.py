"""Fine-tune a pretrained ViT on CIFAR-10 (the ViT paper's transfer recipe).

SGD with momentum 0.9, batch 512, base lr 0.01 (the paper sweeps 0.001-0.03) with 500
warmup steps and cosine decay, no weight decay, clipping at 1, 10k steps. Images are
resized to 224 (the paper fine-tunes at 384: set the resize op and the position embeddings
are resampled automatically). Point ``init_from`` at pretrained weights: an official ViT
``.npz`` (e.g. ImageNet-21k B/16) or a seqvis workdir; the head is re-initialised.

    python -m seqvis.cli.train --config=configs/vit_cifar10_finetune.py --workdir=DIR \
        --config.init_from=/path/ViT-B_16.npz --config.data.data_dir=TFDS_DIR
"""

from seqvis.data.presets import data_config
from seqvis.train.defaults import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.data = data_config(
        "cifar10", image_shape=(224, 224, 3),
        pp_train="decode|resize(224)|flip_lr|value_range(-1, 1)",
        pp_eval="decode|resize(224)|value_range(-1, 1)")
    c.model = dict(name="vit", variant=arg or "B/16", pool="token", posemb="learned", head_zero_init=True)
    c.init_from = ""  # path to the pretrained weights; empty trains from scratch (and warns)
    c.batch_size = 512
    c.eval_batch_size = 512
    c.total_steps = 10_000
    c.optimizer.update(name="sgd", momentum=0.9, weight_decay=0.0, grad_clip_norm=1.0)
    c.schedule.update(name="cosine", base_lr=0.01, warmup_steps=500)
    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 1000
    return c
