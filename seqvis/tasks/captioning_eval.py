"""The captioning task's final evaluation: decode the eval split, score, ground, write.

The eval split is decoded greedily and with beam search (jit, batched); BLEU-1..4, CIDEr-D and
ROUGE-L against all references (:mod:`seqvis.evaluation.caption_metrics`); grounding for attention
models on datasets with item boxes (:mod:`seqvis.evaluation.grounding`). Writes ``captions_test.json`` (beam,
COCO results format), ``captions_test_greedy.json`` and ``captions_refs.json`` (COCO
annotation format); ``results.json`` gets ``greedy_*`` and ``beam_*`` scores and the beam
scores again without prefix.

The task (:class:`seqvis.tasks.captioning.CaptioningTask`) calls :func:`final_evaluation`
with itself; this module reads what it needs from it (``tokenizer``, ``model``, ``max_len``,
``feature_grid``, ``host_examples``, ``references``) and does not import the task module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from seqvis.data.tokenizer import Tokenizer
from seqvis.evaluation import grounding
from seqvis.evaluation.caption_metrics import bleu, cider_d, rouge_l
from seqvis.models import captioning as cap
from seqvis.models import decoding

log = logging.getLogger(__name__)


# ============================================================================ generated ids -> words


def token_words(ids, tok: Tokenizer, keep_eos: bool = False) -> list[str]:
    """Generated ids -> one word per position up to ``<eos>`` (included if ``keep_eos``)."""
    words = []
    for i in np.asarray(ids).tolist():
        if i == tok.eos_id:
            if keep_eos:
                words.append("<eos>")
            break
        if i == tok.pad_id:
            break
        words.append(tok.itos[i])
    return words


# ============================================================================ decode and score


def final_evaluation(task: Any, variables: dict, config: Any, workdir: str) -> dict[str, Any]:
    """Greedy and beam captions of the eval split, their scores (``greedy_*``, ``beam_*``, the beam ones
    also unprefixed) and the caption files in ``workdir``; ``task`` is the set-up captioning task."""
    t0 = time.time()
    tok, model, dec = task.tokenizer, task.model, config.decode
    steps = task.max_len - 1
    common = dict(max_steps=steps, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    decoders = {"greedy": decoding.make_decoder(model, method="greedy", **common),
                "beam": decoding.make_decoder(model, method="beam", beam_size=int(dec.beam_size),
                                              alpha=float(dec.get("length_penalty", 0.0)), **common)}
    variables = jax.device_put(variables, jax.local_devices()[0])
    grid = task.feature_grid(variables)
    h, w, _ = config.data.image_shape
    geometry = cap.region_geometry(model.encoder, (h, w), grid)
    grounding_ok = config.data.get("name") == "fashion_scenes"
    if grounding_ok:
        from seqvis.data.builders import fashion_scenes as fs  # deferred on purpose: imports tfds

        nouns, colours = fs.noun_classes(), fs.colour_ids()
    ids_all, masks, out_tokens = [], [], {m: [] for m in decoders}
    counts = {m: dict.fromkeys(grounding.COUNT_KEYS, 0) for m in decoders}
    has_attention = False
    for batch in task.host_examples():
        keep = batch["mask"] > 0
        ids_all.append(batch["image_id"])
        masks.append(keep)
        for m, fn in decoders.items():
            res = jax.device_get(fn(variables, batch["image"]))
            out_tokens[m].append(res["tokens"])
            att = res["attention"][keep]
            if att.shape[-1] and grounding_ok and "boxes" in batch:
                has_attention = True
                words = [token_words(t, tok) for t in res["tokens"][keep]]
                c = grounding.grounding_counts(words, att, batch["labels"][keep], batch["colours"][keep],
                                               batch["boxes"][keep], grid=grid, image_hw=(h, w),
                                               noun_classes=nouns, colour_ids=colours, geometry=geometry)
                for k in c:
                    counts[m][k] += c[k]
    if not ids_all:
        raise ValueError("the eval split is empty; nothing to caption.")
    ids, keep = np.concatenate(ids_all), np.concatenate(masks)
    tokens = {m: np.concatenate(v) for m, v in out_tokens.items()}
    if jax.process_count() > 1:  # every process decoded its shard (same padded shapes); gather them
        ids, keep, tokens, counts = _gather_processes(ids, keep, tokens, counts)
    ids, tokens = ids[keep], {m: t[keep] for m, t in tokens.items()}
    refs = task.references()
    results: dict[str, Any] = {"decode_seconds": 0.0, "num_captions": int(len(ids))}
    caps_by_method = {}
    for m in decoders:
        cands = {int(i): [tok.decode(t)] for i, t in zip(ids, tokens[m])}
        missing = [i for i in cands if i not in refs]
        if missing:
            raise ValueError(f"{len(missing)} decoded images have no references in the eval split "
                             f"(e.g. image ids {missing[:3]}); are the image ids unique?")
        b = bleu(cands, refs)
        cider, _ = cider_d(cands, refs)
        scores = {f"bleu{n + 1}": float(b[n]) for n in range(4)}
        scores["cider"] = float(cider)
        scores["rouge_l"] = float(rouge_l(cands, refs)[0])
        scores["mean_length"] = float(np.mean([len(c[0].split()) for c in cands.values()]))
        if has_attention:
            scores.update(grounding.grounding_scores(counts[m]))
        for k, v in scores.items():
            results[f"{m}_{k}"] = v
        caps_by_method[m] = cands
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "grounding", "item_word_precision",
              "grounding_colour"):
        if f"beam_{k}" in results:
            results[k] = results[f"beam_{k}"]
    results["beam_size"] = int(dec.beam_size)
    results["length_penalty"] = float(dec.get("length_penalty", 0.0))
    results["vocab_size"] = tok.vocab_size
    if hasattr(model, "kv_cache"):  # the transformer: with or without the key/value cache (same captions)
        results["kv_cache"] = bool(model.kv_cache)
    results["decode_seconds"] = time.time() - t0
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "captions_test.json"), _coco_results(caps_by_method["beam"]))
        write_json(os.path.join(workdir, "captions_test_greedy.json"), _coco_results(caps_by_method["greedy"]))
        write_json(os.path.join(workdir, "captions_refs.json"),
                   _coco_annotations({i: refs[i] for i in caps_by_method["beam"]}))
    log.info("captioning: %s", {k: round(v, 4) for k, v in results.items() if isinstance(v, float)})
    return results


# ============================================================================ outputs


def _coco_results(cands: dict[int, list[str]]) -> list[dict]:
    return [{"image_id": int(i), "caption": cands[i][0]} for i in sorted(cands)]


def _coco_annotations(refs: dict[int, list[str]]) -> dict:
    """References in the COCO captions annotation format (loadable by pycocotools' COCO)."""
    images, anns = [], []
    for i in sorted(refs):
        images.append({"id": int(i)})
        for r in refs[i]:
            anns.append({"image_id": int(i), "id": len(anns) + 1, "caption": r})
    return {"info": {"description": "seqvis captioning references"}, "licenses": [], "type": "captions",
            "images": images, "annotations": anns}


def write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written to a temporary file first (never half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _gather_processes(ids, keep, tokens, counts):
    g = multihost_utils.process_allgather(
        {"ids": ids, "keep": keep, **{f"tok_{m}": t for m, t in tokens.items()}}, tiled=True)
    c = multihost_utils.process_allgather({m: np.asarray([v[k] for k in grounding.COUNT_KEYS]) for m, v in counts.items()})
    counts = {m: dict(zip(grounding.COUNT_KEYS, np.asarray(c[m]).sum(0).tolist())) for m in counts}
    return (np.asarray(g["ids"]), np.asarray(g["keep"]).astype(bool), {m: np.asarray(g[f"tok_{m}"]) for m in tokens},
            counts)
