"""What a ViT looks at: attention rollout and last-layer class-token maps.

The encoder blocks sow their attention weights ``A_l [batch, heads, T, T]`` (rows: queries,
columns: keys; ``sow('intermediates', 'attention_weights')`` in
:class:`seqvis.models.attention.MultiHeadAttention`), so nothing in the model changes.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers")
follows the attention through the residual stream: each block's output is its input plus
the attention branch, so a layer's token mixing is modelled by the head-averaged attention
plus the identity, with rows renormalised, and the layers compose by matrix product::

    Â_l = normalise_rows(½ · mean_h A_l + ½ · I)          [batch, T, T]
    R   = Â_L · Â_{L-1} ··· Â_1                             rows sum to 1

Row i of R says how much of token i's final representation flows from each input token.
For a class-token model the map is the class token's row over the patch tokens; for a
GAP model (no class token) it is the mean row (the pooled representation). The
last-layer maps are the same rows of the last layer's attention, one per head.

Command (a trained classification workdir; writes one PNG per image and an overview)::

    python -m seqvis.cli.vit_maps --workdir=DIR [--images=8] [--out=DIR/vit_maps]
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from seqvis.analysis.attention_maps import upsample
from seqvis.data import pipeline as data_lib
from seqvis.train.checkpoint import restore_variables
from seqvis.tasks.classification import build_classifier


# Label names for the pictures of the offline datasets (others show class ids).
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}


def collect_attention(intermediates: Any) -> np.ndarray:
    """Sown attention weights -> ``[layers, batch, heads, T, T]`` (encoder order).

    Works for the unrolled (``encoderblock_i``) and scanned (``encoderblock``, leading layer
    axis) encoders.
    """
    flat = traverse_util.flatten_dict(dict(intermediates))
    layers: list[tuple[int, np.ndarray]] = []
    for path, value in flat.items():
        if path[-1] != "attention_weights" or "Transformer" not in path:
            continue
        value = np.asarray(value[0] if isinstance(value, (tuple, list)) else value)
        blk = next(p for p in path if p.startswith("encoderblock"))
        if blk == "encoderblock":  # scanned: [layers, batch, heads, T, T]
            layers += [(i, value[i]) for i in range(value.shape[0])]
        else:
            layers.append((int(blk.split("_")[1]), value))
    if not layers:
        raise ValueError("no attention weights were recorded; the model must be a seqvis ViT with "
                         "use_fused_attention=False (fused attention does not expose its weights).")
    return np.stack([a for _, a in sorted(layers, key=lambda t: t[0])])


def rollout(attention: np.ndarray, residual: bool = True) -> np.ndarray:
    """Attention rollout ``[layers, batch, heads, T, T] -> [batch, T, T]`` (see module docstring).

    ``residual=False`` multiplies the raw head-averaged attention (no identity term).
    """
    a = np.asarray(attention, np.float64).mean(axis=2)  # [L, B, T, T]
    t = a.shape[-1]
    if residual:
        a = 0.5 * a + 0.5 * np.eye(t)
    a = a / a.sum(axis=-1, keepdims=True)
    r = np.broadcast_to(np.eye(t), a.shape[1:]).copy()
    for layer in a:
        r = layer @ r
    return r


def vit_maps(model: Any, variables: dict, images: np.ndarray) -> dict[str, np.ndarray]:
    """Rollout and last-layer maps of a seqvis ViT for ``images [B, H, W, C]``.

    Returns ``logits [B, K]``, ``attention [L, B, heads, T, T]``, ``rollout [B, T, T]``,
    ``rollout_map [B, gh, gw]`` (the class-token row, or the mean row for GAP, over the patch
    tokens, renormalised to sum to 1) and ``last_layer_maps [B, heads, gh, gw]`` (the same row
    of the last layer's attention per head; renormalised over the patches).
    """
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    logits, state = fwd(variables, np.asarray(images))
    att = collect_attention(state.get("intermediates", {}))
    sh, sw = model.stride()
    gh, gw = images.shape[1] // sh, images.shape[2] // sw
    prefix = att.shape[-1] - gh * gw
    r = rollout(att)

    def rows(m):  # [..., T, T] -> the pooled token's row over the patches [..., gh, gw]
        row = m[..., 0, prefix:] if prefix else m.mean(axis=-2)
        row = row / row.sum(axis=-1, keepdims=True)
        return row.reshape(row.shape[:-1] + (gh, gw))

    return {"logits": np.asarray(logits), "attention": att, "rollout": r, "rollout_map": rows(r),
            "last_layer_maps": rows(np.asarray(att[-1], np.float64))}


# ============================================================================ pictures


def save_maps_png(path: str, image: np.ndarray, rollout_map: np.ndarray, head_maps: np.ndarray,
                  title: str = "") -> None:
    """One PNG: the image, the rollout over it, and the last layer's class-token map per head."""
    from matplotlib.figure import Figure  # optional dependency (seqvis[plots]): deferred, drawing only

    img = _display(image)
    panels = [("image", None), ("rollout", rollout_map)] + [
        (f"last layer, head {h}", m) for h, m in enumerate(head_maps)]
    fig = Figure(figsize=(2.1 * len(panels), 2.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels):
        ax.axis("off")
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        if m is not None:
            up = upsample(m.reshape(-1), m.shape, img.shape[:2])
            ax.imshow(_stretch(up), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def save_overview_png(path: str, images: np.ndarray, maps: np.ndarray, titles: list[str]) -> None:
    """Two rows: the images, then each image with its rollout map."""
    from matplotlib.figure import Figure  # optional dependency (seqvis[plots]): deferred, drawing only

    n = len(images)
    fig = Figure(figsize=(1.6 * n, 3.4))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        img = _display(images[i])
        for r in range(2):
            axes[r, i].axis("off")
            axes[r, i].imshow(img, cmap="gray" if img.ndim == 2 else None)
        up = upsample(maps[i].reshape(-1), maps[i].shape, img.shape[:2])
        axes[1, i].imshow(_stretch(up), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[0, i].set_title(titles[i], fontsize=7)
    axes[1, 0].set_title("rollout", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _stretch(m: np.ndarray) -> np.ndarray:
    """Map values to [0, 1] for display (min-max: a rollout map is flat-ish, contrast matters)."""
    return (m - m.min()) / max(float(m.max() - m.min()), 1e-12)


def _display(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, np.float32)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    return img[..., 0] if img.shape[-1] == 1 else img


def render_workdir(workdir: str, out_dir: str | None = None, num_images: int = 8,
                   split: str | None = None) -> list[str]:
    """Maps for the first ``num_images`` eval images of a trained ViT classification workdir."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist; --workdir must be a trained seqvis workdir.")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("task", "classification") != "classification" or config.model.get("name", "vit") != "vit":
        raise ValueError(f"{workdir} is not a ViT classification workdir (config.task={config.get('task')!r}, "
                         f"config.model.name={config.model.get('name')!r}).")
    model_cfg = dict(config.model)
    model_cfg["use_fused_attention"] = False  # the weights must be sown
    model = build_classifier(ml_collections.ConfigDict(model_cfg), int(config.data.num_classes))
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt) or not any(d.isdigit() for d in os.listdir(ckpt)):
        raise FileNotFoundError(f"no checkpoint in {ckpt}; train first (python -m seqvis.cli.train "
                                f"--config=configs/vit.py --workdir={workdir}).")
    variables = restore_variables(workdir, config.to_dict())

    nd = jax.local_device_count()
    bs = max(nd, -(-int(num_images) // nd) * nd)
    batch = next(data_lib.eval_iterator(config.data, global_batch_size=bs, split=split))
    batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    keep = batch["mask"] > 0
    images, labels = batch["image"][keep][:num_images], batch["label"][keep][:num_images]

    res = vit_maps(model, variables, images)
    out_dir = out_dir or os.path.join(workdir, "vit_maps")
    os.makedirs(out_dir, exist_ok=True)
    names = list(CLASS_NAMES.get(config.data.get("preset", ""), ()))
    label = (lambda k: names[k] if k < len(names) else str(k))  # noqa: E731
    pred = res["logits"].argmax(-1)
    titles = [f"{label(int(p))} ({'ok' if p == y else 'true: ' + label(int(y))})" for p, y in zip(pred, labels)]
    paths = []
    for i in range(len(images)):
        path = os.path.join(out_dir, f"image_{i:03d}.png")
        save_maps_png(path, images[i], res["rollout_map"][i], res["last_layer_maps"][i], titles[i])
        paths.append(path)
    overview = os.path.join(out_dir, "overview.png")
    save_overview_png(overview, images, res["rollout_map"], titles)
    return paths + [overview]
