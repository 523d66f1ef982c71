"""Transformer blocks: MLP, pre-LayerNorm encoder block, encoder stack, decoder block.

Pre-LN encoder block (Vaswani et al. 2017 with the LayerNorm moved before each branch, as
in ViT), on tokens ``x [batch, L, D]``::

    x = x + DropPath(Dropout(MHA(LN(x))))
    x = x + DropPath(MLP(LN(x)))            MLP(x) = Dropout(W2 Dropout(GELU(W1 x + b1)) + b2)

Decoder block (for captioning): causal self-attention, then cross-attention from the text
tokens ``y [batch, T, D]`` to the image tokens ``m [batch, S, Dm]``, then the MLP, each with
its pre-LN residual.

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
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    use_fused_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Array, memory: Array, self_mask: Array | None = None,
                 memory_mask: Array | None = None, *, deterministic: bool = True) -> Array:
        ln = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        mha = lambda name: MultiHeadAttention(  # noqa: E731
            num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
            use_fused=self.use_fused_attention, dtype=self.dtype, param_dtype=self.param_dtype,
            name=name)
        drop = lambda t: nn.Dropout(self.dropout_rate)(t, deterministic=deterministic)  # noqa: E731

        h = mha("SelfAttention")(ln("LayerNorm_0")(y), mask=self_mask, causal=True,
                                 deterministic=deterministic)
        y = y + drop(h)
        h = mha("CrossAttention")(ln("LayerNorm_1")(y), memory, mask=memory_mask,
                                  deterministic=deterministic)
        y = y + drop(h)
        h = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="MlpBlock")(ln("LayerNorm_2")(y),
                                                                    deterministic=deterministic)
        return y + h


class Decoder(nn.Module):
    """Stack of decoder blocks and a final LayerNorm: ``[batch, T, D], [batch, S, Dm] -> [batch, T, D]``."""

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    use_fused_attention: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Array, memory: Array, self_mask: Array | None = None,
                 memory_mask: Array | None = None, *, deterministic: bool = True) -> Array:
        for i in range(self.num_layers):
            y = DecoderBlock(
                mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                use_fused_attention=self.use_fused_attention, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"decoderblock_{i}",
            )(y, memory, self_mask, memory_mask, deterministic=deterministic)
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="decoder_norm")(y)
