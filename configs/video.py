"""Video classification: a CNN per frame (shared weights), then a temporal model.

    python -m seqvis.cli.train --config=configs/video.py:lstm --workdir=DIR          # LRCN on moving items
    python -m seqvis.cli.train --config=configs/video.py:mean --workdir=DIR          # single-frame baseline
    python -m seqvis.cli.train --config=configs/video.py:transformer,ucf101 --workdir=DIR --config.data.data_dir=D

The argument is ``TEMPORAL[,DATASET]``: TEMPORAL is ``mean``, ``lstm``, ``gru``,
``transformer`` or ``tconv``; DATASET is ``moving_fashion`` (default: offline clips of a
moving Fashion-MNIST item, label = the motion, generated on first use) or ``ucf101``
(tfds catalogue, must be prepared in ``data_dir``). On moving_fashion every config trains
in a few minutes on a 2-core CPU; ``results.json`` then also holds the accuracy on the
time-reversed test clips (``reversed_accuracy``).
"""

import ml_collections

from seqvis.data.presets import data_config
from seqvis.train.defaults import base_config

TEMPORAL = ("mean", "lstm", "gru", "transformer", "tconv")
DATASETS = ("moving_fashion", "ucf101")

# Temporal model sizes (shared by both datasets; width is the temporal model's size).
TEMPORAL_DEFAULTS = {
    "mean": dict(width=128, num_layers=1),
    "lstm": dict(width=128, num_layers=1),
    "gru": dict(width=128, num_layers=1),
    "transformer": dict(width=128, num_layers=2, num_heads=4, mlp_dim=256),
    "tconv": dict(width=128, num_layers=2, kernel_size=3),
}


def get_config(arg: str | None = None):
    temporal, dataset = "lstm", "moving_fashion"
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part in TEMPORAL:
            temporal = part
        elif part in DATASETS:
            dataset = part
        else:
            raise ValueError(f"configs/video.py: unknown argument {part!r}; write TEMPORAL[,DATASET] with "
                             f"TEMPORAL in {TEMPORAL} and DATASET in {DATASETS}, e.g. 'lstm' or 'gru,ucf101'.")

    c = base_config()
    c.task = "video"
    c.data = data_config(dataset)
    c.model = ml_collections.ConfigDict(dict(
        name="video", temporal=temporal, backbone="cnn", backbone_kwargs=dict(channels=(32, 64, 128)),
        pool="flatten", embed_dim=128, width=128, num_layers=1, num_heads=4, mlp_dim=256,
        max_frames=c.data.num_frames, kernel_size=3, bidirectional=False, dropout_rate=0.0))
    c.model.update(TEMPORAL_DEFAULTS[temporal])

    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.name = "cosine"

    if dataset == "moving_fashion":
        c.batch_size = 64
        c.eval_batch_size = 500
        c.num_epochs = 6.0
        c.schedule.base_lr = 2e-3
        c.schedule.warmup_steps = 100
        c.log_every_steps = 100
        c.checkpoint_every_steps = 500
    else:  # ucf101: ResNet-18 frames (GroupNorm), 112x112 crops; a GPU/TPU recipe
        c.model.backbone = "resnet"
        c.model.backbone_kwargs = ml_collections.ConfigDict(dict(depth=18, stem="imagenet", width=64))
        c.model.pool = "gap"
        c.model.embed_dim = 512
        c.model.width = 512
        c.model.mlp_dim = 1024
        c.model.num_heads = 8
        c.model.dropout_rate = 0.5
        c.batch_size = 64
        c.eval_batch_size = 64
        c.num_epochs = 50.0
        c.schedule.base_lr = 1e-3
        c.schedule.warmup_steps = 500
        c.optimizer.weight_decay = 0.05
        c.label_smoothing = 0.1
        c.log_every_steps = 50
        c.checkpoint_every_steps = 1000
    return c
