"""A/B: the LSTM's backward pass by JAX autodiff of the scan vs a hand-written one (issue 15).

    python -m experiments.recurrent_backward [--batch 64 --T 50 --in 128 --hidden 256 --rounds 7 --steps 20]

The compare run's ``lstm_train`` row (seqvis 0.70x torch.nn.LSTM) spends its time in the scan.
JAX's transpose of ``lax.scan`` keeps the gradient of the loop-invariant recurrent kernel ``U``
as a loop carry: every step of the backward loop does its own ``[H, B] @ [B, 4H]`` product and
adds it in. cuDNN / torch instead keep the per-step gate gradients ``dz_t`` and form
``dU = sum_t h_{t-1}^T dz_t`` as one ``[H, T*B] @ [T*B, 4H]`` product after the loop. This script
measures whether that layout pays on XLA:CPU, on the ``lstm_train`` shape, before any of it
goes into ``seqvis.models.recurrent``:

- ``autodiff``: ``jax.value_and_grad`` through seqvis' own ``Recurrent(LSTMCell)`` with
  ``split_input_product=True`` (the input product ``x @ W + b`` of all steps outside the loop,
  ``h @ U`` inside).
- ``autodiff_inloop``: the same with seqvis' default layout (``split_input_product=False``):
  ``x_t @ W`` inside the loop too.
- ``manual_inloop``: the in-loop forward with the hand-written backward (``dW``, ``dU``, ``db``
  and ``dx`` after the loop).
- ``manual``: the split forward as a ``jax.custom_vjp`` that saves the gate activations and
  cell states, a reverse scan that carries only ``(dh, dc)`` and emits ``dz_t``, and ``dU``,
  ``dW``, ``db`` as single products after it.

Both gradients are checked equal (to float32 rounding) before anything is timed. Timing: value
and gradient of ``mean(h ** 2)`` w.r.t. ``(W, U, b)``, compiled once each, rounds rotating
the order; the medians and their ratio are printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqvis.models import recurrent as rec

UNROLL = 1  # time steps per scan iteration, both variants (--unroll)


def _gates(z):
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)


def _forward(preact, xs, h0, c0, keep):
    """The LSTM scanned over ``xs`` with pre-activations ``preact(x_t, h_{t-1})``; the hidden states ``[T, B, H]``,
    or with ``keep`` also what the hand-written backward needs: cell states and gate activations."""
    def step(carry, x_t):
        h, c = carry
        i, f, g, o = _gates(preact(x_t, h))
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), ((h, c, jnp.concatenate([i, f, g, o], axis=-1)) if keep else h)

    return jax.lax.scan(step, (h0, c0), xs, unroll=UNROLL)[1]


def lstm_scan(u, xw, h0, c0):
    """Hidden states ``[T, B, H]`` of the LSTM over the projected inputs ``xw = x @ W + b`` ``[T, B, 4H]``."""
    return _forward(lambda xw_t, h: xw_t + h @ u, xw, h0, c0, keep=False)


@jax.custom_vjp
def lstm_scan_manual(u, xw, h0, c0):
    return lstm_scan(u, xw, h0, c0)


def _manual_fwd(u, xw, h0, c0):
    hs, cs, acts = _forward(lambda xw_t, h: xw_t + h @ u, xw, h0, c0, keep=True)
    return hs, (u, h0, c0, hs, cs, acts)


def _manual_bwd(res, dhs):
    u, h0, c0, hs, cs, acts = res
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    ut = u.T

    def step(carry, xs):
        dh, dc = carry
        dh_t, c_t, cp_t, a_t = xs
        i, f, g, o = jnp.split(a_t, 4, axis=-1)
        dh = dh + dh_t
        tc = jnp.tanh(c_t)
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate([dc * g * i * (1.0 - i), dc * cp_t * f * (1.0 - f), dc * i * (1.0 - g * g),
                              dh * tc * o * (1.0 - o)], axis=-1)
        return (dz @ ut, dc * f), dz

    zeros = jnp.zeros_like(h0)
    (dh0, dc0), dz = jax.lax.scan(step, (zeros, zeros), (dhs, cs, c_prev, acts), reverse=True,
                                 unroll=UNROLL)
    du = jnp.einsum("tbh,tbg->hg", h_prev, dz)  # one product after the loop, not one per step inside it
    return du, dz, dh0, dc0


lstm_scan_manual.defvjp(_manual_fwd, _manual_bwd)


@jax.custom_vjp
def lstm_inloop_manual(w, u, b, x_tm, h0, c0):
    """The in-loop layout (``x_t @ W`` inside the scan) with the hand-written backward; ``x_tm`` is ``[T, B, F]``."""
    return _inloop_fwd(w, u, b, x_tm, h0, c0)[0]


def _inloop_fwd(w, u, b, x_tm, h0, c0):
    hs, cs, acts = _forward(lambda x_t, h: x_t @ w + h @ u + b, x_tm, h0, c0, keep=True)
    return hs, (w, u, x_tm, h0, c0, hs, cs, acts)


def _inloop_bwd(res, dhs):
    w, u, x_tm, h0, c0, hs, cs, acts = res
    du, dz, dh0, dc0 = _manual_bwd((u, h0, c0, hs, cs, acts), dhs)
    dw = jnp.einsum("tbf,tbg->fg", x_tm, dz)  # after the loop, like dU
    return dw, du, dz.sum(axis=(0, 1)), dz @ w.T, dh0, dc0


lstm_inloop_manual.defvjp(_inloop_fwd, _inloop_bwd)


def make_seqvis_loss(split):
    """The baseline: seqvis' ``Recurrent(LSTMCell)``, differentiated by JAX (``W, U, b`` are its ``input_kernel``,
    ``recurrent_kernel`` and ``bias``, gates in the same i, f, g, o order)."""
    def loss(params, x):
        w, u, b = params
        model = rec.Recurrent(rec.make_cell("lstm", u.shape[0]), split_input_product=split)
        hs, _ = model.apply({"params": {"cell": {"input_kernel": w, "recurrent_kernel": u, "bias": b}}}, x)
        return jnp.mean(hs ** 2)
    return jax.jit(jax.value_and_grad(loss))


def make_manual_loss(split):
    """The hand-written backward in either layout: ``split`` (``x @ W + b`` of all steps before the loop, time-major)
    or in-loop (``x_t @ W + h @ U + b`` inside the loop)."""
    def loss(params, x):
        w, u, b = params
        zeros = jnp.zeros((x.shape[0], u.shape[0]), x.dtype)
        if split:
            hs = lstm_scan_manual(u, jnp.einsum("btf,fg->tbg", x, w) + b, zeros, zeros)
        else:
            hs = lstm_inloop_manual(w, u, b, jnp.swapaxes(x, 0, 1), zeros, zeros)
        return jnp.mean(hs ** 2)
    return jax.jit(jax.value_and_grad(loss))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--in", dest="inp", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of both variants")
    a = ap.parse_args()
    global UNROLL
    UNROLL = a.unroll

    rng = np.random.default_rng(0)
    hdim = a.hidden
    params = (jnp.asarray(rng.normal(0, a.inp ** -0.5, (a.inp, 4 * hdim)), jnp.float32),
              jnp.asarray(np.linalg.qr(rng.normal(size=(4 * hdim, hdim)))[0].T, jnp.float32),
              jnp.asarray(rng.normal(0, 0.1, (4 * hdim,)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(a.batch, a.T, a.inp)), jnp.float32)
    fns = {"autodiff": make_seqvis_loss(split=True), "manual": make_manual_loss(split=True),
           "autodiff_inloop": make_seqvis_loss(split=False), "manual_inloop": make_manual_loss(split=False)}

    out = {name: jax.block_until_ready(fn(params, x)) for name, fn in fns.items()}  # compile + warm up
    (la, ga) = out["autodiff"]
    errs = {}
    for other in ("manual", "autodiff_inloop", "manual_inloop"):
        lm, gm = out[other]
        np.testing.assert_allclose(lm, la, rtol=1e-5)
        for name, ea, em in zip(("W", "U", "b"), ga, gm):
            np.testing.assert_allclose(em, ea, rtol=1e-4, atol=1e-5 * float(jnp.abs(ea).max()))
            errs[f"{other}/{name}"] = float(jnp.abs(em - ea).max() / jnp.abs(ea).max())

    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(a.rounds):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]  # the order rotates every round
        for name in names:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                res = fns[name](params, x)
            jax.block_until_ready(res)
            times[name].append(a.batch * a.steps / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({"shape": dict(batch=a.batch, T=a.T, inp=a.inp, hidden=hdim), "unroll": a.unroll,
                      "seq_per_s": med,
                      "ratio_manual_over_autodiff": med["manual"] / med["autodiff"],
                      "ratio_manual_over_inloop": med["manual"] / med["autodiff_inloop"],
                      "ratio_manual_inloop_over_inloop": med["manual_inloop"] / med["autodiff_inloop"],
                      "runs": times, "max_rel_grad_diff": errs, "baseline": "seqvis Recurrent(LSTMCell)",
                      "jax": jax.__version__}))


if __name__ == "__main__":
    main()
