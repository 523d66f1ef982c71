"""Image classification: a ViT or ResNet on ``image [B, H, W, C]`` with ``label [B]`` (or soft ``labels [B, K]``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqvis.models import resnet, vit
from seqvis.tasks.base import Task, register_task, softmax_cross_entropy
from seqvis.train.precision import compute_dtype
from seqvis.train.step import AXIS


def build_classifier(model_cfg: Any, num_classes: int, dtype: Any = None) -> nn.Module:
    """``config.model`` -> ViT or ResNet module (``name`` picks which; other fields are kwargs).

    ``dtype`` is the compute dtype of the precision policy (:mod:`seqvis.train.precision`);
    None keeps the modules' float32 default. Parameters are float32 either way."""
    cfg = dict(model_cfg)
    cfg.pop("dtype", None)  # decided by config.precision (checked in precision.compute_dtype)
    if cfg.get("patch_size", 0) is None:  # a config's "not set": the variant's own patch size
        del cfg["patch_size"]
    if dtype is not None:
        cfg["dtype"] = dtype
    name = cfg.pop("name", "vit")
    if name == "vit":
        variant = cfg.pop("variant", None)
        if variant is None:
            raise ValueError("config.model.variant is missing; set it to a ViT name such as 'Ti/16'.")
        return vit.build(variant, num_classes=num_classes, **cfg)
    if name == "resnet":
        # Batch statistics are computed over the global batch (synced across devices).
        cfg.setdefault("bn_axis_name", AXIS if cfg.get("norm", "batch") == "batch" else None)
        return resnet.ResNet(num_classes=num_classes, **cfg)
    raise ValueError(f"config.model.name={name!r} is unknown; use 'vit' or 'resnet'.")


@register_task("classification")
class ClassificationTask(Task):
    """Image classification: ``image [B, H, W, C]`` and ``label [B]`` (or soft ``labels [B, K]``)."""

    def __init__(self, config: Any):
        self.num_classes = int(config.data.num_classes)
        super().__init__(config)
        self.mutable_collections = ("batch_stats",) if config.model.get("name") == "resnet" and \
            config.model.get("norm", "batch") == "batch" else ()

    def build_model(self) -> nn.Module:
        return build_classifier(self.config.model, self.num_classes, compute_dtype(self.config))

    def dummy_batch(self, batch_size: int) -> dict[str, jax.Array]:
        h, w, c = self.config.data.image_shape
        return {"image": jnp.zeros((batch_size, h, w, c), jnp.float32),
                "label": jnp.zeros((batch_size,), jnp.int32)}

    def model_inputs(self, batch):
        return (batch["image"],)

    def init(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, batch["image"], train=False)

    def losses(self, variables, batch, *, train, rng):
        rngs = {"dropout": rng} if rng is not None else {}
        if self.mutable_collections and train:
            logits, updates = self.model.apply(variables, batch["image"], train=True, rngs=rngs,
                                               mutable=list(self.mutable_collections))
        else:
            logits, updates = self.model.apply(variables, batch["image"], train=train, rngs=rngs), {}
        labels = batch.get("labels", batch["label"])  # soft labels after mixup
        smoothing = float(self.config.get("label_smoothing", 0.0)) if train else 0.0
        loss = softmax_cross_entropy(logits, labels, self.num_classes, smoothing)
        hard = batch["label"] if "label" in batch else jnp.argmax(labels, -1)
        if hard.ndim == logits.ndim:
            hard = jnp.argmax(hard, -1)
        correct = (jnp.argmax(logits, -1) == hard).astype(jnp.float32)
        return loss, {"accuracy": correct}, updates
