"""The video classification task: clips in, one label per clip out.

Batches hold ``video [B, T, H, W, C]`` (float), ``length [B]`` (real frames; padding after
them) and ``label [B]``. The model is :class:`seqvis.models.video.VideoClassifier`, built
from ``config.model`` (``name='video'``; every other field is a model attribute). The loss
is the softmax cross-entropy, the metric the top-1 accuracy; the shared trainer does the rest.

``config.data`` needs, besides the usual fields, ``num_frames`` (T after preprocessing) and
``image_shape`` (H, W, C of a frame). The video pp ops (:mod:`seqvis.data.video_ops`) are
registered when this module is imported, before any pp string is parsed.

Final evaluation: with ``config.data.reverse_labels`` (the label of each class played
backwards, e.g. left -> right), every test clip is also played backwards and scored
against the reversed label::

    reversed_accuracy      accuracy on reversed clips with reversed labels
    reversal_consistency   fraction of clips where pred(reversed clip) = reverse(pred(clip))

An order-blind model predicts the same class for a clip and its reversal, so for every
clip it is right on at most one of the two when labels and their reversals differ
(``accuracy + reversed_accuracy <= 1``) and its consistency is 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqvis.data import pipeline, preprocess
from seqvis.data import video_ops  # noqa: F401  (registers the video pp ops)
from seqvis.errors import ConfigError
from seqvis.models.video import VideoClassifier
from seqvis.train.precision import compute_dtype
from seqvis.tasks.base import Task, register_task, softmax_cross_entropy

_MODEL_FIELDS = ("temporal", "backbone", "backbone_kwargs", "pool", "embed_dim", "width", "num_layers", "num_heads",
                 "mlp_dim", "max_frames", "kernel_size", "bidirectional", "dropout_rate")


def _plain(value: Any) -> Any:
    """ConfigDicts / lists from a config -> dicts / tuples (hashable module attributes)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


@register_task("video")
class VideoTask(Task):
    """Video classification on ``video``, ``length`` and ``label``."""

    def __init__(self, config: Any):
        data = config.data
        for field in ("num_classes", "num_frames", "image_shape"):
            if data.get(field) is None:
                raise ConfigError(f"config.data.{field} is missing; the video task needs the number of classes, "
                                    "frames per clip and frame shape (H, W, C) after preprocessing "
                                    "(see seqvis.data.presets 'moving_fashion').")
        self.num_classes = int(data.num_classes)
        self.num_frames = int(data.num_frames)
        self.image_shape = tuple(int(s) for s in data.image_shape)
        if len(self.image_shape) != 3:
            raise ConfigError(f"config.data.image_shape={self.image_shape} must be (H, W, C) of one frame.")
        partner = data.get("reverse_labels", None)
        self.reverse_labels = [int(p) for p in partner] if partner else None
        super().__init__(config)

    def _check_reverse_labels(self) -> None:
        if self.reverse_labels is not None and sorted(self.reverse_labels) != list(range(self.num_classes)):
            raise ConfigError(f"config.data.reverse_labels={tuple(self.reverse_labels)} must be a permutation of "
                                f"the {self.num_classes} class ids (entry c: the label of class c played "
                                "backwards), or None to skip the time-reversed evaluation.")

    # ------------------------------------------------------------------ model
    def build_model(self) -> VideoClassifier:
        cfg = _plain(self.config.model)
        cfg.pop("dtype", None)  # decided by config.precision (checked by compute_dtype)
        dtype = compute_dtype(self.config)
        if dtype is not None:
            cfg["dtype"] = dtype
        name = cfg.pop("name", "video")
        if name != "video":
            raise ConfigError(f"config.model.name={name!r}: the video task builds 'video' models "
                                "(VideoClassifier); set config.model.name='video'.")
        unknown = sorted(set(cfg) - set(_MODEL_FIELDS) - {"dtype"})
        if unknown:
            raise ConfigError(f"config.model has unknown field(s) {unknown} for the video model; "
                                f"valid fields: {list(_MODEL_FIELDS)}.")
        cfg.setdefault("max_frames", self.num_frames)
        if cfg.get("temporal") == "transformer" and int(cfg["max_frames"]) < self.num_frames:
            raise ConfigError(f"config.model.max_frames={cfg['max_frames']} is smaller than "
                                f"config.data.num_frames={self.num_frames}; set max_frames >= num_frames.")
        model = VideoClassifier(num_classes=self.num_classes, **cfg)
        try:
            model.check_config()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return model

    def dummy_batch(self, batch_size: int) -> dict[str, jax.Array]:
        return {"video": jnp.zeros((batch_size, self.num_frames, *self.image_shape), jnp.float32),
                "length": jnp.full((batch_size,), self.num_frames, jnp.int32),
                "label": jnp.zeros((batch_size,), jnp.int32)}

    def model_inputs(self, batch):
        return batch["video"], batch["length"]

    def init(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, batch["video"], batch["length"], train=False)

    def losses(self, variables, batch, *, train, rng):
        rngs = {"dropout": rng} if rng is not None else {}
        logits = self.model.apply(variables, batch["video"], batch["length"], train=train, rngs=rngs)
        smoothing = float(self.config.get("label_smoothing", 0.0)) if train else 0.0
        loss = softmax_cross_entropy(logits, batch["label"], self.num_classes, smoothing)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return loss, {"accuracy": correct}, {}

    # ------------------------------------------------------------------ data
    def pp_ops(self, train: bool):
        return [video_ops.finalize(self.num_frames, self.image_shape)]

    def setup(self, workdir: str) -> None:
        """Check the data against the config before anything is compiled: class count and the
        shape of one preprocessed test clip."""
        del workdir
        cfg = self.config.data
        builder = pipeline.get_builder(cfg)
        label = builder.info.features["label"] if "label" in builder.info.features else None
        if label is not None and getattr(label, "num_classes", None) not in (None, self.num_classes):
            raise ConfigError(f"config.data.num_classes={self.num_classes} but {builder.name} has "
                                f"{label.num_classes} classes; set config.data.num_classes={label.num_classes}.")
        self._check_reverse_labels()  # after the class count, which it depends on
        if "video" not in builder.info.features:
            raise ConfigError(f"config.data.name={cfg.name!r} has no 'video' feature; the video task needs clips.")
        ops = preprocess.parse(cfg.get("pp_eval", ""), field="config.data.pp_eval")
        split = cfg.get("eval_split", "test")
        ds = pipeline.as_dataset(builder, split, cfg).take(1)
        for ex in ds:
            import tensorflow as tf

            ex = preprocess.apply(ops, {**ex, "_seed": tf.constant([0, 0], tf.int64)})
            got = tuple(int(s) for s in ex["video"].shape)
            want = (self.num_frames, *self.image_shape)
            if got != want:
                raise ConfigError(
                    f"config.data.pp_eval gives clips of shape {got} (frames, H, W, C) but the config says "
                    f"num_frames={self.num_frames}, image_shape={self.image_shape}; make them agree (e.g. "
                    f"sample_frames({self.num_frames}) and a resize/crop to {self.image_shape[:2]}).")

    # ------------------------------------------------------------------ evaluation
    def final_evaluation(self, variables, config, workdir) -> dict[str, Any]:
        partner = self.reverse_labels
        if partner is None:
            return {}
        reverse = video_ops.reverse_time(1.0, label_map=partner)
        finalize = video_ops.finalize(self.num_frames, self.image_shape)

        def both(ex):  # the clip and its time reversal, side by side
            rev = finalize(reverse(dict(ex)))
            out = finalize(ex)
            out["video_reversed"], out["label_reversed"] = rev["video"], rev["label"]
            return out

        partner_arr = jnp.asarray(partner, jnp.int32)

        @jax.jit
        def sums(video, rev_video, length, rev_label, mask):
            pred = jnp.argmax(self.model.apply(variables, video, length, train=False), -1)
            rev_logits = self.model.apply(variables, rev_video, length, train=False)
            rev_pred = jnp.argmax(rev_logits, -1)
            rev_loss = softmax_cross_entropy(rev_logits, rev_label, self.num_classes)
            return jnp.stack([jnp.sum(mask * (rev_pred == rev_label)), jnp.sum(mask * rev_loss),
                              jnp.sum(mask * (rev_pred == partner_arr[pred])), jnp.sum(mask)])

        total = np.zeros(4)
        it = pipeline.eval_iterator(config.data, global_batch_size=int(config.get("eval_batch_size", config.batch_size)),
                                    extra_ops=(both,))
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [devices, B, ...] -> [devices·B, ...]
        for batch in it:
            total += np.asarray(sums(flat(batch["video"]), flat(batch["video_reversed"]), flat(batch["length"]),
                                     flat(batch["label_reversed"]),
                                     flat(batch["mask"]).astype(np.float32)), np.float64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
        n = max(total[3], 1.0)
        return {"reversed_accuracy": total[0] / n, "reversed_loss": total[1] / n,
                "reversal_consistency": total[2] / n, "reversed_num_examples": int(total[3])}
