"""Batched, jit-compiled caption decoding: greedy and beam search over any captioner.

A captioner offers ``encode(images) -> memory``, ``init_state(memory) -> state`` and
``step(memory, state, y_{t-1}, t) -> (logits [B, V], state)``, optionally
``prepare_decoding(memory) -> memory`` (per-image work every step reuses, done once before the
first step: the transformer's cross-attention keys/values) and ``max_positions`` (the longest
caption its step can produce; a longer ``max_steps`` is refused). A caption is generated one
token at a time from ``<bos>`` until ``<eos>`` or ``max_steps`` tokens; the step logits equal
the teacher-forced logits for the same prefix. ``state`` may be any pytree with the batch on
axis 0 (LSTM carries, a transformer's key/value cache): beam search reorders every leaf with
the surviving beams. ``memory`` is never reordered (all beams of an image share it).

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

Array = jax.Array
NEG = -1e9  # "minus infinity" that stays finite under addition


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


def _encode(model, variables, images, max_steps):
    """``(memory, state)`` for a batch of images; refuses ``max_steps`` beyond the model's ``max_positions``."""
    limit = getattr(model, "max_positions", None)
    if limit is not None and int(max_steps) > int(limit):
        raise ValueError(f"max_steps={max_steps} exceeds the model's max_positions={limit} (its position "
                         "table and key/value cache); decode at most max_positions tokens.")
    memory = model.apply(variables, images, method=model.encode)
    if hasattr(model, "prepare_decoding"):
        memory = model.apply(variables, memory, method=model.prepare_decoding)
    return memory, model.apply(variables, memory, method=model.init_state)


def greedy_decode(model: nn.Module, variables: Any, images: Array, *, max_steps: int, bos_id: int, eos_id: int,
                  pad_id: int) -> dict:
    """Argmax decoding, batched. Returns ``tokens [B, max_steps]`` (words, ``<eos>``, then ``<pad>``),
    ``logprob [B]`` (sum of the chosen tokens' log-probabilities) and ``attention [B, max_steps, L]``
    (the weights that produced each token; L = 0 without attention)."""
    memory, state = _encode(model, variables, images, max_steps)
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
    memory, state = _encode(model, variables, images, max_steps)
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
