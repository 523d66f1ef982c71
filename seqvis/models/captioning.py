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

**Decoding** (:func:`greedy_decode`, :func:`beam_search`, jit-compiled, batched). Each model
has ``encode(images) -> memory``, ``init_state(memory) -> state`` and
``step(memory, state, y_{t-1}, t) -> (logits [B, V], state)``: a caption is generated one
token at a time from ``<bos>`` until ``<eos>`` or ``max_steps`` tokens. The step logits equal
the teacher-forced logits for the same prefix (the LSTMs run the same cell; the transformer
re-reads its causal prefix buffer — no key/value cache, O(T²) per caption, fine at T ≈ 30).
Beam search keeps K hypotheses, finalises a hypothesis when ``<eos>`` is among the K best
candidates (so width 1 is exactly greedy), ranks finished ones by
``log p / ((5 + |y|) / 6)^α`` (GNMT length penalty; α = 0: plain log-probability) and stops
when K hypotheses have finished or after ``max_steps``. ``<pad>`` and ``<bos>`` are never generated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqvis.models.recurrent import LSTMCell, Recurrent
from seqvis.models.transformer import Decoder, LearnedPositionEmbedding

Array = jax.Array
NEG = -1e9  # "minus infinity" that stays finite under addition


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
    from seqvis.models.resnet import ResNetEncoder

    hh, ww = image_hw
    h, w = grid
    if isinstance(encoder, ResNetEncoder) and encoder.padding == "symmetric":
        s = float(encoder.output_stride())
        return 0.5, 0.5, s, s
    if isinstance(encoder, ViTGridEncoder) and not getattr(encoder.vit, "hybrid_stages", None):
        sh, sw = (float(v) for v in encoder.vit.stride())
        return sh / 2, sw / 2, sh, sw
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
    """

    encoder: nn.Module
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 512
    pooling: str = "mean"
    dropout_rate: float = 0.0

    def setup(self):
        if self.pooling not in ("mean", "flatten"):
            raise ValueError(f"ShowAndTell.pooling={self.pooling!r}: use 'mean' or 'flatten'.")
        self.image_proj = nn.Dense(self.embed_dim)
        self.embed = nn.Embed(self.vocab_size, self.embed_dim)
        self.lstm = Recurrent(LSTMCell(self.hidden_dim))
        self.out = nn.Dense(self.vocab_size)
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

    @nn.compact
    def __call__(self, carry, emb: Array, memory: dict, train: bool = False):
        c, h = carry
        query = nn.Dense(self.attention_dim, use_bias=False, name="query")(h)          # U_a h
        scores = nn.Dense(1, name="score")(jnp.tanh(memory["keys"] + query[:, None]))  # w_a·tanh(.)
        alpha = jax.nn.softmax(scores[..., 0].astype(jnp.float32), axis=-1)          # [B, L]
        self.sow("intermediates", "attention", alpha)
        z = jnp.einsum("bl,bld->bd", alpha.astype(memory["regions"].dtype), memory["regions"])
        if self.gate:
            beta = jax.nn.sigmoid(nn.Dense(1, name="gate")(h))                        # [B, 1]
            z = beta * z
        else:
            beta = jnp.ones((h.shape[0], 1), h.dtype)
        (c, h), _ = LSTMCell(self.hidden_dim, name="lstm")((c, h), jnp.concatenate([emb, z], axis=-1))
        hd = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        deep = emb + nn.Dense(self.embed_dim, name="out_h")(hd) + nn.Dense(self.embed_dim, name="out_z")(z)
        logits = nn.Dense(self.vocab_size, name="logits")(deep)
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
    """

    encoder: nn.Module
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    gate: bool = True
    dropout_rate: float = 0.0

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim)
        self.keys = nn.Dense(self.attention_dim)
        self.init_h = nn.Dense(self.hidden_dim)
        self.init_c = nn.Dense(self.hidden_dim)
        self.core = AttendStep(self.vocab_size, self.embed_dim, self.hidden_dim, self.attention_dim,
                               self.gate, self.dropout_rate)
        self.drop = nn.Dropout(self.dropout_rate)

    def encode(self, images: Array, train: bool = False) -> dict:
        regions = _regions(self.encoder(images, train=train))
        return {"regions": regions, "keys": self.keys(regions)}

    def init_state(self, memory: dict) -> dict:
        mean = memory["regions"].mean(axis=1)
        return {"carry": (jnp.tanh(self.init_c(mean)), jnp.tanh(self.init_h(mean)))}

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
      max_positions: number of word positions (learned position embeddings; also the decode
        buffer length).
      width, num_layers, num_heads, mlp_dim: decoder sizes.
      dropout_rate, attention_dropout_rate: regularisation.
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

    def setup(self):
        self.memory_proj = nn.Dense(self.width)
        self.memory_pos = LearnedPositionEmbedding()
        self.memory_norm = nn.LayerNorm()
        self.embed = nn.Embed(self.vocab_size, self.width)
        self.token_pos = self.param("token_pos", nn.initializers.normal(stddev=0.02),
                                    (1, self.max_positions, self.width))
        self.decoder = Decoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                               dropout_rate=self.dropout_rate,
                               attention_dropout_rate=self.attention_dropout_rate)
        self.out = nn.Dense(self.vocab_size)
        self.drop = nn.Dropout(self.dropout_rate)

    def encode(self, images: Array, train: bool = False) -> dict:
        regions = _regions(self.encoder(images, train=train))
        return {"memory": self.memory_norm(self.memory_pos(self.memory_proj(regions)))}

    def init_state(self, memory: dict) -> dict:
        b = memory["memory"].shape[0]
        return {"buffer": jnp.zeros((b, self.max_positions), jnp.int32)}

    def decode_teacher(self, memory: dict, inputs: Array, train: bool = False):
        t = inputs.shape[1]
        if t > self.max_positions:
            raise ValueError(f"TransformerCaptioner: {t} word positions but max_positions={self.max_positions}; "
                             "raise config.captions.max_len or shorten the inputs.")
        y = self.embed(inputs) + self.token_pos[:, :t]
        y = self.drop(y, deterministic=not train)
        y = self.decoder(y, memory["memory"], deterministic=not train)
        return self.out(y).astype(jnp.float32), {}

    def step(self, memory: dict, state: dict, tokens: Array, t: Array, train: bool = False):
        buf = jax.lax.dynamic_update_slice_in_dim(state["buffer"], tokens[:, None].astype(jnp.int32), t, axis=1)
        logits, _ = self.decode_teacher(memory, buf, train=train)  # causal: position t sees tokens <= t only
        return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), {"buffer": buf}

    @nn.nowrap
    def step_attention(self, intermediates: dict, t: Array) -> Array:
        block = intermediates["intermediates"]["decoder"][f"decoderblock_{self.num_layers - 1}"]
        (w,) = block["CrossAttention"]["attention_weights"]  # [B, heads, T, L]
        w = jax.lax.dynamic_index_in_dim(w.mean(axis=1), t, axis=1, keepdims=False)
        return w.astype(jnp.float32)

    def __call__(self, images: Array, inputs: Array, train: bool = False):
        return self.decode_teacher(self.encode(images, train=train), inputs, train=train)


MODELS = {"show_and_tell": ShowAndTell, "show_attend_tell": ShowAttendTell, "transformer": TransformerCaptioner}


# ============================================================================ decoding


def _apply_step(model, variables, memory, state, tokens, t, banned=()):
    """One decoding step; ``banned`` ids (``<pad>``, ``<bos>``) can never be generated."""
    (logits, state), inter = model.apply(variables, memory, state, tokens, t, method=model.step,
                                         mutable=["intermediates"])
    if banned:
        logits = logits.at[:, jnp.asarray(banned)].set(NEG)
    att = model.step_attention(inter, t)
    if att is None:
        att = jnp.zeros((tokens.shape[0], 0), jnp.float32)
    return logits, state, att


def _encode(model, variables, images):
    memory = model.apply(variables, images, method=model.encode)
    return memory, model.apply(variables, memory, method=model.init_state)


def greedy_decode(model: nn.Module, variables: Any, images: Array, *, max_steps: int, bos_id: int, eos_id: int,
                  pad_id: int) -> dict:
    """Argmax decoding, batched. Returns ``tokens [B, max_steps]`` (words, ``<eos>``, then ``<pad>``),
    ``logprob [B]`` (sum of the chosen tokens' log-probabilities) and ``attention [B, max_steps, L]``
    (the weights that produced each token; L = 0 without attention)."""
    memory, state = _encode(model, variables, images)
    b = images.shape[0]
    probe = jax.eval_shape(lambda s: _apply_step(model, variables, memory, s, jnp.zeros((b,), jnp.int32), 0)[2],
                           state)
    n_regions = probe.shape[-1]

    def cond(c):
        t, _, _, finished, *_ = c
        return (t < max_steps) & ~jnp.all(finished)

    def body(c):
        t, prev, state, finished, tokens, att, total = c
        logits, state, a = _apply_step(model, variables, memory, state, prev, t, (pad_id, bos_id))
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.where(finished, pad_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
        total = total + jnp.where(finished, 0.0, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0])
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
        a = jnp.where(finished[:, None], 0.0, a)
        att = jax.lax.dynamic_update_slice_in_dim(att, a[:, None], t, axis=1)
        return t + 1, tok, state, finished | (tok == eos_id), tokens, att, total

    init = (jnp.int32(0), jnp.full((b,), bos_id, jnp.int32), state, jnp.zeros((b,), bool),
            jnp.full((b, max_steps), pad_id, jnp.int32), jnp.zeros((b, max_steps, n_regions), jnp.float32),
            jnp.zeros((b,), jnp.float32))
    _, _, _, _, tokens, att, total = jax.lax.while_loop(cond, body, init)
    return {"tokens": tokens, "logprob": total, "attention": att}


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT length penalty ``((5 + length) / 6)^α``; 1 for α = 0."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(model: nn.Module, variables: Any, images: Array, *, beam_size: int, max_steps: int, bos_id: int,
                eos_id: int, pad_id: int, alpha: float = 0.0) -> dict:
    """Beam search, batched; see the module docstring for the rules. Returns the best finished
    hypothesis per image: ``tokens [B, max_steps]``, ``score [B]`` (length-normalised
    log-probability), ``logprob [B]`` and ``attention [B, max_steps, L]``."""
    k = int(beam_size)
    memory, state = _encode(model, variables, images)
    b = images.shape[0]
    tile = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  [B, ...] -> [B·K, ...], beams of an image adjacent
    memory, state = jax.tree.map(tile, memory), jax.tree.map(tile, state)
    probe = jax.eval_shape(
        lambda s: _apply_step(model, variables, memory, s, jnp.zeros((b * k,), jnp.int32), 0), state)
    vocab, n_regions = probe[0].shape[-1], probe[2].shape[-1]
    if 2 * k > vocab:
        raise ValueError(f"beam_size={k} needs a vocabulary of at least {2 * k} ids (have {vocab}); "
                         "lower config.decode.beam_size.")
    rank = jnp.arange(2 * k)

    def gather(x, idx):  # x [B, K', ...], idx [B, J] -> [B, J, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(c):
        return (c["t"] < max_steps) & ~jnp.all(c["fin_count"] >= k)

    def body(c):
        t = c["t"]
        logits, new_state, a = _apply_step(model, variables, memory, c["state"], c["prev"].reshape(b * k), t,
                                           (pad_id, bos_id))
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
        cand = (c["alive_logp"][:, :, None] + logp).reshape(b, k * vocab)
        top_s, top_i = jax.lax.top_k(cand, 2 * k)                                   # [B, 2K], best first
        src, tok = top_i // vocab, (top_i % vocab).astype(jnp.int32)
        seqs = gather(c["alive_tok"], src)                                            # [B, 2K, T]
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[:, :, None], t, axis=2)
        atts = gather(c["alive_att"], src)
        atts = jax.lax.dynamic_update_slice_in_dim(atts, gather(a.reshape(b, k, n_regions), src)[:, :, None], t,
                                                   axis=2)
        ends = (tok == eos_id) | (t == max_steps - 1)   # the last step ends every hypothesis
        valid = top_s > NEG / 2
        done = (c["fin_count"] >= k)[:, None]
        finalise = ends & (rank[None] < k) & valid & ~done
        # Finished: merge the old K with the new candidates, keep the K best normalised scores.
        new_scores = jnp.where(finalise, top_s / length_penalty(t + 1, alpha), NEG)
        all_s = jnp.concatenate([c["fin_score"], new_scores], axis=1)
        all_logp = jnp.concatenate([c["fin_logp"], top_s], axis=1)
        all_tok = jnp.concatenate([c["fin_tok"], seqs], axis=1)
        all_att = jnp.concatenate([c["fin_att"], atts], axis=1)
        fin_score, j = jax.lax.top_k(all_s, k)
        # Alive: the K best candidates that did not end.
        alive_s, i = jax.lax.top_k(jnp.where(ends, NEG, top_s), k)
        flat_src = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(src, i, axis=1)).reshape(-1)
        return {
            "t": t + 1,
            "prev": jnp.take_along_axis(tok, i, axis=1),
            "state": jax.tree.map(lambda x: x[flat_src], new_state),
            "alive_logp": alive_s, "alive_tok": gather(seqs, i), "alive_att": gather(atts, i),
            "fin_score": fin_score, "fin_logp": jnp.take_along_axis(all_logp, j, axis=1),
            "fin_tok": gather(all_tok, j), "fin_att": gather(all_att, j),
            "fin_count": c["fin_count"] + jnp.sum(finalise, axis=1),
        }

    init = {
        "t": jnp.int32(0),
        "prev": jnp.full((b, k), bos_id, jnp.int32),
        "state": state,
        "alive_logp": jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), NEG)])[None], (b, 1)),
        "alive_tok": jnp.full((b, k, max_steps), pad_id, jnp.int32),
        "alive_att": jnp.zeros((b, k, max_steps, n_regions), jnp.float32),
        "fin_score": jnp.full((b, k), NEG, jnp.float32),
        "fin_logp": jnp.full((b, k), NEG, jnp.float32),
        "fin_tok": jnp.full((b, k, max_steps), pad_id, jnp.int32),
        "fin_att": jnp.zeros((b, k, max_steps, n_regions), jnp.float32),
        "fin_count": jnp.zeros((b,), jnp.int32),
    }
    out = jax.lax.while_loop(cond, body, init)
    return {"tokens": out["fin_tok"][:, 0], "score": out["fin_score"][:, 0], "logprob": out["fin_logp"][:, 0],
            "attention": out["fin_att"][:, 0]}


def make_decoder(model: nn.Module, *, method: str, max_steps: int, bos_id: int, eos_id: int, pad_id: int,
                 beam_size: int = 1, alpha: float = 0.0) -> Callable[[Any, Array], dict]:
    """A jit-compiled ``fn(variables, images) -> dict`` for ``method`` 'greedy' or 'beam'."""
    common = dict(max_steps=int(max_steps), bos_id=int(bos_id), eos_id=int(eos_id), pad_id=int(pad_id))
    if method == "greedy":
        fn = functools.partial(greedy_decode, model, **common)
    elif method == "beam":
        if int(beam_size) < 1:
            raise ValueError(f"config.decode.beam_size={beam_size} must be >= 1.")
        fn = functools.partial(beam_search, model, beam_size=int(beam_size), alpha=float(alpha), **common)
    else:
        raise ValueError(f"decode method {method!r} is unknown; use 'greedy' or 'beam'.")
    return jax.jit(fn)
