"""Every trainer field with its default: configs start from :func:`base_config` and override.

Durations are in steps (``total_steps``) or epochs (``num_epochs``); exactly one is used
(``total_steps`` wins when both are set).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0

    c.model = ml_collections.ConfigDict()  # model kwargs; `name` picks the module

    c.data = ml_collections.ConfigDict()  # see seqvis.data.presets

    c.batch_size = 256  # global, over all devices and hosts
    c.eval_batch_size = 256
    c.total_steps = 0
    c.num_epochs = 0.0
    c.grad_accum_steps = 1
    c.label_smoothing = 0.0

    # Formulas and semantics of every optimizer / schedule field: seqvis/train/optim.py's docstring.
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False,
        weight_decay=0.0, skip_decay=("bias", "norm", "embedding"), grad_clip_norm=1.0,
        mu_dtype="float32",  # or "bfloat16": the first moment (adamw, adafactor_momentum, sgd momentum)
        lr_mults=(), wd_mults=(),  # ((regex, multiplier), ...) on '/'-joined parameter names; first match wins
        decoupled_wd=False,  # True: decay scaled by the schedule's shape lr(t)/base_lr only (big_vision)
        adafactor_decay_rate=0.8, min_dim_size_to_factor=32, adafactor_eps=1e-30))  # adafactor_momentum only
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine", base_lr=1e-3, warmup_steps=0, end_lr=0.0, timescale=10_000,
        horizon_steps=0,  # cosine/linear: the step the decay ends at (0: total steps); set it to branch cooldowns
        cooldown_steps=0, cooldown_fraction=0.0))  # linear cooldown to 0 over the last steps (one of the two)

    c.parallel = "pmap"  # or "mesh" (jax.shard_map over a 1-D device mesh), or "fsdp" (sharded state)
    c.fsdp_size = 0  # parallel="fsdp": devices each parameter is sharded over (0 = all; a divisor of the count)
    c.precision = "float32"  # or "bfloat16": bf16 matmuls/convs, float32 params, optimiser state, stats, loss
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=1, process_id=0, cpu_collectives=""))

    c.init_from = ""  # a seqvis workdir/checkpoint, an official ViT .npz or a timm .safetensors to start from
    c.init_from_allow_partial = False  # True: model parameters missing from init_from keep their init

    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0: evaluate only at the end
    # Named evaluators, name -> {type: classification | fewshot, dataset, split, pp, every_steps, ...}; fields below,
    # their meaning in seqvis.train.evaluators. With no classification evaluator the run evaluates eval_split (eval/).
    c.evals = ml_collections.ConfigDict()  # entries: evaluator(kind, **fields) below
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3  # >= 1
    c.checkpoint_steps = ()  # steps also saved and never deleted by keep_checkpoints (cooldown branch points)
    # Start a new workdir from the checkpoint at `step` of another run's workdir (train state, optimiser state
    # and data position), e.g. to branch a cooldown off a longer run: see seqvis/train/branch.py.
    c.branch_from = ml_collections.ConfigDict(dict(workdir="", step=0))
    c.resume = ""  # "allow_data_change": resume although batch size, seed, data or process count changed (logged)
    c.async_checkpointing = True
    c.count_flops = True
    c.tensorboard = True
    c.progress = True
    return c


_BASE: ml_collections.ConfigDict | None = None


def value(config, name: str):
    """``config.<name>``, or its default from :func:`base_config` when the config leaves it out (a config
    written by hand rather than started from base_config); the trainer reads its fields this way, so a
    default is defined here only."""
    global _BASE
    if name in config and config[name] is not None:
        return config[name]
    if _BASE is None:
        _BASE = base_config()
    return _BASE[name]


# The fields of each evaluator type (config.evals.NAME) and their defaults; a type (int, float) stands for "unset"
# (a typed placeholder, so the command line can still set it), as does "". Unset fields come from the dataset or
# the config; what each field means: seqvis.train.evaluators.
_EVAL_COMMON = dict(type="", dataset="", pp="", every_steps=int, batch_size=int)
EVAL_FIELDS = {
    # dataset/split: default config.data and its eval_split; every_steps: config.eval_every_steps; batch_size:
    # config.eval_batch_size; label_key: 'label', or a multi-hot vector (ReaL); main: its results are results.json's
    # unprefixed headline numbers.
    "classification": dict(_EVAL_COMMON, split="", label_key="label", main=False),
    # train_split/split: the dataset's train_split and eval_split; seeds 0..seeds-1; l2_reg as big_vision's
    # few-shot probes; representation: 'pre_logits' (the head's input) or a module path; key: the name in
    # fewshot/<key>/<k>shot (default: the dataset's); num_classes: default from the dataset's 'label' feature.
    "fewshot": dict(_EVAL_COMMON, train_split="", split="", shots=(1, 5, 10, 25), seeds=3, l2_reg=2.0 ** 10,
                    representation="pre_logits", key="", num_classes=int),
}


def evaluator(kind: str, **fields) -> ml_collections.ConfigDict:
    """One entry of ``config.evals`` of type ``kind`` with every field of that type present (at its default unless
    given), so that ``--config.evals.NAME.FIELD=value`` can override any of them."""
    if kind not in EVAL_FIELDS:
        raise ValueError(f"evaluator type {kind!r} is unknown; use one of {sorted(EVAL_FIELDS)}.")
    unknown = sorted(set(fields) - set(EVAL_FIELDS[kind]))
    if unknown:
        raise ValueError(f"evaluator fields {unknown} are unknown for type {kind!r}; its fields: "
                         f"{sorted(EVAL_FIELDS[kind])}.")
    out = {k: fields.get(k, default) for k, default in EVAL_FIELDS[kind].items()}
    out = {k: ml_collections.config_dict.placeholder(v) if isinstance(v, type) else v for k, v in out.items()}
    out["type"] = kind
    return ml_collections.ConfigDict(out)
