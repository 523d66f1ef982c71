"""Key/value-cache decoding of the transformer captioner against the uncached reference.

The reference is the same model with ``kv_cache=False``: every step re-runs the whole causal
prefix through the decoder (and re-projects the image regions), which is what teacher forcing
computes. The cached model must produce the same tokens on trained weights, and its cache must
hold exactly the positions written so far, up to the last slot. ``config.decode.kv_cache``
reaches the model from the command line and is refused for the LSTM decoders.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from seqvis.data.tokenizer import Tokenizer
from seqvis.errors import ConfigError
from seqvis.models import captioning as cap
from seqvis.models import decoding
from seqvis.models.attention import MultiHeadAttention
from seqvis.tasks import captioning as task_lib
from seqvis.train.checkpoint import resume_problems

PAD, BOS, EOS = 0, 1, 2
GRID, CELL, COLOURS = 3, 8, 3
V = 3 + GRID * GRID + COLOURS   # specials, one word per cell, one per colour
T = 7                           # <bos> + up to 3 x (colour, cell); also max_positions and max_steps


class CellEncoder(nn.Module):
    """[B, 24, 24, 3] -> [B, 3, 3, 16]: one conv per 8x8 cell."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.relu(nn.Conv(16, (CELL, CELL), strides=(CELL, CELL))(x))


def make(kv_cache=True):
    return cap.TransformerCaptioner(encoder=CellEncoder(), vocab_size=V, max_positions=T, width=32, num_layers=2,
                                    num_heads=2, mlp_dim=64, kv_cache=kv_cache)


def scenes(n, seed):
    """1-3 coloured cells per image; caption: (colour word, cell word) per lit cell in row-major order, <eos>."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.1, (n, GRID * CELL, GRID * CELL, 3)).astype(np.float32)
    tokens = np.full((n, T + 1), PAD, np.int32)
    for i in range(n):
        cells = np.sort(rng.choice(GRID * GRID, rng.integers(1, 4), replace=False))
        words = [BOS]
        for c in cells:
            colour = rng.integers(COLOURS)
            r, q = divmod(int(c), GRID)
            images[i, r * CELL:(r + 1) * CELL, q * CELL:(q + 1) * CELL, colour] += 1.0
            words += [3 + GRID * GRID + colour, 3 + c]
        words.append(EOS)
        tokens[i, :len(words)] = words
    return jnp.asarray(images), jnp.asarray(tokens)


@pytest.fixture(scope="module")
def trained():
    """The tiny captioner trained by teacher forcing until it captions unseen scenes."""
    model = make(kv_cache=False)
    steps, batch = 250, 32
    images, tokens = scenes(steps * batch, seed=0)  # fresh scenes every step
    variables = model.init(jax.random.key(0), images[:2], tokens[:2, :-1])
    opt = optax.adam(3e-3)
    opt_state = opt.init(variables)

    @jax.jit
    def train_step(v, s, im, tok):
        def loss_fn(v):
            logits, _ = model.apply(v, im, tok[:, :-1])
            mask = (tok[:, 1:] != PAD).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:])
            return jnp.sum(ce * mask) / jnp.sum(mask)

        loss, g = jax.value_and_grad(loss_fn)(v)
        updates, s = opt.update(g, s, v)
        return optax.apply_updates(v, updates), s, loss

    for i in range(0, steps * batch, batch):
        variables, opt_state, loss = train_step(variables, opt_state, images[i:i + batch], tokens[i:i + batch])
    return variables, float(loss)


def decoders(model, max_steps=T, eos_id=EOS):
    common = dict(max_steps=max_steps, bos_id=BOS, eos_id=eos_id, pad_id=PAD)
    return (decoding.make_decoder(model, method="greedy", **common),
            decoding.make_decoder(model, method="beam", beam_size=3, **common))


def assert_same_decoding(a, b):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])  # token for token
    np.testing.assert_allclose(a["logprob"], b["logprob"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-5)
    if "score" in a:
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_uncached_on_a_trained_model(trained):
    variables, loss = trained
    images, tokens = scenes(32, seed=1)  # unseen scenes
    want = np.asarray(tokens[:, 1:])
    for fn_cached, fn_ref in zip(decoders(make(True)), decoders(make(False))):
        cached, ref = fn_cached(variables, images), fn_ref(variables, images)
        assert_same_decoding(cached, ref)
        got = np.asarray(cached["tokens"])
        # The weights are trained: most captions are exactly right, and they differ in length.
        assert np.mean(np.all(got == want, axis=1)) >= 0.75, (loss, got[:4], want[:4])
        assert len({int(np.sum(r != PAD)) for r in got}) >= 3


def test_cached_decoding_equals_uncached_to_the_last_cache_slot(trained):
    """With an end token that can never be produced (<pad> is banned) every caption runs all
    max_steps = max_positions steps, so the last step writes and reads the cache's last slot.
    Also on the trained weights at temperature 4 (output layer / 4), where beam search leaves the
    greedy path, so beams are reordered and a cache that was not reordered with them would show."""
    variables, _ = trained
    soft = jax.tree_util.tree_map_with_path(
        lambda path, x: x / 4 if "'out'" in jax.tree_util.keystr(path[:2]) else x, variables)
    assert not np.allclose(soft["params"]["out"]["kernel"], variables["params"]["out"]["kernel"])
    images, _ = scenes(16, seed=2)
    pairs = list(zip(decoders(make(True), eos_id=PAD), decoders(make(False), eos_id=PAD)))
    for v in (variables, soft):
        for fn_cached, fn_ref in pairs:
            cached, ref = fn_cached(v, images), fn_ref(v, images)
            assert_same_decoding(cached, ref)
            assert (np.asarray(cached["tokens"]) != PAD).all()  # every position generated
    greedy, beam = (fn(soft, images) for fn, _ in pairs)
    assert (np.asarray(greedy["tokens"]) != np.asarray(beam["tokens"])).any(axis=1).sum() >= 2
    assert (np.asarray(beam["logprob"]) >= np.asarray(greedy["logprob"]) - 1e-4).all()


def _step_through(model, variables, images, tokens, cache=None):
    """Feed ``tokens [B, T]`` one step at a time; returns the per-step logits and the states after each step."""
    memory = model.apply(variables, images, method=model.encode)
    memory = model.apply(variables, memory, method=model.prepare_decoding)
    state = model.apply(variables, memory, method=model.init_state) if cache is None else {"cache": cache}
    step = jax.jit(lambda s, y, t: model.apply(variables, memory, s, y, t, method=model.step))
    logits, states = [], []
    for t in range(tokens.shape[1]):
        lg, state = step(state, tokens[:, t], t)
        logits.append(lg)
        states.append(state)
    return np.stack(logits, 1), states


@pytest.mark.parametrize("kv_cache", [True, False])
def test_step_by_step_equals_teacher_forcing_up_to_max_positions(trained, kv_cache):
    variables, _ = trained
    images, _ = scenes(4, seed=3)
    tokens = jax.random.randint(jax.random.key(4), (4, T), 0, V)  # any T = max_positions tokens
    model = make(kv_cache)
    want, _ = model.apply(variables, images, tokens)
    got, _ = _step_through(model, variables, images, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # every position, the last one included


def test_cache_index_bookkeeping_at_max_length(trained):
    variables, _ = trained
    model = make(True)
    images, _ = scenes(3, seed=5)
    tokens = jax.random.randint(jax.random.key(6), (3, T), 3, V)
    want, _ = model.apply(variables, images, tokens)
    _, states = _step_through(model, variables, images, tokens)
    layers = [f"decoderblock_{i}" for i in range(2)]
    for t, state in enumerate(states):
        for name in layers:
            for kv in ("key", "value"):
                c = np.asarray(state["cache"][name][kv])
                assert c.shape == (3, T, 2, 16)
                assert (np.abs(c[:, :t + 1]).sum(axis=(2, 3)) > 0).all(), (t, name, kv)  # slots 0..t written
                assert (c[:, t + 1:] == 0).all(), (t, name, kv)  # nothing after t (no clamped write)
    # What the unwritten slots hold does not matter: they are masked, not just zero.
    garbage = jax.tree.map(lambda z: 100.0 * jax.random.normal(jax.random.key(7), z.shape),
                           model.apply(variables, {"memory": jnp.zeros((3, 9, 32))}, method=model.init_state))
    got, final = _step_through(model, variables, images, tokens, cache=garbage["cache"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in layers:  # after max_positions steps every slot has been overwritten with the real keys/values
        np.testing.assert_allclose(final[-1]["cache"][name]["key"], states[-1]["cache"][name]["key"], atol=1e-6)
    # More steps than the cache (and the position table) holds is refused, not silently clamped.
    for method in ("greedy", "beam"):
        fn = decoding.make_decoder(model, method=method, beam_size=2, max_steps=T + 1, bos_id=BOS, eos_id=EOS,
                                   pad_id=PAD)
        with pytest.raises(ValueError, match="max_positions"):
            fn(variables, images)
    mha = MultiHeadAttention(num_heads=2)
    x = jnp.ones((1, 2, 8))
    cache = {"key": jnp.zeros((1, 4, 2, 4)), "value": jnp.zeros((1, 4, 2, 4))}
    v = mha.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="does not fit"):
        mha.apply(v, x, cache=cache, cache_index=3)  # 2 tokens at slot 3 of 4


def test_cross_keys_values_come_from_the_per_image_memory(trained):
    """With the cross-attention keys/values prepared, a step never reads the region tokens again."""
    variables, _ = trained
    model = make(True)
    images, tokens = scenes(2, seed=8)
    memory = model.apply(variables, images, method=model.encode)
    prepared = model.apply(variables, memory, method=model.prepare_decoding)
    assert prepared["cross"]["decoderblock_1"]["key"].shape == (2, 9, 2, 16)  # [B, regions, heads, head_dim]
    state = model.apply(variables, prepared, method=model.init_state)
    step = jax.jit(functools.partial(model.apply, variables, method=model.step))
    want, _ = step(prepared, state, tokens[:, 0], 0)
    poisoned = {**prepared, "memory": jnp.full_like(memory["memory"], jnp.nan)}
    got, _ = step(poisoned, state, tokens[:, 0], 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.isfinite(np.asarray(step({"memory": poisoned["memory"]}, state, tokens[:, 0], 0)[0])).any()


def test_mha_cache_equals_full_causal_attention_in_chunks():
    """Multi-head attention with an updated cache, fed 1 or 2 tokens at a time, equals causal
    attention over the whole sequence; a static cache equals cross-attention."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    m = jax.random.normal(jax.random.key(1), (2, 5, 12))
    mha = MultiHeadAttention(num_heads=2)
    v = mha.init(jax.random.key(2), x)
    want = mha.apply(v, x, causal=True)
    update = jax.jit(lambda v, x, c, t: mha.apply(v, x, cache=c, cache_index=t))
    for chunk in (1, 2, 3):
        cache = {"key": jnp.zeros((2, 6, 2, 4)), "value": jnp.zeros((2, 6, 2, 4))}
        outs = []
        for t in range(0, 6, chunk):
            o, cache = update(v, x[:, t:t + chunk], cache, t)
            outs.append(o)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-6)
    cross = MultiHeadAttention(num_heads=2)
    vc = cross.init(jax.random.key(3), x, m)
    kv = cross.apply(vc, m, 8, method=cross.project_kv)
    assert kv["key"].shape == (2, 5, 2, 4)
    out, same = cross.apply(vc, x, cache=kv)
    np.testing.assert_allclose(out, cross.apply(vc, x, m), rtol=1e-5, atol=1e-6)
    assert same is kv or jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), same, kv))


def test_parameter_names_and_teacher_forcing_do_not_depend_on_the_cache(trained):
    variables, _ = trained
    block = variables["params"]["decoder"]["decoderblock_0"]
    assert set(block) == {"LayerNorm_0", "SelfAttention", "LayerNorm_1", "CrossAttention", "LayerNorm_2",
                          "MlpBlock"}  # the layout of existing checkpoints
    assert set(block["SelfAttention"]) == {"query", "key", "value", "out"}
    images, tokens = scenes(4, seed=9)
    a, _ = make(True).apply(variables, images, tokens[:, :-1])
    b, _ = make(False).apply(variables, images, tokens[:, :-1])
    np.testing.assert_array_equal(a, b)
    init_a = make(True).init(jax.random.key(0), images, tokens[:, :-1])
    init_b = make(False).init(jax.random.key(0), images, tokens[:, :-1])
    assert jax.tree.all(jax.tree.map(lambda p, q: bool((p == q).all()), init_a, init_b))


# ============================================================================ config.decode.kv_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command_line_config(arg, *overrides):
    """The config as ``python -m seqvis.cli.train --config=configs/captioning.py:ARG OVERRIDES`` parses it."""
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'captioning.py')}:{arg}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_config_decode_kv_cache_from_the_command_line():
    tok = Tokenizer([f"w{i}" for i in range(6)])
    built = {}
    for overrides, want in (((), True), (("--config.decode.kv_cache=False",), False),
                            (("--config.decode.kv_cache=True",), True)):
        config = _command_line_config("transformer", *overrides)
        task = task_lib.CaptioningTask(config)
        task.set_tokenizer(tok)
        assert isinstance(task.model, cap.TransformerCaptioner) and task.model.kv_cache is want
        built[want] = config.to_dict()
    # Decoding only: switching it is no change of the checkpoint's contents or of the data stream.
    assert resume_problems(built[True], built[False], None, 1) == ([], [])
    # The LSTM decoders have no cache: the field is unset, and setting it is refused by name.
    for name in ("show_and_tell", "show_attend_tell"):
        assert _command_line_config(name).decode.kv_cache is None
        task_lib.check_config(_command_line_config(name))
        config = _command_line_config(name, "--config.decode.kv_cache=False")
        with pytest.raises(ConfigError, match=rf"config.decode.kv_cache=False applies to the transformer .*{name}"):
            task_lib.CaptioningTask(config)
    # In config.model (where the module attribute lives) it is pointed to config.decode.
    config = _command_line_config("transformer")
    with config.unlocked():
        config.model.kv_cache = False
    with pytest.raises(ConfigError, match=r"config.model.kv_cache: .* config.decode.kv_cache"):
        task_lib.CaptioningTask(config)
