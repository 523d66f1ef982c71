"""ResNet baselines.

    python -m seqvis.cli.train --config=configs/resnet.py --workdir=DIR                  # ResNet-18, Fashion-MNIST
    python -m seqvis.cli.train --config=configs/resnet.py:50,imagenet2012 --workdir=DIR  # ResNet-50 v1.5, 90 epochs
    python -m seqvis.cli.train --config=configs/resnet.py:26,cifar10,group --workdir=DIR # BiT-style GN+WS

The argument is ``DEPTH,DATASET[,NORM]``. ImageNet uses the standard recipe (SGD + Nesterov
momentum 0.9, lr 0.1 per 256 images, 5 warmup epochs, cosine, weight decay 1e-4 on
kernels, label smoothing 0.1, batch 1024, 90 epochs); small images use the 3x3 stem.
"""

from seqvis.data.presets import data_config
from seqvis.train.defaults import base_config


def get_config(arg: str | None = None):
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    depth = int(parts[0].lower().replace("resnet", "")) if parts else 18
    dataset = parts[1] if len(parts) > 1 else "fashion_mnist"
    norm = parts[2] if len(parts) > 2 else "batch"

    c = base_config()
    c.data = data_config(dataset)
    small = c.data.image_shape[0] <= 64
    c.model = dict(name="resnet", depth=depth, norm=norm, stem="small" if small else "imagenet")
    c.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4,
                       skip_decay=("bias", "norm"), grad_clip_norm=0.0)
    if dataset == "imagenet2012":
        c.batch_size = 1024
        c.eval_batch_size = 1000
        c.num_epochs = 90.0
        c.label_smoothing = 0.1
        c.schedule.update(name="cosine", base_lr=0.1 * c.batch_size / 256, warmup_steps=5 * 1251)
        c.checkpoint_every_steps = 2000
    else:
        c.batch_size = 128
        c.eval_batch_size = 1000
        c.num_epochs = 10.0 if dataset in ("fashion_mnist", "mnist") else 200.0
        c.schedule.update(name="cosine", base_lr=0.1, warmup_steps=200)
        c.model["width"] = 32 if dataset in ("fashion_mnist", "mnist") else 64
    return c
