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
