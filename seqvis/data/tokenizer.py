"""Word-level caption tokenizer: a vocabulary built from the training captions.

Text is split into words exactly as the caption metrics do (lower-case, every character
that is not a letter, digit, ``_`` or space becomes a space, split on whitespace;
:func:`split_words`, which :mod:`seqvis.evaluation.caption_metrics` uses), so a decoded caption scores the same
as the words the model produced. Ids::

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4.. words, most frequent first (ties alphabetical)

Words seen fewer than ``min_count`` times in the training captions map to ``<unk>``.
A caption becomes ``[<bos>, w_1 .. w_n, <eos>, <pad> ..]`` of a fixed length ``max_len``;
longer captions keep their first ``max_len - 2`` words (and still end with ``<eos>``).

The vocabulary is a JSON file (:meth:`Tokenizer.save` / :meth:`Tokenizer.load`); the
captioning task keeps it in the workdir next to the checkpoints. :meth:`Tokenizer.tf_encode`
is the same encoding as a TensorFlow op for tf.data pipelines.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from seqvis.errors import VocabularyError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_PUNCT = re.compile(r"[^\w\s]")
# The TensorFlow twin of `_PUNCT` (RE2 needs the Unicode classes spelled out).
_TF_PUNCT = r"[^\pL\pN_\s]"


def split_words(text: str) -> list[str]:
    """Lower-case, every character that is not a letter, digit, ``_`` or space -> space, split on whitespace."""
    return _PUNCT.sub(" ", text.lower()).split()


class Tokenizer:
    """Word <-> id mapping with the special tokens ``<pad> <bos> <eos> <unk>`` at ids 0..3."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], min_count: int = 1, counts: Sequence[int] | None = None):
        words = list(words)
        clash = set(words) & set(SPECIALS)
        if clash:
            raise VocabularyError(f"vocabulary words {sorted(clash)} collide with the special tokens.")
        if len(set(words)) != len(words):
            raise VocabularyError("vocabulary has duplicate words.")
        self.min_count = int(min_count)
        self.itos = list(SPECIALS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.counts = list(counts) if counts is not None else None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_words: int = 0) -> "Tokenizer":
        """Vocabulary of the words seen at least ``min_count`` times (at most ``max_words``; 0 = all)."""
        if min_count < 1:
            raise VocabularyError(f"config.captions.min_count={min_count} must be >= 1.")
        counter: Counter = Counter()
        n = 0
        for text in captions:
            counter.update(split_words(text))
            n += 1
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_count and w not in SPECIALS),
                      key=lambda wc: (-wc[1], wc[0]))
        if max_words:
            kept = kept[:max_words]
        if not kept:
            raise VocabularyError(
                f"no word occurs >= {min_count} times in the {n} training captions; lower "
                "config.captions.min_count or check that the dataset has captions.")
        return cls([w for w, _ in kept], min_count=min_count, counts=[c for _, c in kept])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    # ------------------------------------------------------------------ python side
    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``[bos, ids.., eos]``, truncated to ``max_len`` (keeping eos) and padded to it if given."""
        ids = [self.stoi.get(w, self.unk_id) for w in split_words(text)]
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len={max_len} leaves no room for <bos> and <eos>.")
            ids = ids[: max_len - 2]
        ids = [self.bos_id] + ids + [self.eos_id]
        if max_len is not None:
            ids = ids + [self.pad_id] * (max_len - len(ids))
        return ids

    def decode(self, ids: Iterable[int], keep_unk: bool = True) -> str:
        """Words up to the first ``<eos>``; ``<bos>`` and ``<pad>`` are dropped."""
        words = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if i == self.unk_id and not keep_unk:
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    # ------------------------------------------------------------------ tf.data side
    def tf_encode(self, texts, max_len: int):
        """TensorFlow op: string tensor ``[...]`` -> int32 ids ``[..., max_len]`` (same as :meth:`encode`).

        Build it once per pipeline (it creates a lookup table) and call it inside ``map``.
        """
        import tensorflow as tf  # deferred on purpose: only tf.data pipelines need it

        table = self._tf_table()
        texts = tf.convert_to_tensor(texts, tf.string)
        shape = tf.shape(texts)
        flat = tf.reshape(texts, [-1])
        clean = tf.strings.regex_replace(tf.strings.lower(flat, encoding="utf-8"), _TF_PUNCT, " ")
        words = tf.strings.split(clean)  # ragged [n, None]; splits on whitespace runs
        ids = tf.ragged.map_flat_values(table.lookup, words)[:, : max_len - 2]
        n = tf.shape(flat)[0]
        bos = tf.fill([n, 1], tf.constant(self.bos_id, tf.int32))
        eos = tf.fill([n, 1], tf.constant(self.eos_id, tf.int32))
        ids = tf.concat([bos, tf.cast(ids, tf.int32), eos], axis=1)
        dense = ids.to_tensor(default_value=self.pad_id, shape=[None, max_len])
        return tf.reshape(dense, tf.concat([shape, [max_len]], axis=0))

    def _tf_table(self):
        import tensorflow as tf  # deferred on purpose: only tf.data pipelines need it

        if getattr(self, "_table", None) is None:
            with tf.init_scope():  # eagerly, outside the tf.data function being traced: reusable by every pipeline
                init = tf.lookup.KeyValueTensorInitializer(
                    tf.constant(self.itos, tf.string), tf.range(len(self.itos), dtype=tf.int64))
                self._table = tf.lookup.StaticHashTable(init, default_value=self.unk_id)
        return self._table

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": "seqvis-word-vocab-v1", "specials": list(SPECIALS), "min_count": self.min_count,
                "words": self.itos[len(SPECIALS):], "counts": self.counts}

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=0)
        os.replace(tmp, path)  # never a half-written vocabulary next to a checkpoint

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise VocabularyError(f"cannot read the vocabulary {path}: {e}. Delete it only together with the "
                                  "checkpoints it belongs to (the model's output layer depends on it).") from e
        if d.get("format") != "seqvis-word-vocab-v1" or list(d.get("specials", [])) != list(SPECIALS):
            raise VocabularyError(f"{path} is not a seqvis word vocabulary (format/specials differ).")
        return cls(d["words"], min_count=d.get("min_count", 1), counts=d.get("counts"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.itos == other.itos
