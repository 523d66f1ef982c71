"""The parallel train step: device count, drivers, accumulation, the non-finite guard, and
the update itself against a hand computation.

These use the real step on synthetic batches (no input pipeline), with the 8 fake CPU
devices from conftest: the real classification task for the properties, and a linear model
whose SGD steps (clipping, weight decay, momentum, padding mask) are worked in numpy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqvis.train import optim, step as step_lib
from seqvis.train.defaults import base_config
from seqvis.tasks.base import Task, get_task

GLOBAL_BATCH = 16


def tiny_config(**model):
    c = base_config()
    c.data = ml_collections.ConfigDict(dict(num_classes=4, image_shape=(8, 8, 1)))
    c.model = dict(name="vit", variant="mu/4", depth=2, head_zero_init=False, dropout_rate=0.1) | model
    c.schedule.update(name="constant", base_lr=0.1, warmup_steps=0)
    # SGD: Adam's update m/sqrt(v) amplifies float round-off in near-zero gradients, which
    # would make "same parameters" an ill-conditioned comparison.
    c.optimizer.update(name="sgd", momentum=0.9, weight_decay=1e-4)
    return c


def setup(config, accum=1):
    task = get_task(config)
    sched = optim.make_schedule(config.schedule, 100)
    tx = optim.make_optimizer(config.optimizer, sched)
    state = step_lib.create_state(task, tx, 0, task.dummy_batch(2))
    return task, tx, sched, jax.device_get(state)


def batches(n_steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(GLOBAL_BATCH, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 4, GLOBAL_BATCH).astype(np.int32),
             "mask": np.ones(GLOBAL_BATCH, np.float32)} for _ in range(n_steps)]


def run(driver_name, n_devices, data, config=None, accum=1):
    config = config or tiny_config(dropout_rate=0.0)
    task, tx, sched, state = setup(config)
    train_step = step_lib.make_train_step(task, tx, sched, accum)
    if driver_name == "pmap":
        devices = jax.local_devices()[:n_devices]
        f = jax.pmap(train_step, axis_name=step_lib.AXIS, devices=devices)
        s = step_lib.replicate(state, devices)
        for b in data:
            s, m = f(s, jax.tree.map(lambda x: x.reshape((n_devices, -1) + x.shape[1:]), b))
        return jax.device_get(jax.tree.map(lambda x: x[0], s)), jax.device_get(jax.tree.map(lambda x: x[0], m))
    mesh = Mesh(np.asarray(jax.devices()[:n_devices]), (step_lib.AXIS,))
    f = jax.jit(jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(step_lib.AXIS)), out_specs=(P(), P())))
    s = state
    for b in data:
        s, m = f(s, b)
    return jax.device_get(s), jax.device_get(m)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_eight_devices_equal_one_device():
    data = batches(3)
    s1, m1 = run("pmap", 1, data)
    s8, m8 = run("pmap", 8, data)
    assert int(s1.step) == int(s8.step) == 3
    assert_trees_close(s1.params, s8.params, rtol=2e-5, atol=2e-6)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5)
    # Parameters really moved (the comparison is not between two initial states).
    _, _, _, s0 = setup(tiny_config(dropout_rate=0.0))
    assert not np.allclose(jax.tree.leaves(s0.params)[0], jax.tree.leaves(s8.params)[0])


def test_pmap_driver_equals_mesh_driver():
    data = batches(3, seed=1)
    sp, _ = run("pmap", 4, data)
    sm, _ = run("mesh", 4, data)
    assert_trees_close(sp.params, sm.params)


def test_gradient_accumulation_equals_big_batch():
    data = batches(2, seed=2)
    big, _ = run("pmap", 2, data, accum=1)
    acc, _ = run("pmap", 2, data, accum=4)
    assert_trees_close(big.params, acc.params, rtol=2e-5, atol=2e-6)


def test_resnet_batch_stats_are_averaged_over_devices():
    config = tiny_config()
    config.model = dict(name="resnet", depth=18, stage_sizes=(1, 1), width=4, stem="small", norm="batch")
    config.data.image_shape = (8, 8, 1)
    data = batches(1, seed=3)
    s1, _ = run("pmap", 1, data, config=config)
    s2, _ = run("pmap", 2, data, config=config)
    # Running means are linear in the per-device batch means, so their average over devices
    # equals the single-device value; running variances are not exactly (so only means).
    flat1 = jax.tree_util.tree_flatten_with_path(s1.model_state)[0]
    flat2 = dict(jax.tree_util.tree_flatten_with_path(s2.model_state)[0])
    means = [(p, v) for p, v in flat1 if "mean" in jax.tree_util.keystr(p)]
    assert means
    for p, v in means:
        np.testing.assert_allclose(v, flat2[p], rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_freezes_state_and_records_step():
    config = tiny_config(dropout_rate=0.0)
    data = batches(4, seed=4)
    data[2]["image"][0, 0, 0, 0] = np.nan
    s, m = run("pmap", 2, data, config=config)
    good, _ = run("pmap", 2, data[:2], config=config)
    assert int(m["bad_step"]) == 2
    assert int(s.step) == 2  # the bad step and the one after it were not applied
    assert_trees_close(s.params, good.params, rtol=0, atol=0)


def test_dropout_keys_differ_per_device():
    # The real step, dropout on: two devices holding the same examples must draw different
    # masks, so their mean gradient differs from the one device that holds those examples
    # alone (equal keys would give equal gradients). Without dropout the two runs agree.
    x = batches(1, seed=5)[0]
    half = {k: v[:GLOBAL_BATCH // 2] for k, v in x.items()}
    twice = {k: np.concatenate([v, v]) for k, v in half.items()}
    for rate in (0.0, 0.5):
        one, _ = run("pmap", 1, [half], config=tiny_config(dropout_rate=rate))
        two, _ = run("pmap", 2, [twice], config=tiny_config(dropout_rate=rate))
        if rate == 0.0:
            assert_trees_close(one.params, two.params)
        else:
            assert not np.allclose(jax.tree.leaves(one.params)[0], jax.tree.leaves(two.params)[0])


# ============================================================================ against a hand computation


class LinearTask(Task):
    """y = w·x + b with the squared error ½(y - t)²: a model whose gradient is written by hand below."""

    def build_model(self):
        return nn.Dense(1, kernel_init=nn.initializers.normal(1.0), bias_init=nn.initializers.constant(0.3))

    def dummy_batch(self, batch_size):
        return {"x": jnp.zeros((batch_size, 3)), "t": jnp.zeros((batch_size,))}

    def init(self, rng, batch):
        return self.model.init(rng, batch["x"])

    def losses(self, variables, batch, *, train, rng):
        y = self.model.apply(variables, batch["x"])[:, 0]
        return 0.5 * (y - batch["t"]) ** 2, {}, {}


def _hand_sgd(w, b, steps, lr, momentum, wd, clip):
    """The mean squared error of the unmasked examples, its gradient clipped to global norm ``clip``,
    plus ``wd`` times the kernel (not the bias), through SGD with momentum; numpy float64."""
    m_w, m_b, losses = np.zeros_like(w), 0.0, []
    for x, t, mask in steps:
        keep = mask > 0
        x, t = x[keep].astype(np.float64), t[keep].astype(np.float64)
        err = x @ w + b - t  # [n]
        losses.append(float(np.mean(0.5 * err ** 2)))
        g_w, g_b = x.T @ err / len(t), float(np.mean(err))
        norm = np.sqrt(np.sum(g_w ** 2) + g_b ** 2)
        if norm > clip:
            g_w, g_b = g_w * clip / norm, g_b * clip / norm
        g_w = g_w + wd * w  # the bias is not decayed (skip_decay 'bias')
        m_w, m_b = g_w + momentum * m_w, g_b + momentum * m_b
        w, b = w - lr * m_w, b - lr * m_b
    return w, b, losses


@pytest.mark.parametrize("n_devices", [1, 4])
def test_sgd_steps_of_a_linear_model_match_a_hand_computation(n_devices):
    config = base_config()
    config.schedule.update(name="constant", base_lr=0.1, warmup_steps=0)
    config.optimizer.update(name="sgd", momentum=0.9, weight_decay=0.05, grad_clip_norm=2.0)
    task = LinearTask(config)
    sched = optim.make_schedule(config.schedule, 10)
    tx = optim.make_optimizer(config.optimizer, sched)
    state = jax.device_get(step_lib.create_state(task, tx, 0, task.dummy_batch(2)))
    w0 = np.asarray(state.params["kernel"], np.float64)[:, 0]
    b0 = float(state.params["bias"][0])

    rng = np.random.default_rng(7)
    data = []
    for _ in range(3):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        t = (3.0 * rng.normal(size=8)).astype(np.float32)  # far from the init: the first gradient is clipped
        mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
        x[~mask.astype(bool)] = 1e3  # padding: must not count
        data.append((x, t, mask))
    want_w, want_b, want_losses = _hand_sgd(w0, b0, data, lr=0.1, momentum=0.9, wd=0.05, clip=2.0)

    devices = jax.local_devices()[:n_devices]
    f = jax.pmap(step_lib.make_train_step(task, tx, sched), axis_name=step_lib.AXIS, devices=devices)
    s = step_lib.replicate(state, devices)
    losses, norms = [], []
    for x, t, mask in data:
        batch = {"x": x, "t": t, "mask": mask}
        s, m = f(s, jax.tree.map(lambda a: a.reshape((n_devices, -1) + a.shape[1:]), batch))
        losses.append(float(m["loss"][0]))
        norms.append(float(m["grad_norm"][0]))
    s = jax.device_get(jax.tree.map(lambda a: a[0], s))
    assert int(s.step) == 3
    assert norms[0] > 2.0  # clipping was exercised
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.params["kernel"])[:, 0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(s.params["bias"][0]), want_b, rtol=1e-5, atol=1e-6)
