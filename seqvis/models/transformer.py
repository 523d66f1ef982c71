"""Transformer blocks: MLP, pre-LayerNorm encoder block, encoder stack, decoder block.

Pre-LN encoder block (Vaswani et al. 2017 with the LayerNorm moved before each branch, as
in ViT), on tokens ``x [batch, L, D]``::

    x = x + DropPath(Dropout(MHA(LN(x))))
    x = x + DropPath(MLP(LN(x)))            MLP(x) = Dropout(W2 Dropout(GELU(W1 x + b1)) + b2)

Decoder block (for captioning): causal self-attention, then cross-attention from the text
tokens ``y [batch, T, D]`` to the image tokens ``m [batch, S, Dm]``, then the MLP, each with
its pre-LN residual. For decoding one token at a time the decoder carries a key/value
cache per layer (``[batch, max_len, heads, head_dim]``, written at the current index) and
takes the cross-attention keys/values of the memory precomputed once (``Decoder.cross_kv``).

Stochastic depth (Huang et al. 2016) drops a whole residual branch per example with
probability p during training and rescales survivors by 1/(1-p); in a stack of L layers
layer l uses p_l = p · l / (L - 1).

The encoder can ``nn.scan`` over its layers: one block is traced and compiled once and the
parameters get a leading ``[num_layers]`` axis, so compile time does not grow with depth.
With ``remat`` the block's activations are recomputed in the backward pass (less memory).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqvis.models.attention import MultiHeadAttention

Array = jax.Array
Dtype = Any


class MlpBlock(nn.Module):
    """Two-layer MLP ``[..., D] -> [..., mlp_dim] -> [..., out_dim or D]`` with GELU."""

    mlp_dim: int
    out_dim: int | None = None
    dropout_rate: float = 0.0
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.normal(stddev=1e-6)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        out_dim = self.out_dim or x.shape[-1]
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, kernel_init=self.kernel_init, bias_init=self.bias_init,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = dense(self.mlp_dim, "Dense_0")(x)
        x = nn.gelu(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim, "Dense_1")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch ``[batch, ...]``: zero it per example w.p. ``rate``.

    ``rate`` may be a traced scalar (it varies per layer inside a scanned stack).
    """

    @nn.compact
    def __call__(self, x: Array, rate: float | Array, *, deterministic: bool = True) -> Array:
        if deterministic:
            return x
        if isinstance(rate, (int, float)) and rate == 0.0:
            return x
        keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
        return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


class LearnedPositionEmbedding(nn.Module):
    """Adds a learned ``pos_embedding [1, L, D]`` (N(0, 0.02) init) to tokens ``[batch, L, D]``."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:],
                        self.param_dtype)
        return x + pe.astype(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-LN transformer encoder block ``[batch, L, D] -> [batch, L, D]``.

    Parameter names follow the published ViT checkpoints: ``LayerNorm_0``,
    ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``.
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    use_fused_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, drop_path_rate: float | Array = 0.0,
                 deterministic: bool = True) -> Array:
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm_0")(x)
        y = MultiHeadAttention(
            num_heads=self.num_heads,
            dropout_rate=self.attention_dropout_rate,
            use_fused=self.use_fused_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="MultiHeadDotProductAttention_1",
        )(y, mask=mask, deterministic=deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = x + DropPath(name="DropPath_attn")(y, drop_path_rate, deterministic=deterministic)

        y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm_2")(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="MlpBlock_3")(y, deterministic=deterministic)
        return x + DropPath(name="DropPath_mlp")(y, drop_path_rate, deterministic=deterministic)


class _ScanBlock(nn.Module):
    """EncoderBlock in the ``(carry, xs) -> (carry, ys)`` form that ``nn.scan`` needs."""

    block_kwargs: dict
    deterministic: bool

    @nn.compact
    def __call__(self, x, drop_path_rate, mask):
        block = EncoderBlock(**self.block_kwargs, name="block")
        return block(x, mask, drop_path_rate, deterministic=self.deterministic), None


def drop_path_rates(num_layers: int, stochastic_depth: float) -> list[float]:
    """Linearly increasing stochastic-depth rates, 0 for the first layer, p for the last."""
    if num_layers <= 1:
        return [float(stochastic_depth)] * num_layers
    return [stochastic_depth * i / (num_layers - 1) for i in range(num_layers)]


class Encoder(nn.Module):
    """Stack of pre-LN encoder blocks and a final LayerNorm: ``[batch, L, D] -> [batch, L, D]``.

    Attributes:
      num_layers, mlp_dim, num_heads: the block sizes.
      dropout_rate, attention_dropout_rate, stochastic_depth: regularisation; stochastic
        depth rises linearly over depth to ``stochastic_depth`` at the last layer.
      add_position_embedding: add a learned ``posembed_input/pos_embedding [1, L, D]``
        (N(0, 0.02) init) and dropout before the blocks (the ViT layout).
      scan_layers: ``nn.scan`` over layers; params are stacked under ``encoderblock``
        with a leading layer axis instead of ``encoderblock_0 .. encoderblock_{L-1}``
        (convert with :func:`stack_layer_params` / :func:`unstack_layer_params`).
      remat: recompute each block's activations in the backward pass.
    """

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth: float = 0.0
    add_position_embedding: bool = False
    scan_layers: bool = False
    remat: bool = False
    use_fused_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, *, deterministic: bool = True) -> Array:
        if x.ndim != 3:
            raise ValueError(f"Encoder expects tokens [batch, length, width], got shape {x.shape}.")
        if self.add_position_embedding:
            x = LearnedPositionEmbedding(param_dtype=self.param_dtype, name="posembed_input")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

        block_kwargs = dict(
            mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            use_fused_attention=self.use_fused_attention, dtype=self.dtype,
            param_dtype=self.param_dtype)
        rates = drop_path_rates(self.num_layers, self.stochastic_depth)

        if self.scan_layers:
            block_cls = _ScanBlock
            if self.remat:
                block_cls = nn.remat(block_cls, prevent_cse=False)
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=self.num_layers,
            )(block_kwargs=block_kwargs, deterministic=deterministic, name="encoderblock")
            x, _ = stack(x, jnp.asarray(rates, jnp.float32), mask)
        else:
            block_cls = nn.remat(EncoderBlock, static_argnums=(4,)) if self.remat else EncoderBlock
            for i in range(self.num_layers):
                blk = block_cls(**block_kwargs, name=f"encoderblock_{i}")
                x = blk(x, mask, rates[i], deterministic)
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm")(x)


def stack_layer_params(params: dict, num_layers: int) -> dict:
    """Unrolled encoder params (``encoderblock_i``) -> scanned layout (``encoderblock/block``)."""
    params = dict(params)
    blocks = [params.pop(f"encoderblock_{i}") for i in range(num_layers)]
    params["encoderblock"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def unstack_layer_params(params: dict) -> dict:
    """Scanned encoder params (``encoderblock/block``) -> unrolled layout (``encoderblock_i``)."""
    params = dict(params)
    stacked = params.pop("encoderblock")["block"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        params[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention to memory, MLP.

    Shapes: ``y [batch, T, D]`` text tokens, ``memory [batch, S, Dm]`` image tokens,
    optional ``self_mask`` broadcastable to ``[batch, heads, T, T]`` (ANDed with the causal
    mask) and ``memory_mask`` broadcastable to ``[batch, heads, T, S]``; output ``[batch, T, D]``.
    Cross-attention weights are sown by the ``CrossAttention`` submodule.

    Decoding with a key/value cache: ``cache = {'key', 'value'}`` ``[batch, N, heads, head_dim]``
    (the self-attention keys/values of positions ``< cache_index``) and ``y`` the tokens at
    positions ``cache_index ..``; ``cross`` optionally holds the cross-attention keys/values of
    ``memory`` from :meth:`cross_kv` (then ``memory`` is not read). Returns ``(out, new_cache)``.
    Built in ``setup`` (so ``cross_kv`` can reach the submodules) with the names the compact
    version had, so parameters and dropout streams are unchanged.
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    use_fused_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self):
        ln = lambda: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)  # noqa: E731
        mha = lambda: MultiHeadAttention(  # noqa: E731
            num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
            use_fused=self.use_fused_attention, dtype=self.dtype, param_dtype=self.param_dtype)
        self.LayerNorm_0 = ln()
        self.SelfAttention = mha()
        self.Dropout_0 = nn.Dropout(self.dropout_rate)
        self.LayerNorm_1 = ln()
        self.CrossAttention = mha()
        self.Dropout_1 = nn.Dropout(self.dropout_rate)
        self.LayerNorm_2 = ln()
        self.MlpBlock = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                                 param_dtype=self.param_dtype)

    def __call__(self, y: Array, memory: Array | None, self_mask: Array | None = None,
                 memory_mask: Array | None = None, *, deterministic: bool = True,
                 cache: dict | None = None, cache_index: int | Array | None = None, cross: dict | None = None):
        h = self.LayerNorm_0(y)
        if cache is None:
            h = self.SelfAttention(h, mask=self_mask, causal=True, deterministic=deterministic)
        else:
            h, cache = self.SelfAttention(h, mask=self_mask, cache=cache, cache_index=cache_index,
                                          deterministic=deterministic)
        y = y + self.Dropout_0(h, deterministic=deterministic)
        h = self.LayerNorm_1(y)
        if cross is None:
            h = self.CrossAttention(h, memory, mask=memory_mask, deterministic=deterministic)
        else:
            h, _ = self.CrossAttention(h, mask=memory_mask, cache=cross, deterministic=deterministic)
        y = y + self.Dropout_1(h, deterministic=deterministic)
        y = y + self.MlpBlock(self.LayerNorm_2(y), deterministic=deterministic)
        return y if cache is None else (y, cache)

    def cross_kv(self, memory: Array, width: int) -> dict:
        """Cross-attention keys/values of ``memory`` for queries of width ``width`` (once per image)."""
        return self.CrossAttention.project_kv(memory, query_features=width)


class Decoder(nn.Module):
    """Stack of decoder blocks and a final LayerNorm: ``[batch, T, D], [batch, S, Dm] -> [batch, T, D]``.

    With ``cache`` (one :class:`DecoderBlock` cache per layer, keyed ``decoderblock_i``; see
    :meth:`init_cache`) it decodes the tokens at positions ``cache_index ..`` and returns
    ``(out, new_cache)``; ``cross`` (from :meth:`cross_kv`) replaces the per-call cross-attention
    key/value projections of ``memory``.
    """

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    use_fused_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.blocks = [
            DecoderBlock(
                mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                use_fused_attention=self.use_fused_attention, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"decoderblock_{i}")
            for i in range(self.num_layers)]
        self.decoder_norm = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, y: Array, memory: Array | None, self_mask: Array | None = None,
                 memory_mask: Array | None = None, *, deterministic: bool = True,
                 cache: dict | None = None, cache_index: int | Array | None = None, cross: dict | None = None):
        new_cache = {}
        for i, block in enumerate(self.blocks):
            name = f"decoderblock_{i}"
            if cache is None:
                y = block(y, memory, self_mask, memory_mask, deterministic=deterministic,
                          cross=None if cross is None else cross[name])
            else:
                y, new_cache[name] = block(y, memory, self_mask, memory_mask, deterministic=deterministic,
                                           cache=cache[name], cache_index=cache_index,
                                           cross=None if cross is None else cross[name])
        y = self.decoder_norm(y)
        return y if cache is None else (y, new_cache)

    def cross_kv(self, memory: Array, width: int) -> dict:
        """Every layer's cross-attention keys/values of ``memory [batch, S, Dm]`` for a decoder of
        width ``width``: ``{decoderblock_i: {'key', 'value'} [batch, S, heads, width/heads]}``."""
        return {f"decoderblock_{i}": block.cross_kv(memory, width) for i, block in enumerate(self.blocks)}

    @nn.nowrap
    def init_cache(self, batch: int, length: int, width: int, dtype: Dtype = jnp.float32) -> dict:
        """An empty self-attention cache: ``{decoderblock_i: {'key', 'value'} [batch, length, heads, width/heads]}``."""
        if width % self.num_heads:
            raise ValueError(f"decoder width {width} is not divisible by num_heads={self.num_heads}.")
        zeros = jnp.zeros((batch, length, self.num_heads, width // self.num_heads), dtype)
        return {f"decoderblock_{i}": {"key": zeros, "value": zeros} for i in range(self.num_layers)}
