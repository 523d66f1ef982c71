"""config.precision: bfloat16 compute, float32 parameters / optimiser state / statistics / loss.

The HLO of a train step is read from ``jax.jit(...).lower(...)`` (the program XLA is given:
the CPU backend may later widen bfloat16 ops it cannot run natively, a TPU or GPU does not).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.errors import ConfigError
from seqvis.train import optim, step as step_lib
from seqvis.train.defaults import base_config
from seqvis.tasks.base import get_task
from test_configs import shrink_captioning, shrink_video


def _load(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


captioning_configs, video_configs = _load("captioning"), _load("video")


def _classifier(precision, model=None):
    c = base_config()
    c.model = model or dict(name="vit", variant="mu/7", width=32, depth=2, mlp_dim=64, num_heads=2)
    c.data = dict(num_classes=10, image_shape=(28, 28, 1))
    c.precision = precision
    return c


def _captioner(precision, arg):
    from seqvis.data.tokenizer import Tokenizer

    c = captioning_configs.get_config(arg)
    shrink_captioning(c)  # every layer kind at test width: the HLO's dtypes, not the size, are checked
    c.precision = precision
    c.data.image_shape = (24, 24, 3)
    c.captions.max_len = 8
    task = get_task(c)
    task.set_tokenizer(Tokenizer.build(["a red shirt on the left", "two blue bags"], min_count=1))
    return c, task


def _video(precision, temporal):
    c = video_configs.get_config(temporal)
    shrink_video(c)
    c.precision = precision
    c.data.num_frames = 4
    c.data.image_shape = (16, 16, 1)
    c.model.max_frames = 4
    return c


def _step(config, task=None, per_device=2):
    task = task or get_task(config)
    sched = optim.make_schedule(config.schedule, 1000)
    tx = optim.make_optimizer(config.optimizer, sched)
    dummy = task.dummy_batch(per_device)
    state = step_lib.create_state(task, tx, 0, dummy)
    batch = dict(jax.tree.map(np.asarray, dummy))
    batch["mask"] = np.ones((per_device,), np.float32)
    rng = np.random.RandomState(0)
    for k, v in batch.items():
        if v.dtype == np.float32 and k != "mask":
            batch[k] = rng.randn(*v.shape).astype(np.float32)
    if "tokens" in batch:
        batch["tokens"] = rng.randint(4, 10, batch["tokens"].shape).astype(np.int32)
    step = jax.jit(step_lib.global_view(step_lib.make_train_step(task, tx, sched, vary_params=False)))
    return step, state, batch


def _ops(hlo: str, op: str) -> list[str]:
    """Result/operand element types of every ``op`` in StableHLO text, e.g. ['bf16', 'f32']."""
    types = []
    for line in hlo.splitlines():
        if f"stablehlo.{op}" in line:
            sig = line.split(":")[-1]  # (operand types) -> result type
            types.append(sorted(set(re.findall(r"x(bf16|f32|f16)>", sig)) | set(re.findall(r"tensor<(bf16|f32)>", sig))))
    return types


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("model", [None, dict(name="resnet", stage_sizes=(1,), width=8, stem="small", norm="batch")],
                         ids=["vit", "resnet"])
def test_bf16_step_has_bf16_matmuls_and_float32_state(model):
    step, state, batch = _step(_classifier("bfloat16", model))
    hlo = step.lower(state, batch).as_text()
    dots, convs = _ops(hlo, "dot_general"), _ops(hlo, "convolution")
    assert dots or convs
    # every matmul and convolution of the forward and backward pass is bf16 in and out
    assert all(t == ["bf16"] for t in dots + convs), [t for t in dots + convs if t != ["bf16"]]
    assert _ops(hlo, "convolution"), "the patch embedding / ResNet convs are convolutions"
    new, metrics = step(state, batch)
    assert _dtypes(new.params) == {"float32"} and _dtypes(new.opt_state) == {"float32"}
    assert _dtypes(new.model_state) <= {"float32"}  # BatchNorm running statistics
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(metrics["loss"])
    # and the float32 default has no bf16 op at all
    step32, state32, batch32 = _step(_classifier("float32", model))
    hlo32 = step32.lower(state32, batch32).as_text()
    assert "bf16" not in hlo32
    # same model, same batch: the bf16 loss is the float32 loss to bf16 accuracy
    _, m32 = step32(state32, batch32)
    np.testing.assert_allclose(float(metrics["loss"]), float(m32["loss"]), rtol=3e-2)


def test_bf16_softmax_and_layernorm_statistics_are_float32():
    step, state, batch = _step(_classifier("bfloat16"))
    hlo = step.lower(state, batch).as_text()
    # softmax: exp(logits - max) on float32 logits; LayerNorm: rsqrt(var + eps) of float32 statistics
    for op in ("exponential", "rsqrt"):
        lines = [l for l in hlo.splitlines() if f"stablehlo.{op}" in l]
        assert lines, op
        assert all("bf16" not in l for l in lines), lines[:3]


@pytest.mark.parametrize("arg", ["show_attend_tell", "show_and_tell,vit", "transformer,vit"])
def test_captioning_step_runs_in_bf16(arg):
    config, task = _captioner("bfloat16", arg)
    step, state, batch = _step(config, task)
    hlo = step.lower(state, batch).as_text()
    dots = _ops(hlo, "dot_general")
    assert sum(t == ["bf16"] for t in dots) >= 0.9 * len(dots), dots
    new, metrics = step(state, batch)
    assert _dtypes(new.params) == {"float32"} and _dtypes(new.opt_state) == {"float32"}
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("temporal", ["lstm", "transformer"])
def test_video_step_runs_in_bf16(temporal):
    step, state, batch = _step(_video("bfloat16", temporal))
    hlo = step.lower(state, batch).as_text()
    dots, convs = _ops(hlo, "dot_general"), _ops(hlo, "convolution")
    assert convs and all(t == ["bf16"] for t in convs)
    assert sum(t == ["bf16"] for t in dots) >= 0.9 * len(dots), dots
    new, metrics = step(state, batch)
    assert _dtypes(new.params) == {"float32"} and np.isfinite(float(metrics["loss"]))


def test_unknown_precision_and_conflicting_model_dtype_are_config_errors():
    with pytest.raises(ConfigError, match=r"config.precision='fp16'.*bfloat16"):
        get_task(_classifier("fp16"))
    c = _classifier("float32")
    c.model["dtype"] = "bfloat16"
    with pytest.raises(ConfigError, match=r"config.model.dtype.*config.precision"):
        get_task(c)
