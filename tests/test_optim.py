"""Schedules against their formulas; weight-decay mask; optimiser errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from seqvis.train import optim


def sched(**kw):
    return ml_collections.ConfigDict(dict(name="cosine", base_lr=0.1, warmup_steps=10, end_lr=0.0, timescale=100) | kw)


def test_cosine_with_warmup_matches_formula():
    f = optim.make_schedule(sched(end_lr=0.01), total_steps=110)
    for t in [0, 5, 10, 35, 60, 109, 110]:
        if t < 10:
            ref = 0.1 * t / 10
        else:
            u = (t - 10) / 100
            ref = 0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * u))
        assert float(f(t)) == pytest.approx(ref, rel=1e-5, abs=1e-8), t


def test_linear_and_constant_and_rsqrt():
    lin = optim.make_schedule(sched(name="linear", end_lr=0.0), total_steps=110)
    assert float(lin(60)) == pytest.approx(0.05, rel=1e-5)
    const = optim.make_schedule(sched(name="constant", warmup_steps=0), total_steps=5)
    assert float(const(3)) == pytest.approx(0.1)
    rs = optim.make_schedule(sched(name="rsqrt", warmup_steps=0, timescale=100), total_steps=1000)
    assert float(rs(50)) == pytest.approx(0.1)  # flat until the timescale
    assert float(rs(400)) == pytest.approx(0.1 * math.sqrt(100 / 400), rel=1e-5)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"config.schedule.name='cosin'"):
        optim.make_schedule(sched(name="cosin"), 100)
    with pytest.raises(ValueError, match="warmup_steps=10 must be smaller"):
        optim.make_schedule(sched(), 10)


def test_decay_mask_skips_bias_norm_embeddings():
    params = {"Dense_0": {"kernel": 1, "bias": 2}, "LayerNorm_0": {"scale": 3, "bias": 4},
              "posembed_input": {"pos_embedding": 5}, "cls": 6, "Embed_0": {"embedding": 7}}
    m = optim.decay_mask(params, ("bias", "norm", "embedding"))
    assert m == {"Dense_0": {"kernel": True, "bias": False}, "LayerNorm_0": {"scale": False, "bias": False},
                 "posembed_input": {"pos_embedding": False}, "cls": False, "Embed_0": {"embedding": False}}
    m2 = optim.decay_mask(params, ("bias",))
    assert m2["LayerNorm_0"]["scale"] is True and m2["cls"] is True
    with pytest.raises(ValueError, match="skip_decay has unknown kinds"):
        optim.decay_mask(params, ("biases",))


def test_adamw_decays_only_masked_leaves():
    params = {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}
    cfg = ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.5, skip_decay=("bias",), grad_clip_norm=0.0))
    tx = optim.make_optimizer(cfg, optax.constant_schedule(0.1))
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(upd["kernel"], -0.1 * 0.5 * 1.0, rtol=1e-6)  # -lr * wd * p
    np.testing.assert_allclose(upd["bias"], 0.0)


def test_clipping_bounds_global_norm():
    params = {"w": jnp.zeros((4,))}
    cfg = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0))
    tx = optim.make_optimizer(cfg, optax.constant_schedule(1.0))
    g = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], [-0.6, -0.8, 0, 0], rtol=1e-6)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match=r"config.optimizer.name='adam'"):
        optim.make_optimizer(ml_collections.ConfigDict(dict(name="adam")), optax.constant_schedule(1.0))
