"""The train and eval steps, written once per device, and the two ways to map them.

Each step sees one device's share of the batch and talks to the others only through
collectives over the named axis ``'batch'``:

    grads = Σ_devices ∇ Σ_i mask_i·loss_i  /  Σ_devices Σ_i mask_i     (psum / psum)

so the update is that of the mean loss over the global batch, whatever the device count.
Gradient accumulation splits the device batch into ``accum_steps`` micro-batches scanned
in sequence and summed the same way, so k micro-batches give the update of one big batch.

A non-finite loss or gradient leaves the state untouched and records the step in
``bad_step``; the state then stays frozen, so the host can stop at its next check with
the last good parameters (no per-step host sync is needed).

Drivers: ``pmap`` (state replicated with a leading device axis), ``mesh``
(``jax.shard_map`` over a 1-D mesh, state replicated as one global array) and ``fsdp``
(parameters and optimiser state sharded over a ``('data', 'fsdp')`` mesh by the rules of
:mod:`seqvis.train.sharding`; one global-view program that XLA partitions). All three run
the same step function and give the same parameters. Under ``fsdp`` the per-device function
runs once on the whole global batch (``jax.vmap`` over a named axis of size 1, so its
collectives are identities and BatchNorm statistics are those of the global batch, as
pmap's synced statistics are); its dropout keys are those of device 0 of a pmap run, so
only runs with dropout differ in their random draws. Each driver also maps a per-device
function with per-example outputs the same way (``per_example``: the evaluators' features and
per-example metrics).

Over 400 lines on purpose: the step and its three drivers (pmap, mesh, fsdp) share the train state,
the step function and its global metrics, and read best side by side; much of the file is the docstrings
that say what each driver guarantees.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqvis.train import sharding as sharding_lib

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    model_state: Any  # mutable collections other than params, e.g. {'batch_stats': ...}
    rng: jax.Array  # uint32[2] base key; per-step keys are fold_in(fold_in(rng, step), device)
    bad_step: jax.Array  # int32 scalar: -1, or the first step whose loss/gradient was not finite


def create_state(task, tx: optax.GradientTransformation, seed: int, dummy_batch: dict) -> TrainState:
    """Initialise parameters and optimiser state (on the host's default device)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = jax.jit(task.init)(init_rng, dummy_batch)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    model_state = {k: v for k, v in variables.items() if k in task.mutable_collections}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state, rng=train_rng, bad_step=-jnp.ones((), jnp.int32))


def _split_micro(batch: dict, k: int) -> dict:
    return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def make_train_step(task, tx: optax.GradientTransformation, schedule: Callable, accum_steps: int = 1,
                    *, vary_params: bool = True):
    """Per-device ``step(state, batch) -> (state, metrics)``; metrics are global sums/means.

    ``vary_params`` marks the parameters device-varying for ``shard_map`` (see below);
    the ``fsdp`` driver (no shard_map) builds its step with ``vary_params=False``."""

    def loss_fn(params, model_state, micro, rng):
        variables = {"params": params, **model_state}
        loss, metrics, updates = task.losses(variables, micro, train=True, rng=rng)
        m = micro["mask"].astype(jnp.float32)
        sums = {k: jnp.sum(v * m) for k, v in metrics.items()}
        sums["loss"] = jnp.sum(loss * m)
        return sums["loss"], (updates, sums, jnp.sum(m))

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
        # Per-device gradients: mark the replicated params as device-varying, otherwise
        # shard_map's autodiff would already sum them over devices (and psum twice).
        params = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to="varying"), state.params) \
            if vary_params else state.params
        if accum_steps == 1:
            grads, (updates, sums, count) = grad_fn(params, state.model_state, batch, rng)
            model_state = {**state.model_state, **updates}
        else:
            micro = _split_micro(batch, accum_steps)

            def body(carry, xs):
                g_acc, s_acc, c_acc, ms = carry
                mb, i = xs
                g, (upd, s, c) = grad_fn(params, ms, mb, jax.random.fold_in(rng, i))
                add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
                return (add(g_acc, g), add(s_acc, s), c_acc + c, {**ms, **upd}), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            _, (_, s0, _) = jax.eval_shape(grad_fn, params, state.model_state,
                                           jax.tree.map(lambda x: x[0], micro), rng)
            zeros_s = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), s0)
            (grads, sums, count, model_state), _ = jax.lax.scan(
                body, (zeros_g, zeros_s, jnp.zeros((), jnp.float32), state.model_state),
                (micro, jnp.arange(accum_steps)))

        count = jax.lax.psum(count, AXIS)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: jax.lax.psum(g, AXIS) / denom, grads)
        sums = jax.lax.psum(sums, AXIS)
        model_state = jax.lax.pmean(model_state, AXIS)

        new_updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, new_updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        ok = finite & (state.bad_step < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + ok.astype(jnp.int32),
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            model_state=keep(model_state, state.model_state),
            bad_step=jnp.where(~finite & (state.bad_step < 0), state.step, state.bad_step),
        )
        metrics = {k: v / denom for k, v in sums.items()}
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step), count=count,
                       bad_step=new_state.bad_step)
        return new_state, metrics

    return step


def make_eval_step(task):
    """Per-device ``eval(state, batch) -> sums``: masked sums of loss and metrics, and the count."""

    def step(state: TrainState, batch: dict):
        variables = {"params": state.params, **state.model_state}
        loss, metrics, _ = task.losses(variables, batch, train=False, rng=None)
        m = batch["mask"].astype(jnp.float32)
        sums = {k: jnp.sum(v * m) for k, v in metrics.items()}
        sums["loss"] = jnp.sum(loss * m)
        sums["count"] = jnp.sum(m)
        return jax.lax.psum(sums, AXIS)

    return step


# ---------------------------------------------------------------------------- drivers


def replicate(tree: Any, devices) -> Any:
    """One copy of every leaf per device, stacked on a leading axis, laid out as pmap wants."""
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))  # as pmap outputs it
    n = len(devices)
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)), sharding), tree)


def local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array ``[global_batch, ...]`` (all of them with one
    process), in the order of its local batch."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:  # a row block replicated over other mesh axes appears once
        if (s.index[0].start or 0) not in seen:
            seen.add(s.index[0].start or 0)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)


class PmapDriver:
    """State replicated along a leading device axis; batches ``[local_devices, B, ...]``."""

    name = "pmap"

    def __init__(self, train_step, eval_step):
        self.devices = jax.local_devices()
        self.batch_sharding = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS))
        self._train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,))
        self._eval = jax.pmap(eval_step, axis_name=AXIS)

    vary_params = True

    def create_state(self, init_fn):
        return jax.device_get(init_fn())  # host arrays; put_state replicates them

    def put_state(self, state):
        return replicate(state, self.devices)

    def checkpoint_state(self, state):
        return self.get_state(state)

    def restore_target(self, state):
        return state

    def get_state(self, state):
        """One copy of the state as host numpy arrays.

        Read from this process's first device buffer: no device computation, so no
        collective that every process would have to join in the same order (slicing the
        global array ``x[0]`` can deadlock with several processes).
        """
        def first(x):
            local = np.asarray(x.addressable_data(0))
            return local[0] if local.ndim == x.ndim else local

        return jax.tree.map(first, state)

    def put_batch(self, batch):
        # Same sharding (mesh axis name included) as pmap gives its outputs: a mismatch
        # between state and batch layouts costs a recompile on the second step.
        return jax.device_put(batch, self.batch_sharding)

    def train(self, state, batch):
        return self._train(state, batch)  # metrics keep their device axis until fetched

    def evaluate(self, state, batch):
        return self._eval(state, batch)

    def per_example(self, fn):
        """``fn(state, batch) -> {name: [B, ...]}`` (per device, like the eval step) compiled over the local
        devices; the callable returns host arrays ``[local_devices * B, ...]`` in the batch's order."""
        mapped = jax.pmap(fn, axis_name=AXIS)

        def run(state, batch):
            return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]),
                                jax.device_get(mapped(state, batch)))

        return run

    def fetch(self, metrics):
        """Device metrics -> host floats. (Slicing on device would cost a dispatch per leaf per step.)"""
        return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(metrics))


class MeshDriver:
    """``jax.shard_map`` over a 1-D mesh ``('batch',)`` of all devices; state fully replicated."""

    name = "mesh"

    def __init__(self, train_step, eval_step):
        self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        smap = lambda f, outs: jax.shard_map(f, mesh=self.mesh, in_specs=(P(), P(AXIS)),  # noqa: E731
                                             out_specs=outs)
        self._train = jax.jit(smap(train_step, (P(), P())), donate_argnums=(0,))
        self._eval = jax.jit(smap(eval_step, P()))

    vary_params = True

    def create_state(self, init_fn):
        return jax.device_get(init_fn())

    def put_state(self, state):
        return jax.device_put(state, self.replicated)

    def checkpoint_state(self, state):
        return self.get_state(state)

    def restore_target(self, state):
        return state

    def get_state(self, state):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)

    def put_batch(self, batch):
        # [local_devices, B, ...] -> one global array sharded over the mesh (also multi-host).
        def put(x):
            local = x.reshape((-1,) + x.shape[2:])
            return jax.make_array_from_process_local_data(self.sharded, local)

        return jax.tree.map(put, batch)

    def train(self, state, batch):
        return self._train(state, batch)

    def evaluate(self, state, batch):
        return self._eval(state, batch)

    def per_example(self, fn):
        """As :meth:`PmapDriver.per_example`: ``fn`` under ``shard_map``, outputs sharded over the batch."""
        mapped = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))
        return lambda state, batch: jax.tree.map(local_rows, mapped(state, batch))

    def fetch(self, metrics):
        return jax.tree.map(np.asarray, jax.device_get(metrics))


def global_view(per_device_step):
    """Run a per-device step (collectives over ``'batch'``) on the whole global batch.

    ``jax.vmap`` with the axis named ``'batch'`` and of size 1: psum/pmean/axis_index are
    then identities, so the result is the step of one device holding the global batch."""

    def step(state, batch):
        one = jax.tree.map(lambda x: x[None], batch)
        out = jax.vmap(per_device_step, in_axes=(None, 0), axis_name=AXIS, axis_size=1)(state, one)
        return jax.tree.map(lambda x: x[0], out)

    return step


class FsdpDriver:
    """Parameters, optimiser and model state sharded over a ``('data', 'fsdp')`` mesh (ZeRO-3-like).

    ``jax.jit`` of the global-view step with the state's shardings as in- and output
    shardings (the state is donated, so it is updated in place shard by shard); batches are
    sharded over both mesh axes. Checkpoints hold the sharded arrays (each process writes
    its shards) and restore onto any device count (:meth:`restore_target`).
    """

    name = "fsdp"
    vary_params = False

    def __init__(self, train_step, eval_step, fsdp_size: int = 0, rules=None,
                 min_shard_elements: int = sharding_lib.MIN_SHARD_ELEMENTS, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        self.fsdp_size = len(devices) if not fsdp_size or fsdp_size <= 0 else int(fsdp_size)
        self.mesh = sharding_lib.make_mesh(self.fsdp_size, devices)
        self.rules = tuple(tuple(r) for r in (rules or sharding_lib.DEFAULT_RULES))
        self.min_shard_elements = int(min_shard_elements)
        self.batch_sharding = NamedSharding(self.mesh, P(sharding_lib.BATCH_AXES))
        self.replicated = NamedSharding(self.mesh, P())
        self._train_step, self._eval_step = global_view(train_step), global_view(eval_step)
        self._jitted: dict = {}

    # ---- shardings
    def state_sharding(self, state) -> Any:
        """NamedShardings for a state (arrays or ShapeDtypeStructs) under the rules."""
        specs = sharding_lib.state_specs(state, self.fsdp_size, self.rules, self.min_shard_elements)
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda s: isinstance(s, P))

    def abstract(self, state) -> Any:
        """ShapeDtypeStructs carrying the shardings (for AOT lowering and sharded restore)."""
        sh = self.state_sharding(state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, sh)

    def restore_target(self, state) -> Any:
        return self.abstract(state)

    def jitted(self, state):
        """``(train, eval)`` jitted with this state's shardings (cached by tree structure)."""
        key = jax.tree.structure(state)
        if key not in self._jitted:
            sh = self.state_sharding(state)
            train = jax.jit(self._train_step, in_shardings=(sh, self.batch_sharding),
                            out_shardings=(sh, self.replicated), donate_argnums=(0,))
            ev = jax.jit(self._eval_step, in_shardings=(sh, self.batch_sharding), out_shardings=self.replicated)
            self._jitted[key] = (train, ev)
        return self._jitted[key]

    # ---- state
    def create_state(self, init_fn) -> Any:
        """``init_fn() -> TrainState`` run under jit straight into the sharded layout (a model
        too big for one device never exists unsharded)."""
        shapes = jax.eval_shape(init_fn)
        return jax.jit(init_fn, out_shardings=self.state_sharding(shapes))()

    def put_state(self, state):
        sh = self.state_sharding(state)

        def put(x, s):
            if isinstance(x, jax.Array) and x.sharding == s:
                return x
            host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
            if host is None:  # another global layout: let XLA move it
                return jax.jit(lambda a: a, out_shardings=s)(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(put, state, sh)

    def get_state(self, state):
        """One full copy of the state as host numpy arrays (gathered from every process)."""
        from jax.experimental import multihost_utils

        def get(x):
            if not isinstance(x, jax.Array):
                return np.asarray(x)
            if x.is_fully_addressable or x.is_fully_replicated:
                return np.asarray(x)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(get, state)

    def checkpoint_state(self, state):
        """What the checkpoint saves: the sharded arrays themselves (orbax writes each shard once)."""
        return state

    # ---- batches and steps
    def put_batch(self, batch):
        def put(x):
            local = x.reshape((-1,) + x.shape[2:])  # [local_devices, B, ...] -> [local batch, ...]
            return jax.make_array_from_process_local_data(self.batch_sharding, local)

        return jax.tree.map(put, batch)

    def train(self, state, batch):
        return self.jitted(state)[0](state, batch)

    def evaluate(self, state, batch):
        return self.jitted(state)[1](state, batch)

    def per_example(self, fn):
        """As :meth:`PmapDriver.per_example`: the global-view ``fn`` jitted with the state's shardings,
        outputs sharded like the batch."""
        step, compiled = global_view(fn), {}

        def run(state, batch):
            key = jax.tree.structure(state)
            if key not in compiled:
                compiled[key] = jax.jit(step, in_shardings=(self.state_sharding(state), self.batch_sharding),
                                        out_shardings=self.batch_sharding)
            return jax.tree.map(local_rows, compiled[key](state, batch))

        return run

    def fetch(self, metrics):
        return jax.tree.map(np.asarray, jax.device_get(metrics))


DRIVERS = {"pmap": PmapDriver, "mesh": MeshDriver, "fsdp": FsdpDriver}


def driver_options(config: Any) -> dict:
    """Keyword arguments of the driver ``config.parallel`` names, from the config."""
    if config.get("parallel", "pmap") != "fsdp":
        return {}
    return {"fsdp_size": int(config.get("fsdp_size", 0) or 0),
            "rules": tuple(tuple(r) for r in (config.get("sharding_rules", None) or sharding_lib.DEFAULT_RULES)),
            "min_shard_elements": int(config.get("min_shard_elements", sharding_lib.MIN_SHARD_ELEMENTS))}


def make_driver(name: str, train_step, eval_step, **options):
    if name not in DRIVERS:
        raise ValueError(f"config.parallel={name!r} is unknown; use one of {sorted(DRIVERS)}.")
    return DRIVERS[name](train_step, eval_step, **options)
