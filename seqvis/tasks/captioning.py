"""The captioning task: Show and Tell, Show Attend and Tell and a transformer decoder on the shared trainer.

Data. A dataset with an ``image`` and several reference ``captions`` (``fashion_scenes``:
a string tensor of 5; tfds ``coco_captions``: ``captions/text``). The vocabulary is built
from the training captions on the first run and kept in ``workdir/vocab.json`` next to the
checkpoints (a resumed run loads it, so the output layer keeps its meaning). The task's
tf.data op tokenises: in training one reference drawn per example and epoch from the
example's seed (``tokens [max_len]``); in evaluation the first ``num_refs`` references
(``tokens [num_refs, max_len]``, missing ones all ``<pad>``).

Loss (teacher forcing). With inputs ``y_0..y_{T-1}``, targets ``y_1..y_T`` and the mask
``m_t = [y_t != <pad>]`` (``<eos>`` counts), per caption::

    loss = (Σ_t m_t CE(logits_t, y_t) + λ Σ_i (1 - Σ_t m_t α_ti)²) / Σ_t m_t

— the summed cross-entropy plus the doubly stochastic attention regulariser (Show, Attend
and Tell; λ = ``config.doubly_stochastic``, only for models with attention), per target
word, so λ weighs the two terms as the paper's summed loss does. An evaluation example's
loss and metrics average over its references. Metrics: ``nll`` (mean CE per word),
``token_accuracy``, and for attention ``attention_reg`` and ``gate`` (mean β).

Final evaluation (:mod:`seqvis.tasks.captioning_eval`): the eval split decoded greedily and
with beam search, BLEU-1..4, CIDEr-D, ROUGE-L and grounding, the caption files. ``python -m
seqvis.cli.caption_eval --workdir=DIR [--kv_cache=false]`` runs it again from a trained workdir
(:func:`evaluate_workdir`). ``config.decode.kv_cache`` (transformer only): decode with the key/value cache
(True, the default) or re-run the whole prefix at every step (False, the reference path); the
captions and the checkpoint are the same either way.

Over 400 lines on purpose: the task (tokeniser, pp ops, loss, metrics) and the re-evaluation command share
the workdir conventions (vocab.json, decoding settings); the final evaluation itself is in captioning_eval.py.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqvis.data import pipeline as data_pipeline
from seqvis.data.preprocess import example_seed
from seqvis.data.tokenizer import Tokenizer
from seqvis.errors import ConfigError, VocabularyError
from seqvis.models import captioning as cap
from seqvis.models import vit
from seqvis.models.resnet import ResNetEncoder
from seqvis.tasks import captioning_eval
from seqvis.train.checkpoint import restore_variables
from seqvis.train.step import AXIS
from seqvis.train.precision import compute_dtype
from seqvis.tasks.base import Task, register_task

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
ENCODERS = ("resnet", "vit")
_MODEL_FIELDS = {
    "show_and_tell": {"embed_dim", "hidden_dim", "pooling", "dropout_rate"},
    "show_attend_tell": {"embed_dim", "hidden_dim", "attention_dim", "gate", "dropout_rate"},
    "transformer": {"width", "num_layers", "num_heads", "mlp_dim", "dropout_rate", "attention_dropout_rate"},
}


# ============================================================================ config and model


def _as_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def check_config(config: Any) -> None:
    """Captioning fields, checked before any data is read or anything is compiled."""
    model = config.get("model", None)
    if model is None or model.get("name") not in cap.MODELS:
        raise ConfigError(f"config.model.name={None if model is None else model.get('name')!r} is not a captioning "
                          f"model; use one of {sorted(cap.MODELS)}.")
    extra = set(_as_dict(model)) - _MODEL_FIELDS[model.name] - {"name", "encoder"}
    if "kv_cache" in extra:
        raise ConfigError("config.model.kv_cache: the key/value cache is a decoding choice, set by "
                          "config.decode.kv_cache (e.g. --config.decode.kv_cache=False); remove config.model.kv_cache.")
    if extra:
        raise ConfigError(f"config.model has field(s) {sorted(extra)} that {model.name} does not use; valid: "
                          f"{sorted(_MODEL_FIELDS[model.name])} (+ name, encoder).")
    enc = model.get("encoder", None)
    if enc is None or enc.get("name") not in ENCODERS:
        raise ConfigError(f"config.model.encoder.name must be one of {ENCODERS} "
                          f"(got {None if enc is None else enc.get('name')!r}).")
    caps = config.get("captions", None)
    if caps is None:
        raise ConfigError("config.captions is missing (max_len, min_count, num_refs); see configs/captioning.py.")
    if int(caps.get("max_len", 0)) < 3:
        raise ConfigError(f"config.captions.max_len={caps.get('max_len')} must be >= 3 (<bos>, a word, <eos>).")
    if int(caps.get("num_refs", 0)) < 1:
        raise ConfigError(f"config.captions.num_refs={caps.get('num_refs')} must be >= 1.")
    if int(caps.get("min_count", 1)) < 1:
        raise ConfigError(f"config.captions.min_count={caps.get('min_count')} must be >= 1.")
    dec = config.get("decode", None)
    if dec is None:
        raise ConfigError("config.decode is missing (beam_size, length_penalty, batch_size).")
    if int(dec.get("beam_size", 0)) < 1:
        raise ConfigError(f"config.decode.beam_size={dec.get('beam_size')} must be >= 1.")
    if float(dec.get("length_penalty", 0.0)) < 0:
        raise ConfigError(f"config.decode.length_penalty={dec.get('length_penalty')} must be >= 0.")
    kv = dec.get("kv_cache", None)
    if kv is not None and model.name != "transformer":
        raise ConfigError(f"config.decode.kv_cache={kv} applies to the transformer decoder only (it caches the "
                          f"self-attention keys/values of the words so far); {model.name} is an LSTM, whose step "
                          "carries only its state. Remove --config.decode.kv_cache.")
    if kv is not None and not isinstance(kv, bool):
        raise ConfigError(f"config.decode.kv_cache={kv!r} must be True or False.")
    nd = jax.local_device_count()
    if int(dec.get("batch_size", 0)) <= 0 or int(dec.batch_size) % nd:
        raise ConfigError(f"config.decode.batch_size={dec.get('batch_size')} must be a positive multiple of the "
                          f"local device count ({nd}).")
    if float(config.get("doubly_stochastic", 0.0)) < 0:
        raise ConfigError(f"config.doubly_stochastic={config.get('doubly_stochastic')} must be >= 0.")
    shape = config.data.get("image_shape", None)
    if shape is None or len(tuple(shape)) != 3:
        raise ConfigError(f"config.data.image_shape={shape} must be (H, W, C) after preprocessing.")


def build_encoder(enc_cfg: dict, dtype: Any = None) -> nn.Module:
    """``config.model.encoder`` -> ResNet or ViT feature-map encoder (``dtype``: compute dtype)."""
    cfg = dict(enc_cfg)
    cfg.pop("dtype", None)
    if dtype is not None:
        cfg["dtype"] = dtype
    name = cfg.pop("name")
    if name == "resnet":
        if "stage_sizes" in cfg and cfg["stage_sizes"] is not None:
            cfg["stage_sizes"] = tuple(cfg["stage_sizes"])
        # Batch statistics over the global batch (synced across devices), as in classification.
        cfg.setdefault("bn_axis_name", AXIS if cfg.get("norm", "batch") == "batch" else None)
        try:
            return ResNetEncoder(**cfg)
        except TypeError as e:
            raise ConfigError(f"config.model.encoder: {e}") from e
    variant = cfg.pop("variant", None)
    if not variant:
        raise ConfigError("config.model.encoder.variant is missing; set a ViT name such as 'mu/12'.")
    return cap.ViTGridEncoder(vit=vit.build(variant, num_classes=None, pool="gap", **cfg))


def build_captioner(model_cfg: Any, vocab_size: int, max_positions: int, dtype: Any = None,
                    kv_cache: bool | None = None) -> nn.Module:
    """``config.model`` -> captioner; ``dtype`` is the precision policy's compute dtype (None: float32);
    ``kv_cache`` is ``config.decode.kv_cache`` (transformer only; None: the model's default, True)."""
    cfg = _as_dict(model_cfg)
    cfg.pop("dtype", None)
    name = cfg.pop("name")
    encoder = build_encoder(cfg.pop("encoder"), dtype)
    if dtype is not None:
        cfg["dtype"] = dtype
    if name == "transformer":
        cfg["max_positions"] = max_positions
        if kv_cache is not None:
            cfg["kv_cache"] = bool(kv_cache)
    elif kv_cache is not None:
        raise ConfigError(f"config.decode.kv_cache applies to the transformer decoder only, not {name}.")
    return cap.MODELS[name](encoder=encoder, vocab_size=vocab_size, **cfg)


# ============================================================================ tf.data side


def caption_texts(ex):
    """The reference captions of an example as a string tensor ``[n]`` (scenes or COCO layout)."""
    c = ex["captions"]
    return c["text"] if isinstance(c, dict) else c


def image_id(ex):
    import tensorflow as tf  # deferred on purpose: tf.data side only, keeps TF off the import path

    for key in ("image_id", "image/id"):
        if key in ex:
            return tf.cast(ex[key], tf.int32)
    raise KeyError("the dataset has no image id (image_id or image/id)")


# ============================================================================ the task


@register_task("captioning")
class CaptioningTask(Task):
    """Image -> caption with teacher forcing; the model is built in :meth:`setup` (it needs the vocabulary)."""

    def __init__(self, config: Any):
        check_config(config)
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self._model: nn.Module | None = None
        self.max_len = int(config.captions.max_len)
        self.num_refs = int(config.captions.num_refs)
        enc = config.model.encoder
        self.mutable_collections = ("batch_stats",) if enc.name == "resnet" and enc.get("norm", "batch") == "batch" \
            else ()
        self.reg = float(config.get("doubly_stochastic", 0.0)) if config.model.name == "show_attend_tell" else 0.0

    # ---------------------------------------------------------------- vocabulary and model
    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("CaptioningTask.setup(workdir) must run first: the model's output "
                               "layer depends on the vocabulary it builds or loads.")
        return self._model

    @model.setter
    def model(self, value):
        self._model = value

    def set_tokenizer(self, tok: Tokenizer) -> None:
        self.tokenizer = tok
        self._model = self.build_model()

    def build_model(self) -> nn.Module:
        return build_captioner(self.config.model, self.tokenizer.vocab_size, self.max_len - 1,
                               compute_dtype(self.config), self.config.decode.get("kv_cache", None))

    def setup(self, workdir: str) -> None:
        path = os.path.join(workdir, VOCAB_FILE)
        if os.path.exists(path):
            tok = Tokenizer.load(path)
            log.info("Loaded the vocabulary (%d ids) from %s", tok.vocab_size, path)
        else:
            ckpt_dir = os.path.join(workdir, "checkpoints")
            if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
                raise VocabularyError(
                    f"{ckpt_dir} holds checkpoints but {path} is missing: the checkpoints were trained with that "
                    "vocabulary. Put it back, or use a new --workdir.")
            caps = self.config.captions
            tok = Tokenizer.build(self.train_captions(), min_count=int(caps.get("min_count", 1)),
                                  max_words=int(caps.get("max_words", 0)))
            if jax.process_index() == 0:
                os.makedirs(workdir, exist_ok=True)
                tok.save(path)
            log.info("Built a vocabulary of %d ids from the training captions -> %s", tok.vocab_size, path)
        self.set_tokenizer(tok)

    def train_captions(self) -> list[str]:
        """Every reference caption of the training split (all processes read all of it: same vocabulary)."""
        import tensorflow_datasets as tfds  # deferred on purpose: heavy, only when the vocabulary is built

        cfg = self.config.data
        builder = data_pipeline.get_builder(cfg)
        split = cfg.get("train_split", "train")
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders=tfds.decode.PartialDecoding({"captions": True}))
        out: list[str] = []
        for texts in ds.map(caption_texts).as_numpy_iterator():
            out.extend(t.decode("utf-8") for t in np.asarray(texts).reshape(-1))
        return out

    def references(self, split: str | None = None) -> dict[int, list[str]]:
        """``image_id -> [reference captions]`` of the eval split, read on the host."""
        cfg = self.config.data
        builder = data_pipeline.get_builder(cfg)
        split = split or cfg.get("eval_split", "test")
        # Decoded like the evaluation pipeline reads it (tfds' mock data differs under partial decoding).
        ds = builder.as_dataset(split=split, shuffle_files=False)
        refs: dict[int, list[str]] = {}
        for i, texts in ds.map(lambda ex: (image_id(ex), caption_texts(ex))).as_numpy_iterator():
            refs[int(i)] = [t.decode("utf-8") for t in np.asarray(texts).reshape(-1)]
        return refs

    # ---------------------------------------------------------------- tf.data ops
    def pp_ops(self, train: bool):
        tok, max_len, num_refs = self.tokenizer, self.max_len, self.num_refs
        if tok is None:
            raise RuntimeError("CaptioningTask.setup must run before pp_ops (the vocabulary).")

        def op(ex):
            import tensorflow as tf  # deferred on purpose: runs inside tf.data only

            texts = caption_texts(ex)
            n = tf.shape(texts)[0]
            out = {k: v for k, v in ex.items() if k.startswith("_")}
            out["image"] = ex["image"]
            if train:
                i = tf.random.stateless_uniform([], seed=example_seed(ex), minval=0, maxval=tf.maximum(n, 1), dtype=tf.int32)
                text = tf.concat([texts, [""]], axis=0)[i]  # no caption at all -> "<bos> <eos>"
                out["tokens"] = tf.ensure_shape(tok.tf_encode(text, max_len), [max_len])
            else:
                ids = tok.tf_encode(texts[:num_refs], max_len)
                ids = tf.pad(ids, [[0, num_refs - tf.shape(ids)[0]], [0, 0]], constant_values=tok.pad_id)
                out["tokens"] = tf.ensure_shape(ids, [num_refs, max_len])
                out["image_id"] = image_id(ex)
            return out

        return [op]

    def _final_op(self):
        """Eval op for the final evaluation: also keeps the items (classes, colours, boxes) when present."""
        (base,) = self.pp_ops(train=False)

        def op(ex):
            out = base(ex)
            for k in ("labels", "colours", "boxes", "num_items"):
                if k in ex:
                    out[k] = ex[k]
            return out

        return op

    # ---------------------------------------------------------------- model plumbing
    def dummy_batch(self, batch_size: int) -> dict[str, jax.Array]:
        h, w, c = self.config.data.image_shape
        return {"image": jnp.zeros((batch_size, h, w, c), jnp.float32),
                "tokens": jnp.zeros((batch_size, self.max_len), jnp.int32)}

    def model_inputs(self, batch):
        tokens = batch["tokens"]
        if tokens.ndim == 3:
            tokens = tokens[:, 0]
        return (batch["image"], tokens[:, :-1])

    def init(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, batch["image"], batch["tokens"][:, :-1],
                               train=False)

    def losses(self, variables, batch, *, train, rng):
        model = self.model
        rngs = {"dropout": rng} if rng is not None else {}
        if self.mutable_collections and train:
            memory, updates = model.apply(variables, batch["image"], train=True, rngs=rngs, method=model.encode,
                                          mutable=list(self.mutable_collections))
        else:
            memory, updates = model.apply(variables, batch["image"], train=train, rngs=rngs, method=model.encode), {}
        tokens = batch["tokens"]
        refs = tokens.shape[1] if tokens.ndim == 3 else 0
        if refs:  # every reference of an eval example: decode each against the same image memory
            memory = jax.tree.map(lambda x: jnp.repeat(x, refs, axis=0), memory)
            tokens = tokens.reshape((-1, tokens.shape[-1]))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        drop_rngs = {"dropout": jax.random.fold_in(rng, 1)} if rng is not None else {}
        logits, aux = model.apply(variables, memory, inputs, train=train, rngs=drop_rngs,
                                  method=model.decode_teacher)
        mask = (targets != self.tokenizer.pad_id).astype(jnp.float32)
        smoothing = float(self.config.get("label_smoothing", 0.0)) if train else 0.0
        onehot = jax.nn.one_hot(targets, logits.shape[-1])
        if smoothing:
            onehot = optax.smooth_labels(onehot, smoothing)
        ce = optax.softmax_cross_entropy(logits, onehot)
        ntok = jnp.sum(mask, axis=-1)
        denom = jnp.maximum(ntok, 1.0)
        ce_sum = jnp.sum(ce * mask, axis=-1)
        metrics = {"nll": ce_sum / denom,
                   "token_accuracy": jnp.sum((jnp.argmax(logits, -1) == targets) * mask, axis=-1) / denom}
        total = ce_sum
        if "attention" in aux:
            alpha = aux["attention"]  # [B, T, L]
            coverage = jnp.sum(alpha * mask[..., None], axis=1)  # Σ_t m_t α_ti
            reg = jnp.sum((1.0 - coverage) ** 2, axis=-1)
            metrics["attention_reg"] = reg
            metrics["gate"] = jnp.sum(aux["gate"] * mask, axis=-1) / denom
            if self.reg:
                total = total + self.reg * reg
        loss = total / denom
        if refs:  # mean over the example's real references
            valid = (ntok > 0).reshape(-1, refs).astype(jnp.float32)
            nvalid = jnp.maximum(valid.sum(-1), 1.0)
            per_example = lambda v: jnp.sum(v.reshape(-1, refs) * valid, axis=-1) / nvalid  # noqa: E731
            loss = per_example(loss)
            metrics = {k: per_example(v) for k, v in metrics.items()}
        return loss, metrics, updates

    # ---------------------------------------------------------------- evaluation helpers
    def feature_grid(self, variables: dict) -> tuple[int, int]:
        """The encoder's region grid (h, w) for the configured image shape."""
        h, w, c = self.config.data.image_shape
        model = self.model
        out = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, y: m.encoder(y, train=False)),
                             variables, jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
        return int(out.shape[1]), int(out.shape[2])

    def host_examples(self, split: str | None = None, limit: int | None = None,
                      batch_size: int | None = None):
        """Iterate (or, with ``limit``, return the first ``limit``) eval examples as flat host numpy batches."""
        cfg = self.config.data
        nd = jax.local_device_count()
        bs = int(batch_size or self.config.decode.batch_size)
        if limit is not None:
            bs = max(nd, -(-int(limit) // nd) * nd)
        it = data_pipeline.eval_iterator(cfg, global_batch_size=bs * jax.process_count(), split=split,
                                    extra_ops=(self._final_op(),))

        def flat(batch):
            return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}

        if limit is None:
            return (flat(b) for b in it)
        batch = flat(next(it))
        keep = batch["mask"] > 0
        return {k: v[keep][:limit] for k, v in batch.items()}

    def final_evaluation(self, variables: dict, config: Any, workdir: str) -> dict[str, Any]:
        """Greedy and beam captions of the eval split, scored and written (:mod:`seqvis.tasks.captioning_eval`)."""
        return captioning_eval.final_evaluation(self, variables, config, workdir)


# ============================================================================ re-evaluation


def workdir_task(workdir: str, kv_cache: bool | None = None) -> "CaptioningTask":
    """The task of a trained captioning workdir, from its ``config.json``, with its vocabulary loaded;
    ``kv_cache`` (not None) replaces ``config.decode.kv_cache`` (decoding only: the checkpoint still loads)."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("task") != "captioning":
        raise ValueError(f"{workdir} is not a captioning workdir (config.task={config.get('task')!r}).")
    if kv_cache is not None:
        config.decode.kv_cache = bool(kv_cache)
    task = CaptioningTask(config)
    task.setup(workdir)
    return task


def evaluate_workdir(workdir: str, kv_cache: bool | None = None) -> dict[str, Any]:
    """Run the final evaluation again from the newest checkpoint of a captioning workdir.

    The new values are merged into ``workdir/results.json`` (training fields are kept).
    ``kv_cache``: decode the transformer with (True) or without (False) the key/value cache;
    None keeps the workdir's ``config.decode.kv_cache``."""
    task = workdir_task(workdir, kv_cache)
    variables = restore_variables(workdir, task.config.to_dict())  # written by this config's model, or refused
    results = task.final_evaluation(variables, task.config, workdir)
    path = os.path.join(workdir, "results.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    if jax.process_index() == 0:
        captioning_eval.write_json(path, {**old, **results})
    return {**old, **results}
