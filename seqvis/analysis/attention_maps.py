"""Where a captioner looks: grounding scores and per-word attention-map pictures.

Grounding. For every generated word that names an item (a head noun of the scene grammar,
e.g. ``sneaker`` or ``boot`` of ``ankle boot``), take the attention weights that produced the
word, ``α_t [L]`` over the ``h x w`` regions; the argmax region ``(r, c)`` is mapped back to
the pixel at the centre of its receptive field (:func:`seqvis.models.captioning.region_geometry`:
``(16r + ½, 16c + ½)`` for the stride-16 ResNet, the patch centre for ViT patches), and the
word is *grounded* if that pixel lies inside the named item's box ``[y0, x0, y1, x1)``. The named item is the item of the scene with the
word's class; if the scene has several, the colour word in front of the noun picks one.
Words naming a class that is not in the scene have no box: they are not counted in the
grounding fraction, but in ``item_word_precision`` (the fraction of item words naming an
item that is there). ``grounding_colour`` is the same test for the colour words (the item
of that colour), which in this grammar come right before the noun.

Pictures (command)::

    python -m seqvis.analysis.attention_maps --workdir=DIR [--num_images=8] [--out=DIR/attention_maps]

loads the newest checkpoint and the vocabulary of a captioning workdir, decodes test images
(greedy) and writes one PNG per image: the image, then the attention map over the image
for every generated word. matplotlib is imported only by this command.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np


COUNT_KEYS = ("item_words", "with_referent", "grounded", "colour_words", "colour_with_referent", "colour_grounded")


def _geometry(grid, image_hw, geometry):
    """``geometry``, or by default the grid stretched over the image (region r centred at (r + ½)·H/h)."""
    if geometry is not None:
        return geometry
    (h, w), (hh, ww) = grid, image_hw
    return hh / (2 * h), ww / (2 * w), hh / h, ww / w


def region_centres(grid: tuple[int, int], image_hw: tuple[int, int],
                   geometry: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Centres ``[h·w, 2]`` (y, x) of the regions, in continuous pixel coordinates (pixel i spans [i, i+1)).

    ``geometry = (y_0, x_0, step_y, step_x)`` from :func:`seqvis.models.captioning.region_geometry`
    (where the encoder's receptive fields are centred); default: the grid stretched over the image.
    """
    h, w = grid
    y0, x0, sy, sx = _geometry(grid, image_hw, geometry)
    r, c = np.divmod(np.arange(h * w), w)
    return np.stack([y0 + r * sy, x0 + c * sx], axis=1)


def grounding_counts(words: Sequence[Sequence[str]], attention: np.ndarray, labels: np.ndarray,
                     colours: np.ndarray, boxes: np.ndarray, *, grid: tuple[int, int],
                     image_hw: tuple[int, int], noun_classes: Mapping[str, int],
                     colour_ids: Mapping[str, int],
                     geometry: tuple[float, float, float, float] | None = None) -> dict[str, int]:
    """Counts over a batch of generated captions (see the module docstring).

    Args:
      words: per image, the generated words (token t of the caption is ``words[n][t]``).
      attention: ``[N, T, L]`` weights that produced token t (L = h·w).
      labels, colours: ``[N, K]`` class and colour id of each item (-1 = no item).
      boxes: ``[N, K, 4]`` item boxes ``[y0, x0, y1, x1)`` in pixels.
      geometry: where the regions are centred (see :func:`region_centres`).
    Returns:
      ``{'item_words', 'with_referent', 'grounded'}`` for the nouns, and the same for the colour
      words (``colour_words``, ``colour_with_referent``, ``colour_grounded``: the referent of a
      colour word is the item of that colour).
    """
    centres = region_centres(grid, image_hw, geometry)
    out = dict.fromkeys(COUNT_KEYS, 0)

    def inside(n, t, k):
        y, x = centres[int(np.argmax(attention[n, t]))]
        y0, x0, y1, x1 = boxes[n, k]
        return int(y0 <= y < y1 and x0 <= x < x1)

    for n, ws in enumerate(words):
        for t, word in enumerate(ws):
            if word in colour_ids:
                out["colour_words"] += 1
                items = [k for k in range(labels.shape[1]) if labels[n, k] >= 0 and colours[n, k] == colour_ids[word]]
                if len(items) == 1:
                    out["colour_with_referent"] += 1
                    out["colour_grounded"] += inside(n, t, items[0])
                continue
            cls = noun_classes.get(word)
            if cls is None:
                continue
            out["item_words"] += 1
            items = [k for k in range(labels.shape[1]) if labels[n, k] == cls]
            if len(items) > 1:  # disambiguate by the colour word before the noun ("an orange ankle boot")
                j = t - 1
                while j >= 0 and ws[j] not in colour_ids and ws[j] not in noun_classes:
                    j -= 1
                colour = colour_ids.get(ws[j]) if j >= 0 else None
                items = [k for k in items if colours[n, k] == colour]
            if len(items) != 1:
                continue
            out["with_referent"] += 1
            out["grounded"] += inside(n, t, items[0])
    return out


def grounding_scores(counts: Mapping[str, int]) -> dict[str, float]:
    return {"grounding": counts["grounded"] / max(counts["with_referent"], 1),
            "item_word_precision": counts["with_referent"] / max(counts["item_words"], 1),
            "grounding_colour": counts["colour_grounded"] / max(counts["colour_with_referent"], 1)}


# ============================================================================ pictures


def upsample(att: np.ndarray, grid: tuple[int, int], image_hw: tuple[int, int],
             geometry: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Attention over ``h x w`` regions -> ``[H, W]`` map: bilinear between the region centres."""
    from scipy.ndimage import map_coordinates

    h, w = grid
    hh, ww = image_hw
    y0, x0, sy, sx = _geometry(grid, image_hw, geometry)
    ys = (np.arange(hh) + 0.5 - y0) / sy  # pixel centre -> fractional region index
    xs = (np.arange(ww) + 0.5 - x0) / sx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return map_coordinates(att.reshape(h, w), [yy, xx], order=1, mode="nearest")


def save_attention_png(path: str, image: np.ndarray, words: Sequence[str], attention: np.ndarray,
                       grid: tuple[int, int], boxes: np.ndarray | None = None, title: str = "",
                       geometry: tuple[float, float, float, float] | None = None) -> None:
    """One PNG: the image, then one panel per word with its attention map over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = np.asarray(image, np.float32)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    n = len(words) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=9)
    if boxes is not None:
        for y0, x0, y1, x1 in boxes:
            if y0 >= 0:
                axes[0, 0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="w", lw=0.8))
    for i, word in enumerate(words):
        ax = axes[(i + 1) // cols, (i + 1) % cols]
        ax.imshow(img)
        m = upsample(attention[i], grid, img.shape[:2], geometry)
        ax.imshow(m / max(float(m.max()), 1e-9), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(word, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def render_workdir(workdir: str, out_dir: str | None = None, num_images: int = 8,
                   split: str | None = None) -> list[str]:
    """Decode ``num_images`` images of the eval split of a trained captioning workdir; one PNG each."""
    import jax

    from seqvis.data import pipeline as data_lib
    from seqvis.models.captioning import region_geometry
    from seqvis.models.decoding import make_decoder
    from seqvis.train import captioning as cap_task

    task = cap_task.workdir_task(workdir, data_lib)  # with the workdir's vocabulary
    config = task.config
    variables = cap_task.restore_variables(workdir)
    tok = task.tokenizer
    decode = make_decoder(task.model, method="greedy", max_steps=task.max_len - 1, bos_id=tok.bos_id,
                          eos_id=tok.eos_id, pad_id=tok.pad_id)
    out_dir = out_dir or os.path.join(workdir, "attention_maps")
    os.makedirs(out_dir, exist_ok=True)
    batch = task.host_examples(data_lib, split=split, limit=num_images)
    res = jax.device_get(decode(variables, batch["image"]))
    grid = task.feature_grid(variables)
    geometry = region_geometry(task.model.encoder, tuple(config.data.image_shape[:2]), grid)
    if res["attention"].shape[-1] == 0:
        raise ValueError(f"config.model.name={config.model.name!r} has no attention to draw; use a "
                         "show_attend_tell or transformer workdir.")
    paths = []
    for n in range(len(batch["image"])):
        ids = res["tokens"][n]
        words = cap_task.token_words(ids, tok, keep_eos=True)
        path = os.path.join(out_dir, f"image_{int(batch['image_id'][n]):06d}.png")
        save_attention_png(path, batch["image"][n], words, res["attention"][n], grid,
                           boxes=batch.get("boxes", [None])[n] if "boxes" in batch else None,
                           title=tok.decode(ids), geometry=geometry)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Per-word attention maps of a trained captioning workdir.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None, help="output directory (default WORKDIR/attention_maps)")
    p.add_argument("--num_images", type=int, default=8)
    p.add_argument("--split", default=None, help="default: config.data.eval_split")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        paths = render_workdir(a.workdir, a.out, a.num_images, a.split)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
