"""Captioning: tokenizer, scene grammar, models (teacher forcing == step-by-step, attention),
decoding against a numpy reference and a hand-worked example, grounding, the loss."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.analysis import attention_maps as am
from seqvis.evaluation import grounding
from seqvis.data.builders import fashion_scenes as fs
from seqvis.data.tokenizer import Tokenizer
from seqvis.errors import VocabularyError
from seqvis.models import captioning as cap
from seqvis.models import decoding

PAD, BOS, EOS = 0, 1, 2


# ============================================================================ tokenizer


def test_tokenizer_build_order_min_count_and_round_trip(tmp_path):
    tok = Tokenizer.build(["A red bag.", "a blue bag", "a RED shoe!", "zebra"], min_count=2)
    # Specials first, then by count (a:3, bag:2, red:2 -> ties alphabetical); shoe/blue/zebra dropped.
    assert tok.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "bag", "red"]
    ids = tok.encode("A red, blue bag")
    assert ids == [BOS, 4, 6, 3, 5, EOS]
    assert tok.decode(ids) == "a red <unk> bag"
    assert tok.decode(ids + [PAD, 5]) == "a red <unk> bag"  # stops at <eos>
    assert tok.encode("a bag a bag a", max_len=5) == [BOS, 4, 5, 4, EOS]  # truncated, still ends with <eos>
    assert tok.encode("a", max_len=6) == [BOS, 4, EOS, PAD, PAD, PAD]
    tok.save(str(tmp_path / "v.json"))
    assert Tokenizer.load(str(tmp_path / "v.json")) == tok
    with pytest.raises(VocabularyError, match="min_count"):
        Tokenizer.build(["a"], min_count=5)


def test_tokenizer_tf_encode_equals_python_encode():
    import tensorflow as tf

    tok = Tokenizer.build(["a red bag to the left of a blue t-shirt", "there is an orange boot"])
    texts = ["A red bag, to the LEFT of a blue t-shirt.", "", "there is  an\torange boot!",
             "an unknown word here", "a " * 40]
    got = tok.tf_encode(tf.constant(texts), 9).numpy()
    want = np.asarray([tok.encode(t, max_len=9) for t in texts])
    np.testing.assert_array_equal(got, want)
    grid = tok.tf_encode(tf.constant([texts[:2], texts[2:4]]), 7).numpy()  # any leading shape
    assert grid.shape == (2, 2, 7)
    np.testing.assert_array_equal(grid[1, 0], tok.encode(texts[2], max_len=7))


# ============================================================================ scene grammar and builder


def _parse(caption):
    """Independent reader of the grammar: [(colour, noun)] mentions and the relation words between them."""
    words = caption.split()
    colours = set(fs.colour_ids())
    mentions, relations, cur = [], [], []
    i = 2 if words[:2] == ["there", "is"] else 0
    while i < len(words):
        w = words[i]
        if w in colours:
            j = i + 1
            while words[j] not in fs.noun_classes():
                j += 1  # "ankle"
            mentions.append((w, words[j]))
            if cur:
                relations.append(" ".join(cur))
            cur, i = [], j + 1
            continue
        if words[i:i + 3] == ["a", "pair", "of"]:
            i += 3
        elif w in ("a", "an") or (w in ("which", "that") and words[i + 1] == "is"):
            i += 1 if w in ("a", "an") else 2
        else:
            cur.append(w)
            i += 1
    return mentions, relations


REL_WORDS = {r: k for k, rs in fs.RELATIONS.items() for r in rs}


def test_caption_grammar_matches_the_layout():
    rng = np.random.default_rng(0)
    images, labels = np.zeros((50, 28, 28), np.uint8), np.arange(50) % 10
    images[:, 6:22, 10:18] = 200
    cfg = fs.make_config(num_train=1, num_test=1)
    for _, ex in fs.generate(images, labels, 60, cfg, 0):
        n = int(ex["num_items"])
        assert len(set(ex["captions"])) == 5  # five distinct references
        centres = {}
        for k in range(n):
            y0, x0, y1, x1 = ex["boxes"][k]
            assert 0 <= y0 < y1 <= 84 and 0 <= x0 < x1 <= 84
            centres[fs.COLOURS[ex["colours"][k]][0]] = ((y0 + y1) / 2, (x0 + x1) / 2)
        assert len(centres) == n  # distinct colours
        for a, b in itertools.combinations(range(n), 2):  # no overlap
            ba, bb = ex["boxes"][a], ex["boxes"][b]
            assert ba[2] <= bb[0] or bb[2] <= ba[0] or ba[3] <= bb[1] or bb[3] <= ba[1]
        for c in ex["captions"]:
            mentions, rels = _parse(c)
            assert len(mentions) == n and len(rels) == n - 1, c
            for (colour, noun) in mentions:
                k = [fs.COLOURS[ex["colours"][j]][0] for j in range(n)].index(colour)
                assert fs.noun_classes()[noun] == ex["labels"][k], c
            for (ca, _), (cb, _), rel in zip(mentions, mentions[1:], rels):
                (ya, xa), (yb, xb) = centres[ca], centres[cb]
                dy, dx = yb - ya, xb - xa
                if abs(dx) > abs(dy):
                    want = "left" if dx > 0 else "right"
                else:
                    want = "above" if dy > 0 else "below"
                assert REL_WORDS[rel] == want, (c, rel, want)
    del rng


def test_generation_is_deterministic_and_seeded():
    images = np.random.default_rng(1).integers(0, 255, (30, 28, 28)).astype(np.uint8)
    labels = np.arange(30) % 10
    run = lambda seed: [ex for _, ex in fs.generate(images, labels, 5, fs.make_config(seed=seed), 0)]  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert all(np.array_equal(x["image"], y["image"]) and x["captions"] == y["captions"] for x, y in zip(a, b))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    assert fs.make_config(num_train=10).name != fs.make_config(num_train=11).name  # no stale prepared data


def test_builder_uses_train_items_for_train_and_test_items_for_test(tmp_path, monkeypatch):
    # Train items are all 100, test items all 250 (in gray); tinted pixels keep the ratio per item.
    def fake_split(dataset, split, idx_dir=None):
        value = 100 if split == "train" else 250
        imgs = np.zeros((40, 28, 28), np.uint8)
        imgs[:, 4:24, 4:24] = value
        return imgs, np.arange(40) % 10

    monkeypatch.setattr(fs, "load_split", fake_split)
    b = fs.FashionScenes(data_dir=str(tmp_path), num_train=6, num_test=4, seed=3)
    b.download_and_prepare()
    assert b.info.splits["train"].num_examples == 6 and b.info.splits["test"].num_examples == 4
    for split in ("train", "test"):
        for ex in b.as_dataset(split=split).as_numpy_iterator():
            for k in range(int(ex["num_items"])):
                y0, x0, y1, x1 = ex["boxes"][k]
                # gray/255 x colour (brightest channel >= 205 after jitter) x brightness in [0.75, 1]
                peak = int(ex["image"][y0:y1, x0:x1].max())
                assert peak <= 101 if split == "train" else peak >= 150, (split, peak)


def test_builder_rejects_bad_kwargs():
    with pytest.raises(ValueError, match="unknown field"):
        fs.FashionScenes(data_dir="/tmp/unused_fs", num_trian=5)
    with pytest.raises(ValueError, match="max_items"):
        fs.make_config(max_items=4)


# ============================================================================ models


class TinyEncoder(nn.Module):
    """A one-conv image encoder: [B, 24, 24, 3] -> [B, 3, 3, 8] (the models take any encoder)."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.relu(nn.Conv(8, (8, 8), strides=(8, 8))(x))


V, T = 11, 6


def make(name, **kw):
    enc = TinyEncoder()
    if name == "transformer":
        return cap.TransformerCaptioner(encoder=enc, vocab_size=V, max_positions=T, width=16, num_layers=2,
                                        num_heads=2, mlp_dim=32, **kw)
    if name == "show_attend_tell":
        return cap.ShowAttendTell(encoder=enc, vocab_size=V, embed_dim=12, hidden_dim=16, attention_dim=8, **kw)
    return cap.ShowAndTell(encoder=enc, vocab_size=V, embed_dim=12, hidden_dim=16, **kw)


def _data(b=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (b, 24, 24, 3)), jax.random.randint(k2, (b, T), 0, V)


@pytest.mark.parametrize("name", list(cap.MODELS))
def test_teacher_forced_logits_equal_step_by_step(name):
    model = make(name)
    images, tokens = _data()
    v = model.init(jax.random.key(1), images, tokens)
    logits, _ = model.apply(v, images, tokens)
    assert logits.shape == (3, T, V)
    memory = model.apply(v, images, method=model.encode)
    state = model.apply(v, memory, method=model.init_state)
    step = jax.jit(lambda s, y, t: model.apply(v, memory, s, y, t, method=model.step))
    steps = []
    for t in range(T):
        lg, state = step(state, tokens[:, t], t)
        steps.append(lg)
    np.testing.assert_allclose(np.stack(steps, 1), logits, rtol=1e-5, atol=1e-5)


def test_show_attend_tell_attention_is_a_distribution_and_sown_every_step():
    model = make("show_attend_tell")
    images, tokens = _data()
    v = model.init(jax.random.key(1), images, tokens)
    (logits, aux), inter = model.apply(v, images, tokens, mutable=["intermediates"])
    alpha = np.asarray(aux["attention"])
    assert alpha.shape == (3, T, 9)  # 3x3 regions, every word
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-5)
    assert (alpha >= 0).all()
    (sown,) = inter["intermediates"]["core"]["attention"]
    np.testing.assert_allclose(sown, alpha, atol=1e-7)
    gate = np.asarray(aux["gate"])
    assert gate.shape == (3, T) and ((gate > 0) & (gate < 1)).all()
    # The gate really scales the context: without it the logits change.
    v2 = make("show_attend_tell", gate=False).init(jax.random.key(1), images, tokens)
    assert "gate" not in v2["params"]["core"]


def test_transformer_cross_attention_sums_to_one_over_regions():
    model = make("transformer")
    images, tokens = _data()
    v = model.init(jax.random.key(1), images, tokens)
    _, inter = model.apply(v, images, tokens, mutable=["intermediates"])
    for i in range(2):
        (w,) = inter["intermediates"]["decoder"][f"decoderblock_{i}"]["CrossAttention"]["attention_weights"]
        assert w.shape == (3, 2, T, 9)
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)


def test_show_and_tell_pooling_choices():
    images, tokens = _data()
    flat = make("show_and_tell", pooling="flatten").init(jax.random.key(0), images, tokens)
    mean = make("show_and_tell", pooling="mean").init(jax.random.key(0), images, tokens)
    assert flat["params"]["image_proj"]["kernel"].shape == (9 * 8, 12)
    assert mean["params"]["image_proj"]["kernel"].shape == (8, 12)
    with pytest.raises(ValueError, match="pooling"):
        make("show_and_tell", pooling="max").init(jax.random.key(0), images, tokens)


# ============================================================================ decoding


class Markov(nn.Module):
    """A captioner whose next-word distribution depends on the previous word and one image scalar:
    ``logits = table[y_prev] + x · bias[y_prev]`` (x = the image's first pixel)."""

    table: tuple
    bias: tuple = ()

    def encode(self, images, train=False):
        return {"x": images.reshape(images.shape[0], -1)[:, :1]}

    def init_state(self, memory):
        return {"n": jnp.zeros(memory["x"].shape[:1], jnp.int32)}

    def step(self, memory, state, tokens, t, train=False):
        table = jnp.asarray(self.table, jnp.float32)
        logits = table[tokens]
        if self.bias:
            logits = logits + memory["x"] * jnp.asarray(self.bias, jnp.float32)[tokens]
        return logits, {"n": state["n"] + 1}

    @nn.nowrap
    def step_attention(self, intermediates, t):
        return None

    def __call__(self, images):
        return self.encode(images)


def _log_softmax_np(x, banned=(PAD, BOS)):
    x = np.asarray(x, np.float64).copy()
    x[list(banned)] = -np.inf
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def reference_beam(logp_fn, k, steps, alpha=0.0):
    """Plain-python beam search with the documented rules (one image)."""
    alive, finished, count = [((), 0.0)], [], 0
    for t in range(steps):
        cands = []
        for seq, lp in alive:
            row = logp_fn(seq[-1] if seq else BOS)
            cands += [(lp + row[w], seq + (w,)) for w in range(len(row)) if np.isfinite(row[w])]
        cands.sort(key=lambda c: -c[0])
        top = cands[: 2 * k]
        if count < k:
            for r, (lp, seq) in enumerate(top[:k]):
                if seq[-1] == EOS or t == steps - 1:
                    finished.append((lp / ((5 + len(seq)) / 6) ** alpha, lp, seq))
                    count += 1
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        alive = [(lp, seq) for lp, seq in top if seq[-1] != EOS and t < steps - 1][:k]
        alive = [(seq, lp) for lp, seq in alive]
        if count >= k:
            break
    return finished[0]


def _pad(seq, steps):
    return list(seq) + [PAD] * (steps - len(seq))


def test_beam_search_hand_worked_example_beats_greedy():
    # After <bos>: a .5, b .4, c .1.  After a: <eos> .3, a .25, b .25, c .2.  After b: <eos> .9, rest .1/3.
    p = np.full((6, 6), 1e-9)
    p[BOS, 3:6] = [.5, .4, .1]
    p[3, [EOS, 3, 4, 5]] = [.3, .25, .25, .2]
    p[4, [EOS, 3, 4, 5]] = [.9, .1 / 3, .1 / 3, .1 / 3]
    p[5, EOS] = p[EOS, EOS] = 1.0
    model = Markov(table=tuple(map(tuple, np.log(p).tolist())))
    images = jnp.zeros((1, 2, 2, 1))
    g = decoding.greedy_decode(model, {}, images, max_steps=4, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert g["tokens"][0].tolist() == [3, EOS, PAD, PAD]  # greedy: "a" then <eos>: p = .15
    np.testing.assert_allclose(g["logprob"][0], math.log(.5 * .3), rtol=1e-4)
    b = decoding.beam_search(model, {}, images, beam_size=2, max_steps=4, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert b["tokens"][0].tolist() == [4, EOS, PAD, PAD]  # beam 2: "b" then <eos>: p = .36
    np.testing.assert_allclose(b["logprob"][0], math.log(.4 * .9), rtol=1e-4)
    b1 = decoding.beam_search(model, {}, images, beam_size=1, max_steps=4, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert b1["tokens"][0].tolist() == g["tokens"][0].tolist()


@pytest.mark.parametrize("alpha", [0.0, 1.5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_beam_search_matches_reference_implementation(k, alpha):
    vocab, steps = 7, 5
    rng = np.random.default_rng(10 * k + int(alpha))
    for trial in range(4):
        table = rng.normal(0, 1.5, (vocab, vocab))
        table[:, EOS] += rng.normal(0, 1.0)
        model = Markov(table=tuple(map(tuple, table.tolist())))
        out = decoding.beam_search(model, {}, jnp.zeros((1, 1, 1, 1)), beam_size=k, max_steps=steps, bos_id=BOS,
                              eos_id=EOS, pad_id=PAD, alpha=alpha)
        score, lp, seq = reference_beam(lambda prev: _log_softmax_np(table[prev]), k, steps, alpha)
        assert out["tokens"][0].tolist() == _pad(seq, steps), trial
        np.testing.assert_allclose(out["logprob"][0], lp, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["score"][0], score, rtol=1e-4, atol=1e-4)


def test_eos_handling_and_max_steps():
    vocab = 6
    table = np.full((vocab, vocab), -5.0)
    table[BOS, 3] = table[3, 4] = table[4, EOS] = 5.0  # bos -> 3 -> 4 -> eos
    table[5, 5] = 5.0                                   # a word that never ends
    model = Markov(table=tuple(map(tuple, table.tolist())))
    g = decoding.greedy_decode(model, {}, jnp.zeros((1, 1, 1, 1)), max_steps=6, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert g["tokens"][0].tolist() == [3, 4, EOS, PAD, PAD, PAD]
    want = sum(_log_softmax_np(table[a])[b] for a, b in ((BOS, 3), (3, 4), (4, EOS)))
    np.testing.assert_allclose(g["logprob"][0], want, rtol=1e-4, atol=1e-6)  # nothing added after <eos>
    table = np.full((vocab, vocab), -5.0)  # words 3 and 5 only lead to words 3 and 5: <eos> is never in the top 2
    table[[BOS, 3, 5], 5] = 5.0
    table[[BOS, 3, 5], 3] = 4.0
    model = Markov(table=tuple(map(tuple, table.tolist())))
    for out in (decoding.greedy_decode(model, {}, jnp.zeros((1, 1, 1, 1)), max_steps=4, bos_id=BOS, eos_id=EOS,
                                  pad_id=PAD),
                decoding.beam_search(model, {}, jnp.zeros((1, 1, 1, 1)), beam_size=2, max_steps=4, bos_id=BOS,
                                eos_id=EOS, pad_id=PAD)):
        assert out["tokens"][0].tolist() == [5, 5, 5, 5]  # no <eos> within max_steps: cut at max_steps


def test_batched_decoding_equals_one_at_a_time_markov():
    vocab, steps = 8, 6
    rng = np.random.default_rng(3)
    model = Markov(table=tuple(map(tuple, rng.normal(0, 1, (vocab, vocab)).tolist())),
                   bias=tuple(map(tuple, rng.normal(0, 2, (vocab, vocab)).tolist())))
    images = jnp.asarray(rng.normal(0, 1, (5, 1, 1, 1)), jnp.float32)
    for fn in (functools_partial(decoding.greedy_decode), functools_partial(decoding.beam_search, beam_size=3)):
        batch = fn(model, {}, images, max_steps=steps, bos_id=BOS, eos_id=EOS, pad_id=PAD)
        assert len({tuple(r) for r in np.asarray(batch["tokens"]).tolist()}) > 1  # images really differ
        for i in range(5):
            one = fn(model, {}, images[i:i + 1], max_steps=steps, bos_id=BOS, eos_id=EOS, pad_id=PAD)
            assert one["tokens"][0].tolist() == batch["tokens"][i].tolist()


def functools_partial(fn, *args, **kw):
    import functools

    return functools.partial(fn, *args, **kw)


@pytest.mark.parametrize("name", list(cap.MODELS))
def test_real_models_beam1_equals_greedy_and_batched_equals_single(name):
    model = make(name)
    images, tokens = _data(b=4, seed=5)
    v = model.init(jax.random.key(2), images, tokens)
    common = dict(max_steps=T, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    greedy = jax.jit(functools_partial(decoding.greedy_decode, model, **common))
    beam1 = jax.jit(functools_partial(decoding.beam_search, model, beam_size=1, **common))
    beam3 = jax.jit(functools_partial(decoding.beam_search, model, beam_size=3, **common))
    g, b1, b3 = greedy(v, images), beam1(v, images), beam3(v, images)
    np.testing.assert_array_equal(g["tokens"], b1["tokens"])
    np.testing.assert_allclose(g["logprob"], b1["logprob"], rtol=1e-5, atol=1e-5)
    assert not np.isin(np.asarray(g["tokens"]), [BOS]).any()  # <bos> is never generated
    if name != "show_and_tell":
        att = np.asarray(g["attention"])
        real = np.asarray(g["tokens"]) != PAD
        np.testing.assert_allclose(att.sum(-1)[real], 1.0, atol=1e-5)  # a distribution for every generated word
    one = greedy(v, images[2:3])
    np.testing.assert_array_equal(one["tokens"][0], g["tokens"][2])
    one = beam3(v, images[1:2])
    np.testing.assert_array_equal(one["tokens"][0], b3["tokens"][1])


# ============================================================================ grounding


def test_grounding_counts_hand_worked():
    # 2x2 regions over a 40x40 image: region centres (10,10) (10,30) (30,10) (30,30).
    nouns, colours = fs.noun_classes(), fs.colour_ids()
    labels = np.array([[8, 7, -1], [8, 8, -1]])           # image 0: bag, sneaker; image 1: two bags
    cols = np.array([[0, 2, -1], [0, 2, -1]])             # red, blue
    boxes = np.array([[[0, 0, 20, 20], [20, 20, 40, 40], [-1] * 4],
                      [[0, 20, 20, 40], [20, 0, 40, 20], [-1] * 4]])
    words = [["a", "red", "bag", "left", "of", "a", "blue", "sneaker", "and", "a", "dress"],
             ["a", "blue", "bag", "below", "a", "red", "bag"]]
    att = np.zeros((2, 11, 4))
    att[0, 2, 0] = 1  # "bag" -> region (10, 10): inside the bag box       grounded
    att[0, 7, 0] = 1  # "sneaker" -> (10, 10): not in the sneaker box       not grounded
    att[0, 10, 3] = 1  # "dress": no dress in the scene                      no referent
    att[1, 2, 2] = 1  # "blue bag" -> (30, 10): inside the blue bag's box   grounded
    att[1, 6, 3] = 1  # "red bag" -> (30, 30): red bag is at the top right  not grounded
    att[0, 1, 0] = 1  # colour "red" -> (10, 10): the red item (bag)          grounded
    att[0, 6, 3] = 1  # colour "blue" -> (30, 30): the blue item (sneaker)    grounded
    att[1, 1, 1] = 1  # colour "blue" -> (10, 30): the blue bag is lower left not grounded
    # image 1, "red" at t=5: argmax of an all-zero row is region 0 = (10, 10): not in the red bag's box
    c = grounding.grounding_counts(words, att, labels, cols, boxes, grid=(2, 2), image_hw=(40, 40),
                            noun_classes=nouns, colour_ids=colours)
    assert c == {"item_words": 5, "with_referent": 4, "grounded": 2,
                 "colour_words": 4, "colour_with_referent": 4, "colour_grounded": 2}
    s = grounding.grounding_scores(c)
    assert s["grounding"] == pytest.approx(0.5) and s["item_word_precision"] == pytest.approx(0.8)
    assert s["grounding_colour"] == pytest.approx(0.5)
    np.testing.assert_allclose(grounding.region_centres((2, 2), (40, 40)), [[10, 10], [10, 30], [30, 10], [30, 30]])


def test_region_geometry_matches_the_receptive_field_centres():
    """The pixel a region is mapped back to is the centre of its receptive field (gradient support)."""
    from seqvis.models.resnet import ResNetEncoder

    enc = ResNetEncoder(depth=18, stage_sizes=(1, 1, 1), width=4, zero_init_residual=False)
    x = jax.random.normal(jax.random.key(0), (6, 160, 160, 3))
    v = enc.init(jax.random.key(1), x)
    grid = enc.apply(v, x).shape[1:3]
    assert grid == (10, 10)
    centres = grounding.region_centres(grid, (160, 160), cap.region_geometry(enc, (160, 160), grid))
    for r, c in ((4, 5), (5, 4), (6, 6)):  # receptive fields (99 px) inside the image
        # union over 6 images: max-pooling routes each image's gradient to a data-dependent subset
        g = np.abs(np.asarray(jax.grad(lambda im: enc.apply(v, im)[:, r, c].sum())(x))).sum((0, -1))
        ys, xs = np.nonzero(g)
        # the receptive field [min, max + 1) in continuous coordinates is centred on the region centre
        assert ((ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2) == tuple(centres[r * 10 + c])
    vit_enc = cap.ViTGridEncoder(vit=__import__("seqvis.models.vit", fromlist=["build"]).build(
        "mu/12", num_classes=None, pool="gap"))
    assert cap.region_geometry(vit_enc, (84, 84), (7, 7)) == (6.0, 6.0, 12.0, 12.0)
    assert cap.region_geometry(TinyEncoder(), (24, 24), (3, 3)) == (4.0, 4.0, 8.0, 8.0)  # stretched grid


def test_upsampled_attention_peaks_at_the_region():
    m = am.upsample(np.eye(1, 9, 4).reshape(9), (3, 3), (30, 30))
    assert m.shape == (30, 30)
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 10 <= y < 20 and 10 <= x < 20


# ============================================================================ the loss


def test_loss_is_masked_ce_plus_doubly_stochastic_regulariser():
    import importlib.util
    import os

    from seqvis.tasks import captioning as task_lib

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "captioning.py")
    spec = importlib.util.spec_from_file_location("captioning_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("show_attend_tell")
    config.data.image_shape = (24, 24, 3)
    config.captions.max_len = 6
    config.model.encoder.update(stage_sizes=(1,), width=4)
    config.model.update(embed_dim=8, hidden_dim=8, attention_dim=8)
    config.doubly_stochastic = 0.7
    task = task_lib.CaptioningTask(config)
    tok = Tokenizer([f"w{i}" for i in range(6)])
    task.set_tokenizer(tok)
    rng = np.random.default_rng(0)
    tokens = np.array([[BOS, 4, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD, PAD]], np.int32)
    batch = {"image": jnp.asarray(rng.normal(0, 1, (2, 24, 24, 3)), jnp.float32), "tokens": jnp.asarray(tokens)}
    v = task.init(jax.random.key(0), batch)
    loss, metrics, _ = task.losses(v, batch, train=False, rng=None)
    (logits, aux) = task.model.apply(v, batch["image"], batch["tokens"][:, :-1])
    logits, alpha = np.asarray(logits, np.float64), np.asarray(aux["attention"], np.float64)
    for i in range(2):
        n = int((tokens[i, 1:] != PAD).sum())
        lsm = logits[i] - np.log(np.exp(logits[i]).sum(-1, keepdims=True))
        ce = -sum(lsm[t, tokens[i, t + 1]] for t in range(n))
        reg = np.sum((1 - alpha[i, :n].sum(0)) ** 2)
        assert float(metrics["nll"][i]) == pytest.approx(ce / n, rel=1e-4)
        assert float(metrics["attention_reg"][i]) == pytest.approx(reg, rel=1e-4)
        assert float(loss[i]) == pytest.approx((ce + 0.7 * reg) / n, rel=1e-4)
    # Several references: the mean over the real ones (an all-<pad> row does not count).
    multi = {"image": batch["image"][:1],
             "tokens": jnp.asarray(np.stack([tokens[0], tokens[1], np.zeros(6, np.int32)])[None])}
    loss_m, metrics_m, _ = task.losses(v, multi, train=False, rng=None)
    both = {"image": jnp.repeat(batch["image"][:1], 2, 0), "tokens": batch["tokens"]}
    loss_b, metrics_b, _ = task.losses(v, both, train=False, rng=None)
    assert float(loss_m[0]) == pytest.approx(float(loss_b.mean()), rel=1e-5)
    assert float(metrics_m["nll"][0]) == pytest.approx(float(metrics_b["nll"].mean()), rel=1e-5)
