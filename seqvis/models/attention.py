"""Scaled dot-product attention and multi-head attention.

For queries ``q [..., Lq, d]``, keys ``k [..., Lk, d]`` and values ``v [..., Lk, dv]``::

    A = softmax(q kᵀ / √d  masked where mask is False)       [..., Lq, Lk]
    Attention(q, k, v) = A v                                  [..., Lq, dv]

Each row of ``A`` is a probability distribution over the keys a query may attend to.
Multi-head attention projects the inputs ``h`` times into ``d = width / h`` dimensions,
attends in each head independently and projects the concatenated heads back::

    head_i = Attention(x_q W_i^Q, x_kv W_i^K, x_kv W_i^V)
    MHA(x_q, x_kv) = concat(head_1 .. head_h) W^O

Masks are boolean and say where a query *may* attend (True = keep). Helpers build the
two masks a sequence model needs: causal (no peeking at later positions) and padding
(no attending to padded positions).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


Array = jax.Array
Dtype = Any


# --------------------------------------------------------------------------- masks


def make_causal_mask(length: int) -> Array:
    """Lower-triangular boolean mask ``[length, length]``: query i may see keys j <= i."""
    idx = jnp.arange(length)
    return idx[:, None] >= idx[None, :]


def make_padding_mask(query_valid: Array, key_valid: Array | None = None) -> Array:
    """Mask ``[batch, 1, Lq, Lk]`` from per-position validity ``[batch, L]`` (True = real token).

    A query attends only to real keys; padded queries are allowed to attend to real keys too
    (their outputs are ignored downstream) so that no softmax row is empty.
    """
    if key_valid is None:
        key_valid = query_valid
    key_valid = jnp.asarray(key_valid, bool)
    lq = query_valid.shape[-1]
    return jnp.broadcast_to(key_valid[:, None, None, :], key_valid.shape[:1] + (1, lq) + key_valid.shape[1:])


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the masks that are not None (broadcasting); None if all are None."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = jnp.asarray(masks[0], bool)
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


# --------------------------------------------------------------------------- functional


def attention_weights(q: Array, k: Array, mask: Array | None = None, bias: Array | None = None) -> Array:
    """A = softmax(q kᵀ/√d [+ bias], masked) over the last axis; float32 softmax.

    Args:
      q: ``[..., Lq, d]``; k: ``[..., Lk, d]``; mask: boolean, broadcastable to ``[..., Lq, Lk]``.
    Returns:
      weights ``[..., Lq, Lk]`` in the dtype of ``q``. A fully masked row becomes uniform
      (a large finite negative number is used instead of -inf, so there is no NaN).
    """
    d = q.shape[-1]
    logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(q.dtype)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    return_weights: bool = False,
    *,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
):
    """softmax(q kᵀ / √d_k) v over the last two axes.

    Args:
      q: queries ``[..., Lq, d]``.
      k: keys ``[..., Lk, d]``.
      v: values ``[..., Lk, dv]``.
      mask: optional boolean mask broadcastable to ``[..., Lq, Lk]``; True = may attend.
      return_weights: also return the attention weights ``[..., Lq, Lk]``.
      bias: optional additive logit bias broadcastable to ``[..., Lq, Lk]``.
      dropout_rate, dropout_rng: dropout on the weights (inverted dropout) when both are set.

    Returns:
      ``out [..., Lq, dv]``, or ``(out, weights)`` if ``return_weights``. The returned weights
      are the ones before dropout.

    Worked example: q=[1,0], K=[[1,0],[0,1],[1,1]], V=K gives weights
    [0.401, 0.198, 0.401] and output [0.802, 0.599].
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the last (feature) axis, got q {q.shape} and k {k.shape}.")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of positions, got k {k.shape} and v {v.shape}.")
    weights = attention_weights(q, k, mask, bias)
    used = weights
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        used = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(weights.dtype)
    out = jnp.einsum("...qk,...kd->...qd", used, v)
    return (out, weights) if return_weights else out


# --------------------------------------------------------------------------- module


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention (self- or cross-attention).

    Shapes: ``inputs_q [batch, Lq, Dq]``, ``inputs_kv [batch, Lk, Dkv]`` (defaults to
    ``inputs_q``: self-attention), ``mask`` boolean broadcastable to ``[batch, heads, Lq, Lk]``;
    output ``[batch, Lq, out_features or Dq]``.

    Parameters (names follow the published ViT checkpoints): ``query``, ``key``, ``value``
    with kernels ``[D, heads, head_dim]`` and ``out`` with kernel ``[heads, head_dim, D_out]``.

    The attention weights ``[batch, heads, Lq, Lk]`` are recorded with
    ``sow('intermediates', 'attention_weights', ...)``; read them with
    ``model.apply(variables, x, mutable=['intermediates'])``.

    For autoregressive decoding, ``__call__`` takes a key/value ``cache`` (written at
    ``cache_index``, or static cross-attention keys/values from :meth:`project_kv`) and then
    returns ``(out, cache)``; the parameters are the same in every mode.

    Attributes:
      num_heads: number of heads h; ``qkv_features`` must be divisible by it.
      qkv_features: total width of q, k, v (default: the query input width).
      out_features: output width (default: the query input width).
      dropout_rate: dropout on the attention weights (needs a 'dropout' rng when training).
      use_fused: use ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, XLA
        elsewhere). Same numbers as the plain path; weights are then not recorded and
        attention dropout is not available.
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    use_fused: bool = False
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        *,
        causal: bool = False,
        deterministic: bool = True,
        cache: dict | None = None,
        cache_index: int | Array | None = None,
    ):
        """Attend from ``inputs_q`` to ``inputs_kv``; returns ``out``, or ``(out, cache)`` with ``cache``.

        Decoding modes (``cache = {'key', 'value'}``, each ``[batch, N, heads, head_dim]``):

        - static (``cache_index=None``): the keys/values are ``cache`` (e.g. from :meth:`project_kv`,
          computed once per image for cross-attention); ``inputs_kv`` must be None.
        - update (``cache_index=t``): ``inputs_q`` are the tokens at positions ``t .. t+Lq-1``; their
          keys/values (from ``inputs_kv``, default ``inputs_q``) are written into the cache there, and
          query ``t+i`` attends to cache positions ``<= t+i`` only (causal; later slots are not written
          yet and whatever they hold is masked). ``t + Lq`` must not exceed N.
        """
        return self._attend(inputs_q, inputs_kv, mask, causal, deterministic, cache, cache_index)

    def project_kv(self, inputs_kv: Array, query_features: int | None = None) -> dict:
        """Keys and values of ``inputs_kv [batch, Lk, D]``: ``{'key', 'value'}`` ``[batch, Lk, heads, head_dim]``,
        the static cache of a cross-attention. ``query_features``: the width of the queries they will
        meet (sets the head width when ``qkv_features`` is None; default ``D``)."""
        return self._attend(None, inputs_kv, None, False, True, None, None, query_features)

    @nn.compact
    def _attend(self, inputs_q, inputs_kv, mask, causal, deterministic, cache, cache_index, query_features=None):
        static = cache is not None and cache_index is None
        if static and inputs_kv is not None:
            raise ValueError("MultiHeadAttention: pass inputs_kv or a static cache (cache_index=None), not both.")
        if inputs_kv is None and not static:
            inputs_kv = inputs_q
        for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
            if x is not None and x.ndim != 3:
                raise ValueError(f"MultiHeadAttention expects inputs [batch, length, features]; got {name} {x.shape}.")
        q_width = inputs_q.shape[-1] if inputs_q is not None else (query_features or inputs_kv.shape[-1])
        features = self.qkv_features or q_width
        if features % self.num_heads:
            raise ValueError(
                f"Attention width {features} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides the width (e.g. width 192 with 3 heads)."
            )
        head_dim = features // self.num_heads
        dense = lambda name: nn.DenseGeneral(  # noqa: E731
            features=(self.num_heads, head_dim),
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if inputs_q is None:  # project_kv
            return {"key": dense("key")(inputs_kv), "value": dense("value")(inputs_kv)}
        q = dense("query")(inputs_q)  # [b, Lq, h, d]
        if static:
            k, v = cache["key"], cache["value"]  # [b, Lk, h, d]
        else:
            k = dense("key")(inputs_kv)  # [b, Lk, h, d]
            v = dense("value")(inputs_kv)  # [b, Lk, h, d]

        lq = q.shape[1]
        if cache is not None and not static:  # update: write at cache_index, attend to positions <= own
            n = cache["key"].shape[1]
            if k.shape[1] != lq:
                raise ValueError(f"a self-attention cache needs as many keys as queries, got {k.shape[1]} and {lq}.")
            if isinstance(cache_index, int) and not 0 <= cache_index <= n - lq:
                raise ValueError(f"cache_index={cache_index} with {lq} new tokens does not fit a cache of length {n}.")
            upd = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), cache_index, axis=1)  # noqa
            k, v = upd(cache["key"], k), upd(cache["value"], v)
            cache = {"key": k, "value": v}
            written = jnp.arange(n)[None, :] <= (cache_index + jnp.arange(lq))[:, None]  # [Lq, N]
            mask = combine_masks(mask, written[None, None])
        elif causal:
            if static:
                raise ValueError("causal attention has no meaning with a static (cross-attention) cache.")
            if lq != k.shape[1]:
                raise ValueError(f"causal attention needs Lq == Lk, got {lq} and {k.shape[1]}.")
            mask = combine_masks(mask, make_causal_mask(lq)[None, None])
        lk = k.shape[1]
        if mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(mask, bool), (q.shape[0], self.num_heads, lq, lk))

        train_dropout = self.dropout_rate > 0.0 and not deterministic
        if self.use_fused:
            if train_dropout:
                raise ValueError(
                    "use_fused attention has no attention dropout; set attention dropout to 0 "
                    "(e.g. config.model.attention_dropout_rate=0.0) or use_fused=False."
                )
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [b, Lq, h, d]
        else:
            qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [b, h, L, d]
            rng = self.make_rng("dropout") if train_dropout else None
            out, weights = dot_product_attention(
                qh, kh, vh, mask, return_weights=True, dropout_rate=self.dropout_rate, dropout_rng=rng
            )
            self.sow("intermediates", "attention_weights", weights)
            out = jnp.swapaxes(out, 1, 2)  # [b, Lq, h, d]

        out = nn.DenseGeneral(
            features=self.out_features or inputs_q.shape[-1],
            axis=(-2, -1),
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)
        return out if cache is None else (out, cache)
