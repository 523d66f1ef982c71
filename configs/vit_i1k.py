"""ViT paper recipe: ViT-B/16 trained from scratch on ImageNet-1k (Dosovitskiy et al. 2021, Table 3).

300 epochs, batch 4096, Adam (β1 0.9, β2 0.999), base lr 3e-3 with 10k warmup steps and
linear decay, weight decay 0.3 (multiplied by the lr, as in the paper's Flax optimiser),
dropout 0.1, global-norm clipping at 1, pre-logits layer of width 768.

    python -m seqvis.cli.train --config=configs/vit_i1k.py --workdir=DIR --config.data.data_dir=TFDS_DIR
    python -m seqvis.cli.train --config=configs/vit_i1k.py:L/16 ...   # another variant
"""

from seqvis.data.presets import data_config
from seqvis.train.defaults import base_config
from seqvis.train.evaluators import imagenet1k_evals


def get_config(arg: str | None = None):
    c = base_config()
    c.data = data_config("imagenet2012")
    variant = arg or "B/16"
    widths = {"Ti": 192, "S": 384, "B": 768, "L": 1024, "H": 1280, "g": 1408, "G": 1664}
    width = widths.get(variant.split("/")[0].split("+")[-1], 768)
    c.model = dict(name="vit", variant=variant, pool="token", posemb="learned", representation_size=width,
                   dropout_rate=0.1, head_zero_init=True)
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.num_epochs = 300.0
    c.optimizer.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.3, grad_clip_norm=1.0)
    c.schedule.update(name="linear", base_lr=3e-3, warmup_steps=10_000, end_lr=1e-5)
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.evals = imagenet1k_evals(c.data.pp_eval)  # minival, val, ImageNet-v2, ReaL
    c.checkpoint_every_steps = 2000
    return c
