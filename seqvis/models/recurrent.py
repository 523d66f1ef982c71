"""Recurrent networks: simple RNN, LSTM and GRU cells, scanned over time.

Over 400 lines on purpose: cells and the layers that scan them read together; ~220 lines are code, the rest equations.

A recurrent network reads a sequence ``x_1 .. x_T`` one step at a time and keeps a state
(the *carry*) that summarises what it has seen::

    carry_t, y_t = cell(carry_{t-1}, x_t)          t = 1 .. T

This file has two levels:

* **Cells** (one time step, inputs ``[batch, features]``): ``SimpleRNNCell``, ``LSTMCell``
  and ``GRUCell``. They follow the flax ``nn.RNNCellBase`` convention —
  ``cell(carry, x) -> (new_carry, y)`` and ``cell.initialize_carry(rng, (*batch, features))``
  — so a decoder (captioning) can call them step by step, and ``flax.linen.RNN`` can scan
  them too.
* **Layers** (whole sequences, inputs ``[batch, time, features]``): ``Recurrent`` scans one
  cell over time with ``nn.scan`` (one traced step, compiled once, whatever ``T``) and
  handles per-example lengths and the reverse direction; ``Bidirectional`` runs a forward
  and a backward ``Recurrent`` and concatenates them; ``StackedRNN`` stacks layers into an
  encoder (video). ``make_cell('rnn' | 'lstm' | 'gru', features)`` builds a cell by name.

Row-vector convention. The equations below are written as in textbooks, ``W x_t``; the
code computes the same thing on a batch of row vectors as ``x_t @ W`` with the kernel
stored ``[in_features, out_features]`` (as ``nn.Dense`` does).

Fused gates. The gated cells keep the kernels of all their gates side by side in one
matrix (e.g. the LSTM's ``input_kernel`` is ``[in, 4·H]`` = ``[W_i | W_f | W_g | W_o]``),
so each step costs two matrix products instead of eight. Each ``H``-wide block is
initialised on its own (an orthogonal recurrent kernel is orthogonal per gate).

Padding. With ``lengths`` (``[batch]`` ints), time steps ``t >= length`` are padding: they
leave the carry unchanged and output zeros, so the final carry is the carry after step
``length - 1`` and nothing at a padded position can leak into the result.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from seqvis.models.common import lengths_to_valid

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
Carry = Any

__all__ = [
    "SimpleRNNCell",
    "LSTMCell",
    "GRUCell",
    "Recurrent",
    "Bidirectional",
    "StackedRNN",
    "make_cell",
    "CELL_KINDS",
]

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "identity": lambda x: x,
}


def _activation(fn: str | Callable[[Array], Array]) -> Callable[[Array], Array]:
    if callable(fn):
        return fn
    if fn not in _ACTIVATIONS:
        raise ValueError(
            f"SimpleRNNCell.activation_fn: unknown activation {fn!r}; use one of "
            f"{sorted(_ACTIVATIONS)} or pass a callable."
        )
    return _ACTIVATIONS[fn]


def _per_gate(init: Initializer, num_gates: int, offsets: tuple[float, ...] | None = None) -> Initializer:
    """Initialiser for a fused ``[..., num_gates * H]`` parameter: each ``H`` block drawn alone.

    ``offsets`` (one per gate) are added to the blocks, e.g. the LSTM forget-gate bias.
    """

    def init_fn(key, shape, dtype=jnp.float32):
        *lead, total = shape
        if total % num_gates:
            raise ValueError(f"fused gate axis {total} is not divisible by {num_gates} gates")
        width = total // num_gates
        keys = jax.random.split(key, num_gates)
        blocks = [init(k, (*lead, width), dtype) for k in keys]
        if offsets is not None:
            blocks = [b + jnp.asarray(o, dtype) for b, o in zip(blocks, offsets)]
        return jnp.concatenate(blocks, axis=-1)

    return init_fn


class _CellBase(nn.RNNCellBase):
    """Shared plumbing: carry creation and shape checks. Not part of the public API."""

    def _zeros(self, input_shape: tuple[int, ...]) -> Array:
        if len(input_shape) < 1:
            raise ValueError(
                f"{type(self).__name__}.initialize_carry: input_shape must be (*batch, features), "
                f"got {input_shape}."
            )
        return jnp.zeros(tuple(input_shape[:-1]) + (self.features,), self.param_dtype)

    def _check_hidden(self, h: Array) -> None:
        if h.shape[-1] != self.features:
            raise ValueError(
                f"{type(self).__name__}(features={self.features}) got a carry of shape {h.shape}; "
                "its last axis must equal `features` (build it with `initialize_carry`)."
            )

    def _fused_params(self, in_features: int, num_gates: int, bias_offsets: tuple[float, ...] | None = None):
        """The kernels ``[in, G·H]``, ``[H, G·H]`` and bias ``[G·H]`` of ``num_gates`` = G gates."""
        width = num_gates * self.features
        kernel_init = _per_gate(self.kernel_init, num_gates)
        recurrent_init = _per_gate(self.recurrent_kernel_init, num_gates)
        bias_init = _per_gate(self.bias_init, num_gates, bias_offsets)
        w = self.param("input_kernel", kernel_init, (in_features, width), self.param_dtype)
        u = self.param("recurrent_kernel", recurrent_init, (self.features, width), self.param_dtype)
        b = self.param("bias", bias_init, (width,), self.param_dtype)
        return w, u, b

    def _preactivation(self, inputs: Array, h: Array, w: Array, u: Array, b: Array) -> Array:
        """Gate pre-activations ``x @ W + h @ U + b``."""
        x, hc, w, u, b = promote_dtype(inputs, h, w, u, b, dtype=self.dtype)
        return x @ w + hc @ u + b

    @property
    def num_feature_axes(self) -> int:
        return 1


class SimpleRNNCell(_CellBase):
    """Elman RNN cell: one step ``h_t = f(W x_t + U h_{t-1} + b)``.

    Shapes: ``x_t [*batch, in]``, carry ``h_{t-1} [*batch, H]``; returns
    ``(h_t, h_t)`` with ``h_t [*batch, H]`` (the output is the new state).

    Parameters (names are stable)::

        input_kernel      W  [in, H]
        recurrent_kernel  U  [H, H]
        bias              b  [H]

    Attributes:
      features: hidden size H.
      activation_fn: f; a callable or one of 'tanh' (default), 'relu', 'sigmoid', 'gelu',
        'identity'.
      kernel_init / recurrent_kernel_init / bias_init: initialisers of W / U / b
        (default LeCun normal / orthogonal / zeros).
      dtype: computation dtype of the matrix products (default: inferred from inputs and
        params).
      param_dtype: parameter dtype; also the dtype of the zero carry from
        ``initialize_carry``. The new carry (and the output) keeps the dtype of the carry
        passed in, so a float32 state is kept in float32 under bfloat16 compute.
    """

    features: int
    activation_fn: str | Callable[[Array], Array] = "tanh"
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
        w, u, b = self._fused_params(inputs.shape[-1], 1)
        h = carry
        self._check_hidden(h)
        f = _activation(self.activation_fn)
        z = self._preactivation(inputs, h, w, u, b)
        new_h = f(z).astype(h.dtype)
        return new_h, new_h

    @nn.nowrap
    def initialize_carry(self, rng: Any, input_shape: tuple[int, ...]) -> Array:
        """Zero state ``h_0 [*batch, H]`` for inputs of shape ``(*batch, in)``; ``rng`` is unused."""
        return self._zeros(input_shape)


class LSTMCell(_CellBase):
    """Long short-term memory cell (Hochreiter & Schmidhuber 1997, with a forget gate).

    One step, with σ the logistic sigmoid and ⊙ the elementwise product::

        i_t = σ(W_i x_t + U_i h_{t-1} + b_i)        input gate
        f_t = σ(W_f x_t + U_f h_{t-1} + b_f)        forget gate
        g_t = tanh(W_g x_t + U_g h_{t-1} + b_g)     candidate cell
        o_t = σ(W_o x_t + U_o h_{t-1} + b_o)        output gate
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)

    Shapes: ``x_t [*batch, in]``; the carry is the pair ``(c, h)`` (same order as
    ``flax.linen.LSTMCell``), each ``[*batch, H]``. Returns ``((c_t, h_t), h_t)``.

    Parameters (names are stable; the gate blocks are in the order i, f, g, o)::

        input_kernel      [W_i | W_f | W_g | W_o]   [in, 4H]
        recurrent_kernel  [U_i | U_f | U_g | U_o]   [H, 4H]
        bias              [b_i | b_f | b_g | b_o]   [4H]

    Attributes:
      features: hidden size H.
      forget_bias: added to the initial forget-gate bias b_f (default 1.0, so the cell
        starts by remembering; Jozefowicz et al. 2015). Use 0.0 to match
        ``flax.linen.LSTMCell`` / PyTorch initialisation.
      kernel_init / recurrent_kernel_init / bias_init: per-gate initialisers of W / U / b
        (default LeCun normal / orthogonal / zeros); each H-wide block is drawn separately.
      dtype, param_dtype: as in ``SimpleRNNCell``.
    """

    features: int
    forget_bias: float = 1.0
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array) -> tuple[tuple[Array, Array], Array]:
        w, u, b = self._fused_params(inputs.shape[-1], 4, bias_offsets=(0.0, self.forget_bias, 0.0, 0.0))
        c, h = carry
        self._check_hidden(h)
        z = self._preactivation(inputs, h, w, u, b)
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        new_c = (f * c + i * g).astype(c.dtype)
        new_h = (o * jnp.tanh(new_c)).astype(h.dtype)
        return (new_c, new_h), new_h

    @nn.nowrap
    def initialize_carry(self, rng: Any, input_shape: tuple[int, ...]) -> tuple[Array, Array]:
        """Zero state ``(c_0, h_0)``, each ``[*batch, H]``, for inputs ``(*batch, in)``; ``rng`` unused."""
        return self._zeros(input_shape), self._zeros(input_shape)


class GRUCell(_CellBase):
    """Gated recurrent unit (Cho et al. 2014), in the convention of PyTorch and cuDNN.

    One step::

        r_t = σ(W_r x_t + U_r h_{t-1} + b_r)                     reset gate
        z_t = σ(W_z x_t + U_z h_{t-1} + b_z)                     update gate
        n_t = tanh(W_n x_t + b_in + r_t ⊙ (U_n h_{t-1} + b_hn))  candidate state
        h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

    Convention: the reset gate multiplies ``U_n h_{t-1} + b_hn`` *after* the matrix product
    (PyTorch / cuDNN / ``flax.linen.GRUCell``), not ``h_{t-1}`` before it as in the
    original paper; and ``z_t`` is the weight of the *old* state. Shapes: ``x_t [*batch, in]``,
    carry ``h [*batch, H]``; returns ``(h_t, h_t)``.

    Parameters (names are stable; gate blocks in the order r, z, n)::

        input_kernel      [W_r | W_z | W_n]     [in, 3H]
        recurrent_kernel  [U_r | U_z | U_n]     [H, 3H]
        bias              [b_r | b_z | b_in]    [3H]
        recurrent_bias    b_hn                  [H]

    (PyTorch keeps two 3H biases; its weights map in as ``bias = b_ih + [b_hh_r, b_hh_z, 0]``,
    ``recurrent_bias = b_hh_n``, kernels transposed.)

    Attributes:
      features: hidden size H.
      kernel_init / recurrent_kernel_init / bias_init: per-gate initialisers (default LeCun
        normal / orthogonal / zeros); ``bias_init`` is used for ``recurrent_bias`` too.
      dtype, param_dtype: as in ``SimpleRNNCell``.
    """

    features: int
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
        w, u, b = self._fused_params(inputs.shape[-1], 3)
        b_hn = self.param("recurrent_bias", self.bias_init, (self.features,), self.param_dtype)
        h = carry
        self._check_hidden(h)
        x, hc, w, u, b, b_hn = promote_dtype(inputs, h, w, u, b, b_hn, dtype=self.dtype)
        xw = x @ w + b
        xr, xz, xn = jnp.split(xw, 3, axis=-1)
        hr, hz, hn = jnp.split(hc @ u, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * (hn + b_hn))
        new_h = ((1.0 - z) * n + z * hc).astype(h.dtype)
        return new_h, new_h

    @nn.nowrap
    def initialize_carry(self, rng: Any, input_shape: tuple[int, ...]) -> Array:
        """Zero state ``h_0 [*batch, H]`` for inputs of shape ``(*batch, in)``; ``rng`` is unused."""
        return self._zeros(input_shape)


CELL_KINDS: dict[str, type[nn.RNNCellBase]] = {"rnn": SimpleRNNCell, "lstm": LSTMCell, "gru": GRUCell}


def make_cell(kind: str, features: int, **kwargs: Any) -> nn.RNNCellBase:
    """Build a cell by name: ``'rnn'`` (SimpleRNNCell), ``'lstm'`` (LSTMCell) or ``'gru'`` (GRUCell).

    ``kwargs`` go to the cell's constructor (e.g. ``forget_bias=0.0``, ``dtype=jnp.bfloat16``).
    The name is case-insensitive.
    """
    return CELL_KINDS[_cell_kind(kind, "make_cell")](features=features, **kwargs)


def _cell_kind(kind: str, where: str) -> str:
    key = kind.lower().strip() if isinstance(kind, str) else kind
    if key not in CELL_KINDS:
        valid = ", ".join(repr(k) for k in CELL_KINDS)
        raise ValueError(f"{where}: unknown recurrent cell kind {kind!r}; valid kinds are {valid}.")
    return key


# --------------------------------------------------------------------------- layers


def _where_valid(valid: Array, new: Any, old: Any) -> Any:
    """Per example, ``new`` where ``valid`` else ``old`` (``valid [batch]``; pytrees of ``[batch, ...]``)."""

    def pick(n, o):
        return jnp.where(valid.reshape(valid.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


class Recurrent(nn.Module):
    """Run one cell over a whole sequence with ``nn.scan``.

    For inputs ``x [batch, T, in]`` and per-example lengths ``L [batch]``::

        carry_0 = initial_carry (zeros by default)
        carry_t, y_t = cell(carry_{t-1}, x_t)   for t < L       (t = 0 .. T-1)
        carry_t, y_t = carry_{t-1}, 0           for t >= L      (padding)

    so ``outputs [batch, T, H]`` holds every hidden state (zeros at padded positions) and
    the final carry is the carry after step ``L - 1``. Without ``lengths`` every step is real.

    ``reverse=True`` reads each sequence backwards *within its length*: steps
    ``L-1, L-2, .., 0`` (the padded tail ``t >= L`` comes first in a backward scan and is a
    no-op, so the pass effectively starts at ``L-1``, not ``T-1``). Output ``y_t`` stays at
    time index ``t``, and the final carry is the carry after step 0. This equals running the
    forward layer on ``x[L-1::-1]`` and flipping its outputs back.

    The cell's parameters live under ``cell`` (e.g. ``cell/input_kernel``) and are shared by
    all time steps. The layer always owns its cell: a cell instance built inside another
    module's ``compact`` method, or handed to two layers, is cloned, so two layers never
    share parameters by accident. Note the return order ``(outputs, carry)``
    (``flax.linen.RNN`` returns ``(carry, outputs)``).

    Attributes:
      cell: the cell to scan, e.g. ``LSTMCell(128)`` or ``make_cell('gru', 128)``.
      reverse: process sequences backwards (see above).
      unroll: time steps per scan iteration (``jax.lax.scan`` ``unroll``; speed only).
    """

    cell: nn.RNNCellBase
    reverse: bool = False
    unroll: int = 1

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        lengths: Array | None = None,
        initial_carry: Carry | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[Array, Carry]:
        """Args:
          inputs: ``[batch, T, in]``.
          lengths: optional ints ``[batch]`` in ``[0, T]``; a length of 0 returns the initial
            carry and all-zero outputs.
          initial_carry: the carry before the first step (default ``cell.initialize_carry``:
            zeros), e.g. an image embedding for a decoder.
          deterministic: accepted for a uniform layer interface; the cells have no dropout.

        Returns:
          ``(outputs [batch, T, H], final_carry)``.
        """
        del deterministic
        if inputs.ndim != 3:
            raise ValueError(f"Recurrent expects inputs [batch, time, features]; got shape {inputs.shape}.")
        batch, steps = inputs.shape[:2]
        # The layer always owns its cell, so the parameters sit under `cell` wherever the cell
        # instance was built (a cell created in another module's compact method, or shared
        # with a sibling layer, is cloned here instead of being shared).
        cell = self.cell if self.cell.parent is self else self.cell.clone(parent=self, name="cell")
        if initial_carry is None:
            initial_carry = cell.initialize_carry(jax.random.key(0), (batch, inputs.shape[-1]))

        if lengths is None:

            def step(cell, carry, x):
                return cell(carry, x)

            xs = (inputs,)
        else:
            lengths = jnp.asarray(lengths)
            if lengths.shape != (batch,):
                raise ValueError(f"Recurrent: lengths must have shape [batch]=({batch},); got {lengths.shape}.")
            valid = lengths_to_valid(lengths, steps)  # [batch, T]

            def step(cell, carry, x, ok):
                new_carry, y = cell(carry, x)
                return _where_valid(ok, new_carry, carry), _where_valid(ok, y, jnp.zeros_like(y))

            xs = (inputs, valid)

        scan = nn.scan(
            step,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
            reverse=self.reverse,
            unroll=self.unroll,
        )
        final_carry, outputs = scan(cell, initial_carry, *xs)
        return outputs, final_carry


class Bidirectional(nn.Module):
    """A forward and a backward ``Recurrent`` over the same inputs, outputs concatenated.

    For ``x [batch, T, in]`` and lengths ``L``::

        y_fwd, carry_fwd = Recurrent(cell)(x, L)                  reads 0 .. L-1
        y_bwd, carry_bwd = Recurrent(backward_cell, reverse)(x, L)  reads L-1 .. 0
        outputs = concat([y_fwd, y_bwd], axis=-1)                 [batch, T, H_fwd + H_bwd]

    At every position ``t`` the output sees the whole (unpadded) sequence: the past through
    ``y_fwd[t]`` and the future through ``y_bwd[t]``. Padded positions are zero in both.

    Parameters: ``forward/cell/...`` and ``backward/cell/...`` (two independent sets).

    Attributes:
      cell: the forward cell (a template; it is cloned, never shared).
      backward_cell: the backward cell (default: another clone of ``cell``, with its own
        parameters).
      unroll: passed to both ``Recurrent`` layers.
    """

    cell: nn.RNNCellBase
    backward_cell: nn.RNNCellBase | None = None
    unroll: int = 1

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        lengths: Array | None = None,
        initial_carry: tuple[Carry, Carry] | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[Array, tuple[Carry, Carry]]:
        """``inputs [batch, T, in]``, optional ``lengths [batch]`` and ``(fwd, bwd)`` initial carries.

        Returns ``(outputs [batch, T, H_fwd + H_bwd], (forward_carry, backward_carry))``.
        """
        fwd_cell = self.cell
        bwd_cell = self.backward_cell if self.backward_cell is not None else self.cell  # Recurrent clones it
        init_f, init_b = (None, None) if initial_carry is None else initial_carry
        y_f, carry_f = Recurrent(fwd_cell, reverse=False, unroll=self.unroll, name="forward")(
            inputs, lengths, init_f, deterministic=deterministic)
        y_b, carry_b = Recurrent(bwd_cell, reverse=True, unroll=self.unroll, name="backward")(
            inputs, lengths, init_b, deterministic=deterministic)
        return jnp.concatenate([y_f, y_b], axis=-1), (carry_f, carry_b)


CellSpec = Union[str, Callable[[int], nn.RNNCellBase]]


class StackedRNN(nn.Module):
    """A stack of recurrent layers, the usual sequence encoder.

    For ``x [batch, T, in]`` and lengths ``L``::

        h^0 = x
        h^l, carry^l = Layer_l(Dropout(h^{l-1}) if l > 1 else h^0, L)     l = 1 .. num_layers
        outputs = h^{num_layers}          [batch, T, H]  (or [batch, T, 2H] if bidirectional)

    where ``Layer_l`` is ``Recurrent`` or ``Bidirectional``. Dropout (rate ``dropout_rate``)
    is applied between layers only, never to the input or the output, and needs a
    ``'dropout'`` rng when ``deterministic=False``. Padded positions stay zero throughout.

    Parameters: ``layer_0``, ``layer_1``, ... each holding ``cell/...`` (unidirectional) or
    ``forward/cell/...`` and ``backward/cell/...`` (bidirectional).

    Attributes:
      features: hidden size H of every layer (per direction).
      num_layers: number of stacked layers.
      cell: ``'rnn'``, ``'lstm'`` or ``'gru'`` (built with ``make_cell``), or a factory
        ``features -> cell`` (e.g. ``functools.partial(LSTMCell, forget_bias=0.0)``).
      cell_kwargs: extra constructor arguments when ``cell`` is a name.
      bidirectional: use ``Bidirectional`` layers.
      dropout_rate: dropout between layers.
      unroll: passed to the scans.
    """

    features: int
    num_layers: int = 1
    cell: CellSpec = "lstm"
    cell_kwargs: Mapping[str, Any] | None = None
    bidirectional: bool = False
    dropout_rate: float = 0.0
    unroll: int = 1

    def _check(self) -> None:
        if isinstance(self.cell, str):
            _cell_kind(self.cell, "StackedRNN.cell")
            return
        if isinstance(self.cell, nn.Module) or not callable(self.cell):
            raise TypeError(
                "StackedRNN.cell must be a name ('rnn', 'lstm', 'gru') or a factory features -> cell "
                f"(e.g. LSTMCell or functools.partial(LSTMCell, ...)); got {self.cell!r}."
            )
        if self.cell_kwargs:
            raise ValueError("StackedRNN.cell_kwargs is only used with a cell name; put them in the factory instead.")

    def _make(self) -> nn.RNNCellBase:
        if isinstance(self.cell, str):
            return make_cell(self.cell, self.features, **dict(self.cell_kwargs or {}))
        return self.cell(self.features)

    @nn.compact
    def __call__(
        self, inputs: Array, lengths: Array | None = None, *, deterministic: bool = True
    ) -> tuple[Array, tuple[Carry, ...]]:
        """``inputs [batch, T, in]``, optional ``lengths [batch]``.

        Returns ``(outputs [batch, T, H or 2H], carries)`` where ``carries`` has one final
        carry per layer, each a ``(forward, backward)`` pair when bidirectional.
        """
        if self.num_layers < 1:
            raise ValueError(f"StackedRNN.num_layers must be >= 1; got {self.num_layers}.")
        self._check()  # fail early, before tracing the scans, on a bad `cell`
        x = inputs
        carries = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout_rate > 0.0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            if self.bidirectional:
                module = Bidirectional(self._make(), self._make(), unroll=self.unroll, name=f"layer_{layer}")
            else:
                module = Recurrent(self._make(), unroll=self.unroll, name=f"layer_{layer}")
            x, carry = module(x, lengths, deterministic=deterministic)
            carries.append(carry)
        return x, tuple(carries)
