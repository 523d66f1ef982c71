"""Image captioning: Show and Tell, Show Attend and Tell, a transformer decoder, and decoding.

A caption is a word sequence ``y_0 = <bos>, y_1 .. y_n, y_{n+1} = <eos>``; every model
factorises ``p(y | image) = Π_t p(y_t | y_<t, image)`` and is trained with teacher forcing:
given the inputs ``y_0 .. y_{T-1}`` it returns logits ``[B, T, V]`` for the targets
``y_1 .. y_T``. The image encoder (a :class:`~seqvis.models.resnet.ResNetEncoder` or
:class:`ViTGridEncoder`) turns ``images [B, H, W, C]`` into a feature map ``[B, h, w, D]``,
i.e. ``L = h·w`` regions ``a_1 .. a_L`` (row-major).

**Show and Tell** (Vinyals et al. 2015). One image vector, fed to an LSTM as its first input::

    v = W_I pool(a)          pool = mean over regions, or flatten (keeps where things are)
    (c, h)_0 = LSTM(0, v);   (c, h)_t = LSTM((c, h)_{t-1}, W_e y_{t-1});   p(y_t) = softmax(W_o h_t)

**Show, Attend and Tell** (Xu et al. 2015), soft attention. At each step the LSTM reads a
context vector, an attention-weighted average of the regions::

    e_ti = w_a · tanh(W_a a_i + U_a h_{t-1} + b)      α_t = softmax_i(e_t)        [B, L]
    β_t = σ(w_β · h_{t-1} + b_β)                      (the gating scalar)
    z_t = β_t Σ_i α_ti a_i
    (c, h)_t = LSTM((c, h)_{t-1}, [W_e y_{t-1}; z_t])
    p(y_t) ∝ exp(L_o(W_e y_{t-1} + L_h h_t + L_z z_t))   (the deep output layer)
    (c, h)_0 = tanh(W_c mean_i a_i), tanh(W_h mean_i a_i)

and the doubly stochastic regulariser ``λ Σ_i (1 - Σ_t α_ti)²`` (computed by the task from the
returned α) asks every region to be looked at about once over the caption. ``α_t`` is
sown as ``intermediates/core/attention`` for every step.

**Transformer decoder**. Image tokens ``m = LN(W_m a + E_pos)`` ``[B, L, D]``; word tokens
``W_e y_t + P_t``; a stack of pre-LN decoder blocks (causal self-attention, cross-attention to
``m``, MLP; :class:`~seqvis.models.transformer.Decoder`); ``p(y_t) = softmax(W_o LN(x_t))``.
Cross-attention weights are sown by each block (``.../CrossAttention/attention_weights``);
grounding reads the last block's, averaged over heads.

**Decoding** (:mod:`seqvis.models.decoding`: jit-compiled, batched greedy and beam search). Each model has ``encode(images) -> memory``, ``init_state(memory) -> state``
and ``step(memory, state, y_{t-1}, t) -> (logits [B, V], state)``, whose logits equal the
teacher-forced logits for the same prefix: the LSTMs run the same cell; the transformer (with
``kv_cache=True``, the default) keeps every layer's self-attention keys/values
``[B, max_positions, heads, head_dim]`` in ``state``, writes position t's at index t and attends
to positions <= t, and its cross-attention keys/values over the regions are computed once per
image (``prepare_decoding``), so a step runs one token through the layers (attending over the
``max_positions`` cache slots) instead of re-running the whole prefix and re-projecting the
regions (``kv_cache=False``: the reference path, O(T²) per caption, same parameters).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqvis.models.recurrent import LSTMCell, Recurrent
from seqvis.models.resnet import ResNetEncoder
from seqvis.models.transformer import Decoder, LearnedPositionEmbedding

Array = jax.Array


# ============================================================================ encoders


class ViTGridEncoder(nn.Module):
    """ViT patches as regions: ``images [B, H, W, C] -> feature map [B, H/p, W/p, D]``.

    Attributes:
      vit: a :class:`~seqvis.models.vit.ViT` built with ``pool='gap'`` (no class token) and
        ``num_classes=None``; its encoder output tokens are reshaped to the patch grid.
    """

    vit: nn.Module

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        if getattr(self.vit, "pool", "gap") != "gap":
            raise ValueError("ViTGridEncoder needs a ViT with pool='gap' (a class token is not a region).")
        _, tokens = self.vit(images, train=train, return_features=True)
        sh, sw = self.vit.stride()
        b, _, d = tokens.shape
        return tokens.reshape(b, images.shape[1] // sh, images.shape[2] // sw, d)


def region_geometry(encoder: nn.Module, image_hw: tuple[int, int], grid: tuple[int, int]
                    ) -> tuple[float, float, float, float]:
    """Where the regions sit in the image: ``(y_0, x_0, step_y, step_x)`` in continuous pixel
    coordinates (pixel i spans [i, i + 1)); region (r, c) is centred at ``(y_0 + r·step_y, x_0 + c·step_x)``.

    - ResNet trunk with symmetric padding, total stride S: every conv / pool with kernel k,
      stride s and padding (k-1)/2 centres output j on input s·j, so region n is centred on
      pixel S·n: ``(½, ½, S, S)`` (the grid starts at the top-left pixel, not half a cell in).
    - ViT patches of p px: patch n covers [p·n, p·n + p): ``(p/2, p/2, p, p)``.
    - Anything else: the grid stretched over the image, ``(H/2h, W/2w, H/h, W/w)``.
    """
    if isinstance(encoder, ResNetEncoder) and encoder.padding == "symmetric":
        s = float(encoder.output_stride())
        return 0.5, 0.5, s, s
    if isinstance(encoder, ViTGridEncoder) and not getattr(encoder.vit, "hybrid_stages", None):
        sh, sw = (float(v) for v in encoder.vit.stride())
        return sh / 2, sw / 2, sh, sw
    return stretched_geometry(grid, image_hw)


def stretched_geometry(grid: tuple[int, int], image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """The ``h x w`` grid stretched over an ``H x W`` image: region r centred at (r + ½)·H/h, ``(H/2h, W/2w, H/h, W/w)``."""
    (h, w), (hh, ww) = grid, image_hw
    return hh / (2 * h), ww / (2 * w), hh / h, ww / w


def _regions(fmap: Array) -> Array:
    """Feature map ``[B, h, w, D]`` -> regions ``[B, h·w, D]`` (row-major)."""
    if fmap.ndim != 4:
        raise ValueError(f"the image encoder must return a feature map [B, h, w, D]; got shape {fmap.shape}.")
    b, h, w, d = fmap.shape
    return fmap.reshape(b, h * w, d)


# ============================================================================ Show and Tell


class ShowAndTell(nn.Module):
    """CNN -> one image vector -> LSTM (Vinyals et al. 2015); formulas in the module docstring.

    Shapes: ``images [B, H, W, C]``, ``inputs [B, T]`` int word ids (``<bos> y_1 .. y_{T-1}``);
    returns ``(logits [B, T, V] float32, aux)`` with ``aux = {}``.

    Attributes:
      encoder: image encoder ``images -> [B, h, w, D]`` (e.g. ``ResNetEncoder``).
      vocab_size: V.
      embed_dim: width of word embeddings and of the image vector.
      hidden_dim: LSTM width.
      pooling: 'mean' (global average pooling, as the paper's CNN) or 'flatten' (a linear map
        of the whole feature map, so the image vector knows where things are).
      dropout_rate: dropout on the word embeddings and on the LSTM outputs.
      dtype: compute dtype of the matmuls (None: float32); parameters, the LSTM state and the
        logits stay float32 (seqvis.train.precision).
    """

    encoder: nn.Module
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 512
    pooling: str = "mean"
    dropout_rate: float = 0.0
    dtype: Any = None

    def setup(self):
        if self.pooling not in ("mean", "flatten"):
            raise ValueError(f"ShowAndTell.pooling={self.pooling!r}: use 'mean' or 'flatten'.")
        self.image_proj = nn.Dense(self.embed_dim, dtype=self.dtype)
        self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
        self.lstm = Recurrent(LSTMCell(self.hidden_dim, dtype=self.dtype))
        self.out = nn.Dense(self.vocab_size, dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout_rate)

    def encode(self, images: Array, train: bool = False) -> dict:
        fmap = self.encoder(images, train=train)
        regions = _regions(fmap)
        pooled = regions.mean(axis=1) if self.pooling == "mean" else regions.reshape(regions.shape[0], -1)
        return {"image": self.image_proj(pooled)}

    def init_state(self, memory: dict) -> dict:
        _, carry = self.lstm(memory["image"][:, None, :])  # the image is the LSTM's first input
        return {"carry": carry}

    def decode_teacher(self, memory: dict, inputs: Array, train: bool = False):
        x = self.drop(self.embed(inputs), deterministic=not train)
        out, _ = self.lstm(x, initial_carry=self.init_state(memory)["carry"])
        return self.out(self.drop(out, deterministic=not train)).astype(jnp.float32), {}

    def step(self, memory: dict, state: dict, tokens: Array, t: Array, train: bool = False):
        del t
        x = self.drop(self.embed(tokens), deterministic=not train)
        out, carry = self.lstm(x[:, None, :], initial_carry=state["carry"])
        logits = self.out(self.drop(out[:, 0], deterministic=not train))
        return logits.astype(jnp.float32), {"carry": carry}

    @nn.nowrap
    def step_attention(self, intermediates: dict, t: Array) -> Array | None:
        return None  # no attention

    def __call__(self, images: Array, inputs: Array, train: bool = False):
        return self.decode_teacher(self.encode(images, train=train), inputs, train=train)


# ============================================================================ Show, Attend and Tell


class AttendStep(nn.Module):
    """One Show-Attend-Tell step (module docstring): ``((c, h), emb [B, E], memory) ->
    ((c, h), (logits [B, V], α [B, L], β [B]))``. ``memory`` holds ``regions [B, L, D]`` and
    their projection ``keys [B, L, A]`` (``W_a a_i + b``, computed once per image)."""

    vocab_size: int
    embed_dim: int
    hidden_dim: int
    attention_dim: int
    gate: bool = True
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, carry, emb: Array, memory: dict, train: bool = False):
        c, h = carry
        dt = self.dtype
        query = nn.Dense(self.attention_dim, use_bias=False, dtype=dt, name="query")(h)          # U_a h
        scores = nn.Dense(1, dtype=dt, name="score")(jnp.tanh(memory["keys"] + query[:, None]))  # w_a·tanh(.)
        alpha = jax.nn.softmax(scores[..., 0].astype(jnp.float32), axis=-1)          # [B, L]
        self.sow("intermediates", "attention", alpha)
        z = jnp.einsum("bl,bld->bd", alpha.astype(memory["regions"].dtype), memory["regions"])
        if self.gate:
            beta = jax.nn.sigmoid(nn.Dense(1, dtype=dt, name="gate")(h))              # [B, 1]
            z = beta * z
        else:
            beta = jnp.ones((h.shape[0], 1), h.dtype)
        x = jnp.concatenate([emb, z.astype(emb.dtype)], axis=-1)
        (c, h), _ = LSTMCell(self.hidden_dim, dtype=dt, name="lstm")((c, h), x)
        hd = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        deep = emb + nn.Dense(self.embed_dim, dtype=dt, name="out_h")(hd) + \
            nn.Dense(self.embed_dim, dtype=dt, name="out_z")(z)
        logits = nn.Dense(self.vocab_size, dtype=dt, name="logits")(deep)
        return (c, h), (logits.astype(jnp.float32), alpha, beta[:, 0])


class ShowAttendTell(nn.Module):
    """CNN feature map + soft-attention LSTM (Xu et al. 2015); formulas in the module docstring.

    Shapes: ``images [B, H, W, C]``, ``inputs [B, T]``; returns ``(logits [B, T, V],
    {'attention': α [B, T, L], 'gate': β [B, T]})``.

    Attributes:
      encoder: image encoder ``images -> [B, h, w, D]``.
      vocab_size, embed_dim, hidden_dim: V, E, LSTM width.
      attention_dim: A, width of the additive attention's hidden layer.
      gate: use the gating scalar β.
      dropout_rate: dropout on word embeddings and on h before the deep output layer.
      dtype: compute dtype of the matmuls (None: float32); parameters, the LSTM state, the
        attention softmax and the logits stay float32 (seqvis.train.precision).
    """

    encoder: nn.Module
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    gate: bool = True
    dropout_rate: float = 0.0
    dtype: Any = None

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
        self.keys = nn.Dense(self.attention_dim, dtype=self.dtype)
        self.init_h = nn.Dense(self.hidden_dim, dtype=self.dtype)
        self.init_c = nn.Dense(self.hidden_dim, dtype=self.dtype)
        self.core = AttendStep(self.vocab_size, self.embed_dim, self.hidden_dim, self.attention_dim,
                               self.gate, self.dropout_rate, self.dtype)
        self.drop = nn.Dropout(self.dropout_rate)

    def encode(self, images: Array, train: bool = False) -> dict:
        regions = _regions(self.encoder(images, train=train))
        return {"regions": regions, "keys": self.keys(regions)}

    def init_state(self, memory: dict) -> dict:
        mean = memory["regions"].mean(axis=1)
        # the LSTM state is float32 whatever the compute dtype (a no-op in float32)
        return {"carry": (jnp.tanh(self.init_c(mean)).astype(jnp.float32),
                          jnp.tanh(self.init_h(mean)).astype(jnp.float32))}

    def decode_teacher(self, memory: dict, inputs: Array, train: bool = False):
        emb = self.drop(self.embed(inputs), deterministic=not train)

        def body(core, carry, x, mem):
            return core(carry, x, mem, train)

        scan = nn.scan(body, variable_broadcast="params", variable_axes={"intermediates": 1},
                       split_rngs={"params": False, "dropout": True}, in_axes=(1, nn.broadcast), out_axes=1)
        _, (logits, alpha, beta) = scan(self.core, self.init_state(memory)["carry"], emb, memory)
        return logits, {"attention": alpha, "gate": beta}

    def step(self, memory: dict, state: dict, tokens: Array, t: Array, train: bool = False):
        del t
        emb = self.drop(self.embed(tokens), deterministic=not train)
        carry, (logits, _, _) = self.core(state["carry"], emb, memory, train)
        return logits, {"carry": carry}

    @nn.nowrap
    def step_attention(self, intermediates: dict, t: Array) -> Array:
        (alpha,) = intermediates["intermediates"]["core"]["attention"]
        return alpha

    def __call__(self, images: Array, inputs: Array, train: bool = False):
        return self.decode_teacher(self.encode(images, train=train), inputs, train=train)


# ============================================================================ transformer decoder


class TransformerCaptioner(nn.Module):
    """Image tokens -> causal transformer decoder with cross-attention; docstring formulas above.

    Shapes: ``images [B, H, W, C]``, ``inputs [B, T]`` with ``T <= max_positions``; returns
    ``(logits [B, T, V], {})``.

    Attributes:
      encoder: image encoder ``images -> [B, h, w, D_img]``.
      vocab_size: V.
      max_positions: number of word positions (learned position embeddings; also the length of
        the decoding key/value cache, so at most this many tokens are decoded).
      width, num_layers, num_heads, mlp_dim: decoder sizes.
      dropout_rate, attention_dropout_rate: regularisation.
      kv_cache: decode with a key/value cache (``step`` runs one token); False re-runs the whole
        causal prefix at every step (the reference). Training and parameters do not depend on it.
        The task sets it from ``config.decode.kv_cache`` (``--config.decode.kv_cache=False``).
      dtype: compute dtype of the matmuls (None: float32); parameters, LayerNorm statistics,
        the attention softmax and the logits stay float32 (seqvis.train.precision).
    """

    encoder: nn.Module
    vocab_size: int
    max_positions: int
    width: int = 256
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    kv_cache: bool = True
    dtype: Any = None

    def setup(self):
        self.memory_proj = nn.Dense(self.width, dtype=self.dtype)
        self.memory_pos = LearnedPositionEmbedding()
        self.memory_norm = nn.LayerNorm(dtype=self.dtype)
        self.embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype)
        self.token_pos = self.param("token_pos", nn.initializers.normal(stddev=0.02),
                                    (1, self.max_positions, self.width))
        self.decoder = Decoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                               dropout_rate=self.dropout_rate,
                               attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype)
        self.out = nn.Dense(self.vocab_size, dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout_rate)

    def encode(self, images: Array, train: bool = False) -> dict:
        regions = _regions(self.encoder(images, train=train))
        return {"memory": self.memory_norm(self.memory_pos(self.memory_proj(regions)))}

    def prepare_decoding(self, memory: dict) -> dict:
        """Adds every layer's cross-attention keys/values (``cross``), computed once per image."""
        if not self.kv_cache:
            return memory
        return {**memory, "cross": self.decoder.cross_kv(memory["memory"], self.width)}

    def init_state(self, memory: dict) -> dict:
        b = memory["memory"].shape[0]
        if not self.kv_cache:
            return {"buffer": jnp.zeros((b, self.max_positions), jnp.int32)}
        return {"cache": self.decoder.init_cache(b, self.max_positions, self.width, memory["memory"].dtype)}

    def decode_teacher(self, memory: dict, inputs: Array, train: bool = False):
        t = inputs.shape[1]
        if t > self.max_positions:
            raise ValueError(f"TransformerCaptioner: {t} word positions but max_positions={self.max_positions}; "
                             "raise config.captions.max_len or shorten the inputs.")
        y = self.embed(inputs)
        y = y + self.token_pos[:, :t].astype(y.dtype)
        y = self.drop(y, deterministic=not train)
        y = self.decoder(y, memory["memory"], deterministic=not train)
        return self.out(y).astype(jnp.float32), {}

    def step(self, memory: dict, state: dict, tokens: Array, t: Array, train: bool = False):
        if not self.kv_cache:  # write y_{t-1} into the prefix buffer and re-run it (causal: t sees <= t)
            buf = jax.lax.dynamic_update_slice_in_dim(state["buffer"], tokens[:, None].astype(jnp.int32), t, axis=1)
            logits, _ = self.decode_teacher(memory, buf, train=train)
            return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), {"buffer": buf}
        y = self.embed(tokens)[:, None]
        y = y + jax.lax.dynamic_slice_in_dim(self.token_pos, t, 1, axis=1).astype(y.dtype)
        y = self.drop(y, deterministic=not train)
        y, cache = self.decoder(y, memory["memory"], cache=state["cache"], cache_index=t,
                                cross=memory.get("cross"), deterministic=not train)
        return self.out(y[:, 0]).astype(jnp.float32), {"cache": cache}

    @nn.nowrap
    def step_attention(self, intermediates: dict, t: Array) -> Array:
        block = intermediates["intermediates"]["decoder"][f"decoderblock_{self.num_layers - 1}"]
        (w,) = block["CrossAttention"]["attention_weights"]  # [B, heads, T, L]; T = 1 with the cache
        w = w.mean(axis=1)
        w = w[:, 0] if self.kv_cache else jax.lax.dynamic_index_in_dim(w, t, axis=1, keepdims=False)
        return w.astype(jnp.float32)

    def __call__(self, images: Array, inputs: Array, train: bool = False):
        return self.decode_teacher(self.encode(images, train=train), inputs, train=train)


MODELS = {"show_and_tell": ShowAndTell, "show_attend_tell": ShowAttendTell, "transformer": TransformerCaptioner}
