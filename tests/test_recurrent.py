"""Recurrent cells and layers: numpy references of the textbook equations, scan vs loop,
padding, reverse within lengths, bidirectional, stacking, names and errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.models import recurrent as rec

B, T, D, H = 3, 6, 5, 4
LENGTHS = np.array([6, 3, 0])  # full, padded, empty


def _inputs(seed=0, shape=(B, T, D)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _randomise(params, seed=1):
    """Same tree and shapes, every leaf random (so zero-initialised biases are exercised too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.5, size=p.shape), p.dtype), params)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- numpy references


def np_rnn_step(p, h, x, f=np.tanh):
    return f(x @ p["input_kernel"] + h @ p["recurrent_kernel"] + p["bias"])


def np_lstm_step(p, carry, x):
    c, h = carry
    W, U, b = (np.asarray(p[k], np.float64) for k in ("input_kernel", "recurrent_kernel", "bias"))
    Wi, Wf, Wg, Wo = np.split(W, 4, axis=-1)
    Ui, Uf, Ug, Uo = np.split(U, 4, axis=-1)
    bi, bf, bg, bo = np.split(b, 4)
    i = _sigmoid(x @ Wi + h @ Ui + bi)
    f = _sigmoid(x @ Wf + h @ Uf + bf)
    g = np.tanh(x @ Wg + h @ Ug + bg)
    o = _sigmoid(x @ Wo + h @ Uo + bo)
    c = f * c + i * g
    return c, o * np.tanh(c)


def np_gru_step(p, h, x):
    W, U, b = (np.asarray(p[k], np.float64) for k in ("input_kernel", "recurrent_kernel", "bias"))
    b_hn = np.asarray(p["recurrent_bias"], np.float64)
    Wr, Wz, Wn = np.split(W, 3, axis=-1)
    Ur, Uz, Un = np.split(U, 3, axis=-1)
    br, bz, b_in = np.split(b, 3)
    r = _sigmoid(x @ Wr + h @ Ur + br)
    z = _sigmoid(x @ Wz + h @ Uz + bz)
    n = np.tanh(x @ Wn + b_in + r * (h @ Un + b_hn))
    return (1.0 - z) * n + z * h


def _np_params(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_simple_rnn_cell_matches_numpy(activation):
    cell = rec.SimpleRNNCell(H, activation_fn=activation)
    x = _inputs(0, (B, D))
    h0 = _inputs(1, (B, H))
    params = _randomise(cell.init(jax.random.key(0), jnp.zeros((B, H)), x)["params"])
    (h1, y1) = cell.apply({"params": params}, h0, x)
    f = np.tanh if activation == "tanh" else (lambda a: np.maximum(a, 0.0))
    ref = np_rnn_step(_np_params(params), h0.astype(np.float64), x.astype(np.float64), f)
    np.testing.assert_allclose(h1, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h1, y1)
    if activation == "relu":
        assert np.any(ref == 0.0) and np.all(np.asarray(h1) >= 0.0)


def test_lstm_cell_matches_numpy_and_forget_bias_init():
    cell = rec.LSTMCell(H)
    x = _inputs(0, (B, D))
    carry0 = (_inputs(2, (B, H)), _inputs(3, (B, H)))
    init_params = cell.init(jax.random.key(0), cell.initialize_carry(None, x.shape), x)["params"]
    # Initial bias: zeros except the forget-gate block (gate order i, f, g, o), which is 1.0.
    np.testing.assert_array_equal(init_params["bias"], np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
    zero_fb = rec.LSTMCell(H, forget_bias=0.0).init(jax.random.key(0), carry0, x)["params"]
    np.testing.assert_array_equal(zero_fb["bias"], np.zeros(4 * H))

    params = _randomise(init_params)
    (c1, h1), y1 = cell.apply({"params": params}, carry0, x)
    rc, rh = np_lstm_step(_np_params(params), tuple(a.astype(np.float64) for a in carry0), x.astype(np.float64))
    np.testing.assert_allclose(c1, rc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h1, rh, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h1, y1)


def test_gru_cell_matches_numpy():
    cell = rec.GRUCell(H)
    x = _inputs(0, (B, D))
    h0 = _inputs(1, (B, H))
    params = _randomise(cell.init(jax.random.key(0), h0, x)["params"])
    h1, y1 = cell.apply({"params": params}, h0, x)
    ref = np_gru_step(_np_params(params), h0.astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(h1, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h1, y1)
    # b_hn sits inside the reset gate: with r != 1 moving it is not the same as moving b_in.
    p2 = dict(params, recurrent_bias=params["recurrent_bias"] + 1.0)
    p3 = dict(params, bias=params["bias"].at[2 * H:].add(1.0))
    assert not np.allclose(cell.apply({"params": p2}, h0, x)[0], cell.apply({"params": p3}, h0, x)[0])


def test_cell_param_names_shapes_and_carry():
    """Parameter names are part of the checkpoint format: pin them."""
    x = jnp.zeros((2, 7, D))  # two batch axes work standalone too
    expected = {
        "rnn": {"input_kernel": (D, H), "recurrent_kernel": (H, H), "bias": (H,)},
        "lstm": {"input_kernel": (D, 4 * H), "recurrent_kernel": (H, 4 * H), "bias": (4 * H,)},
        "gru": {"input_kernel": (D, 3 * H), "recurrent_kernel": (H, 3 * H), "bias": (3 * H,),
                "recurrent_bias": (H,)},
    }
    for kind, shapes in expected.items():
        cell = rec.make_cell(kind, H)
        assert isinstance(cell, nn.RNNCellBase) and cell.num_feature_axes == 1
        carry = cell.initialize_carry(jax.random.key(0), x.shape)
        variables = cell.init(jax.random.key(0), carry, x)
        assert jax.tree.map(jnp.shape, variables["params"]) == shapes, kind
        new_carry, y = cell.apply(variables, carry, x)
        assert y.shape == (2, 7, H)
        assert jax.tree.map(jnp.shape, new_carry) == jax.tree.map(jnp.shape, carry)
    c, h = rec.LSTMCell(H).initialize_carry(jax.random.key(0), (B, D))
    assert c.shape == h.shape == (B, H) and not np.any(c) and not np.any(h)


def test_recurrent_kernel_is_orthogonal_per_gate():
    p = rec.LSTMCell(H).init(jax.random.key(0), (jnp.zeros((1, H)),) * 2, jnp.zeros((1, D)))["params"]
    for block in np.split(np.asarray(p["recurrent_kernel"]), 4, axis=-1):
        np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-5)


def test_wrong_carry_size_is_a_clear_error():
    cell = rec.GRUCell(H)
    with pytest.raises(ValueError, match="last axis must equal `features`"):
        cell.init(jax.random.key(0), jnp.zeros((B, H + 1)), jnp.zeros((B, D)))


def test_make_cell():
    assert isinstance(rec.make_cell("LSTM", 3, forget_bias=0.0), rec.LSTMCell)
    assert rec.make_cell("lstm", 3, forget_bias=0.0).forget_bias == 0.0
    assert isinstance(rec.make_cell("gru", 3), rec.GRUCell)
    assert isinstance(rec.make_cell("rnn", 3), rec.SimpleRNNCell)
    with pytest.raises(ValueError) as err:
        rec.make_cell("lsmt", 3)
    msg = str(err.value)
    assert "'lsmt'" in msg and all(f"'{k}'" in msg for k in ("rnn", "lstm", "gru"))
    with pytest.raises(ValueError, match="valid kinds are 'rnn', 'lstm', 'gru'"):
        rec.StackedRNN(H, cell="transformer").init(jax.random.key(0), jnp.zeros((1, 2, D)))
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        rec.SimpleRNNCell(H, activation_fn="swishy").init(jax.random.key(0), jnp.zeros((1, H)), jnp.zeros((1, D)))


# --------------------------------------------------------------------------- scanned layer


def _layer(kind, reverse=False):
    layer = rec.Recurrent(rec.make_cell(kind, H), reverse=reverse)
    params = _randomise(layer.init(jax.random.key(0), jnp.zeros((B, T, D)))["params"], seed=7)
    return layer, params


def _loop(kind, cell_params, x, carry=None, reverse=False):
    """Step-by-step Python loop of the cell itself (the thing the scan must reproduce)."""
    cell = rec.make_cell(kind, H)
    if carry is None:
        carry = cell.initialize_carry(None, x[:, 0].shape)
    ys = [None] * x.shape[1]
    order = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in order:
        carry, ys[t] = cell.apply({"params": cell_params}, carry, x[:, t])
    return jnp.stack(ys, axis=1), carry


def _assert_tree_close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kw), a, b)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_equals_python_loop(kind, reverse):
    layer, params = _layer(kind, reverse)
    x = _inputs(3)
    y, carry = layer.apply({"params": params}, x)
    ref_y, ref_carry = _loop(kind, params["cell"], x, reverse=reverse)
    assert y.shape == (B, T, H)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    _assert_tree_close(carry, ref_carry, rtol=1e-5, atol=1e-6)
    # The last output is the final hidden state (t = T-1 forward, t = 0 backward).
    h = carry[1] if kind == "lstm" else carry
    np.testing.assert_allclose(y[:, 0 if reverse else -1], h, rtol=1e-6)


def test_lstm_layer_matches_numpy_textbook_loop():
    layer, params = _layer("lstm")
    x = _inputs(4)
    y, (c, h) = layer.apply({"params": params}, x)
    p = _np_params(params["cell"])
    carry = (np.zeros((B, H)), np.zeros((B, H)))
    ref = []
    for t in range(T):
        carry = np_lstm_step(p, carry, x[:, t].astype(np.float64))
        ref.append(carry[1])
    np.testing.assert_allclose(y, np.stack(ref, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, carry[0], rtol=1e-5, atol=1e-5)


def test_initial_carry_is_used():
    layer, params = _layer("gru")
    x = _inputs(5)
    h0 = _inputs(6, (B, H))
    y, carry = layer.apply({"params": params}, x, None, h0)
    ref_y, ref_carry = _loop("gru", params["cell"], x, carry=jnp.asarray(h0))
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    y_zero, _ = layer.apply({"params": params}, x)
    assert not np.allclose(y, y_zero)
    # A length-0 sequence returns its initial carry untouched and only zero outputs.
    y0, carry0 = layer.apply({"params": params}, x, jnp.array([0, 2, 0]), h0)
    np.testing.assert_array_equal(carry0[0], h0[0])
    np.testing.assert_array_equal(y0[0], 0.0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_padded_steps_are_ignored(kind, reverse):
    layer, params = _layer(kind, reverse)
    x = _inputs(8)
    y, carry = layer.apply({"params": params}, x, LENGTHS)
    for b, length in enumerate(LENGTHS):
        # Outputs are exactly zero at padded positions...
        np.testing.assert_array_equal(y[b, length:], 0.0)
        # ...and the real part and final carry equal running the truncated sequence alone.
        alone = x[b:b + 1, :length]
        if length:
            ref_y, ref_carry = layer.apply({"params": params}, alone)
            np.testing.assert_allclose(y[b:b + 1, :length], ref_y, rtol=1e-5, atol=1e-6)
        else:
            ref_carry = rec.make_cell(kind, H).initialize_carry(None, (1, D))
        _assert_tree_close(jax.tree.map(lambda a: a[b:b + 1], carry), ref_carry, rtol=1e-5, atol=1e-6)
    # Changing the values at padded positions changes nothing.
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    x2 = np.where(pad[..., None], 100.0 * _inputs(9), x).astype(np.float32)
    assert not np.array_equal(x2, x)
    y2, carry2 = layer.apply({"params": params}, x2, LENGTHS)
    np.testing.assert_array_equal(y2, y)
    _assert_tree_close(carry2, carry, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_reverse_with_lengths_reads_flipped_truncated_sequence(kind):
    fwd = rec.Recurrent(rec.make_cell(kind, H))
    bwd = rec.Recurrent(rec.make_cell(kind, H), reverse=True)
    params = _randomise(fwd.init(jax.random.key(0), jnp.zeros((B, T, D)))["params"], seed=11)
    x = _inputs(10)
    lengths = np.array([6, 4, 1])
    y, carry = bwd.apply({"params": params}, x, lengths)
    for b, length in enumerate(lengths):
        flipped = x[b:b + 1, :length][:, ::-1]
        ref_y, ref_carry = fwd.apply({"params": params}, flipped)
        np.testing.assert_allclose(y[b:b + 1, :length], ref_y[:, ::-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y[b, length:], 0.0)
        _assert_tree_close(jax.tree.map(lambda a: a[b:b + 1], carry), ref_carry, rtol=1e-5, atol=1e-6)
    # The backward pass starts at L-1: its output there has seen only x[L-1] from zero state.
    one, _ = fwd.apply({"params": params}, x[1:2, 3:4])
    np.testing.assert_allclose(y[1, 3], one[0, 0], rtol=1e-5, atol=1e-6)


def test_no_gradient_flows_to_padded_positions():
    layer, params = _layer("lstm")
    x = jnp.asarray(_inputs(12))

    def loss(x):
        y, (c, h) = layer.apply({"params": params}, x, LENGTHS)
        return jnp.sum(y ** 2) + jnp.sum(c)

    g = np.asarray(jax.grad(loss)(x))
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    assert np.all(g[pad] == 0.0)
    assert np.all(np.isfinite(g)) and np.abs(g[~pad]).sum() > 0


def test_jit_matches_eager():
    layer, params = _layer("gru", reverse=True)
    x = _inputs(13)
    eager = layer.apply({"params": params}, x, LENGTHS)
    jitted = jax.jit(layer.apply)({"params": params}, x, jnp.asarray(LENGTHS))
    _assert_tree_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_layer_owns_its_cell_and_bad_shapes():
    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = rec.GRUCell(H)  # built here, then handed to two layers: must not be shared
            y1, _ = rec.Recurrent(cell, name="a")(x)
            y2, _ = rec.Recurrent(cell, name="b")(x)
            return y1 + y2

    params = Encoder().init(jax.random.key(0), jnp.zeros((B, T, D)))["params"]
    assert set(params) == {"a", "b"} and set(params["a"]) == {"cell"}
    assert not np.allclose(params["a"]["cell"]["input_kernel"], params["b"]["cell"]["input_kernel"])
    layer = rec.Recurrent(rec.GRUCell(H))
    with pytest.raises(ValueError, match=r"\[batch, time, features\]"):
        layer.init(jax.random.key(0), jnp.zeros((T, D)))
    with pytest.raises(ValueError, match="lengths must have shape"):
        layer.init(jax.random.key(0), jnp.zeros((B, T, D)), jnp.zeros((B, 1), jnp.int32))


def test_cells_also_work_in_flax_rnn():
    """The cells follow the RNNCellBase convention, so flax's own scanner accepts them."""
    layer, params = _layer("lstm")
    x = _inputs(14)
    y, carry = layer.apply({"params": params}, x, LENGTHS)
    f_carry, f_y = nn.RNN(rec.LSTMCell(H), return_carry=True).apply(
        {"params": params}, x, seq_lengths=jnp.asarray(LENGTHS))
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    np.testing.assert_allclose(np.where(valid[..., None], f_y, 0.0), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f_carry[1][:2], carry[1][:2], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bidirectional, stacks


def test_bidirectional_equals_separate_runs():
    bi = rec.Bidirectional(rec.LSTMCell(H), backward_cell=rec.GRUCell(H + 1))
    x = _inputs(15)
    params = _randomise(bi.init(jax.random.key(0), jnp.zeros((B, T, D)))["params"], seed=3)
    assert set(params) == {"forward", "backward"}
    y, (cf, cb) = bi.apply({"params": params}, x, LENGTHS)
    assert y.shape == (B, T, 2 * H + 1)
    yf, ref_cf = rec.Recurrent(rec.LSTMCell(H)).apply({"params": params["forward"]}, x, LENGTHS)
    yb, ref_cb = rec.Recurrent(rec.GRUCell(H + 1), reverse=True).apply({"params": params["backward"]}, x, LENGTHS)
    np.testing.assert_array_equal(y[..., :H], yf)
    np.testing.assert_array_equal(y[..., H:], yb)
    _assert_tree_close((cf, cb), (ref_cf, ref_cb), rtol=0, atol=0)
    # The backward half at t = 0 has read the whole sequence: it differs from the forward half.
    assert not np.allclose(yb[0, 0, :H], yf[0, 0])


def test_bidirectional_same_cell_gets_two_parameter_sets():
    bi = rec.Bidirectional(rec.GRUCell(H))
    params = bi.init(jax.random.key(0), jnp.zeros((B, T, D)))["params"]
    assert jax.tree.map(jnp.shape, params["forward"]) == jax.tree.map(jnp.shape, params["backward"])
    assert not np.allclose(params["forward"]["cell"]["input_kernel"], params["backward"]["cell"]["input_kernel"])


@pytest.mark.parametrize(
    "cell,bidirectional,width",
    [("lstm", False, H), ("gru", True, 2 * H), (functools.partial(rec.SimpleRNNCell, activation_fn="relu"), False, H)],
)
def test_stacked_rnn_shapes(cell, bidirectional, width):
    model = rec.StackedRNN(H, num_layers=3, cell=cell, bidirectional=bidirectional)
    x = _inputs(16)
    variables = model.init(jax.random.key(0), x, LENGTHS)
    assert set(variables["params"]) == {"layer_0", "layer_1", "layer_2"}
    first = variables["params"]["layer_1"]["forward" if bidirectional else "cell"]
    if bidirectional:
        first = first["cell"]
    assert first["input_kernel"].shape[0] == width  # layer 1 reads layer 0's output
    y, carries = model.apply(variables, x, LENGTHS)
    assert y.shape == (B, T, width) and len(carries) == 3
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    np.testing.assert_array_equal(np.asarray(y)[pad], 0.0)


def test_stacked_rnn_is_composition_of_layers():
    model = rec.StackedRNN(H, num_layers=2, cell="gru")
    x = _inputs(17)
    params = _randomise(model.init(jax.random.key(0), x)["params"], seed=5)
    y, (c0, c1) = model.apply({"params": params}, x, LENGTHS)
    layer = rec.Recurrent(rec.GRUCell(H))
    h, ref_c0 = layer.apply({"params": params["layer_0"]}, x, LENGTHS)
    ref_y, ref_c1 = layer.apply({"params": params["layer_1"]}, h, LENGTHS)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c0, ref_c0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c1, ref_c1, rtol=1e-6, atol=1e-6)


def test_stacked_rnn_dropout_between_layers():
    model = rec.StackedRNN(H, num_layers=2, cell="lstm", dropout_rate=0.5)
    x = _inputs(18)
    variables = model.init(jax.random.key(0), x)
    det1, _ = model.apply(variables, x, LENGTHS)
    det2, _ = model.apply(variables, x, LENGTHS, deterministic=True)
    np.testing.assert_array_equal(det1, det2)
    def drop(seed):
        return model.apply(variables, x, LENGTHS, deterministic=False, rngs={"dropout": jax.random.key(seed)})[0]

    d1, d2 = drop(1), drop(2)
    assert not np.allclose(d1, det1) and not np.allclose(d1, d2)
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    np.testing.assert_array_equal(np.asarray(d1)[pad], 0.0)
    # One layer: nothing lies between layers, so dropout must not act at all.
    single = rec.StackedRNN(H, num_layers=1, cell="lstm", dropout_rate=0.5)
    v1 = single.init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        single.apply(v1, x, deterministic=False, rngs={"dropout": jax.random.key(1)})[0], single.apply(v1, x)[0])


def test_stacked_rnn_rejects_a_cell_instance():
    with pytest.raises(TypeError, match="name .* or a factory"):
        rec.StackedRNN(H, cell=rec.LSTMCell(H)).init(jax.random.key(0), jnp.zeros((1, 2, D)))


