"""experiments.recurrent_backward: the hand-written LSTM backward (both layouts) equals autodiff of seqvis' LSTM."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import recurrent_backward as rb


def test_manual_backward_equals_autodiff():
    rng = np.random.default_rng(3)
    t, b, f, h = 6, 3, 5, 4
    params = tuple(jnp.asarray(rng.normal(0, 0.5, s), jnp.float32) for s in ((f, 4 * h), (h, 4 * h), (4 * h,)))
    x = jnp.asarray(rng.normal(size=(b, t, f)), jnp.float32)
    la, ga = rb.make_seqvis_loss(split=False)(params, x)  # seqvis' Recurrent(LSTMCell), autodiff
    for fn in (rb.make_seqvis_loss(split=True), rb.make_manual_loss(split=True), rb.make_manual_loss(split=False)):
        lm, gm = fn(params, x)
        np.testing.assert_allclose(lm, la, rtol=1e-6)
        for ea, em in zip(ga, gm):
            np.testing.assert_allclose(em, ea, rtol=1e-5, atol=1e-7)
    # and the gradient of the initial state (the carry the backward scan ends with)
    xw = jnp.asarray(rng.normal(size=(t, b, 4 * h)), jnp.float32)
    h0, c0 = (jnp.asarray(rng.normal(size=(b, h)), jnp.float32) for _ in range(2))
    for fn in (rb.lstm_scan, rb.lstm_scan_manual):
        assert fn(params[1], xw, h0, c0).shape == (t, b, h)
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2, 3))(params[1], xw, h0, c0)
    for ea, em in zip(grad(rb.lstm_scan), grad(rb.lstm_scan_manual)):
        np.testing.assert_allclose(em, ea, rtol=1e-5, atol=1e-6)
