"""Where a captioner looks: per-word attention-map pictures.

The grounding scores (the argmax region of the attention that produced an item word, tested
against that item's box) are computed in :mod:`seqvis.evaluation.grounding`, which the
captioning task's final evaluation uses.

Pictures (command)::

    python -m seqvis.cli.attention_maps --workdir=DIR [--num_images=8] [--out=DIR/attention_maps]

loads the newest checkpoint and the vocabulary of a captioning workdir, decodes test images
(greedy) and writes one PNG per image: the image, then the attention map over the image
for every generated word. matplotlib and scipy are imported only by the functions that draw
(optional dependencies, ``pip install seqvis[plots]``).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from seqvis.evaluation.grounding import resolve_geometry
from seqvis.models.captioning import region_geometry
from seqvis.models.decoding import make_decoder
from seqvis.tasks import captioning as cap_task
from seqvis.tasks.captioning_eval import token_words
from seqvis.train.checkpoint import restore_variables


# ============================================================================ pictures


def upsample(att: np.ndarray, grid: tuple[int, int], image_hw: tuple[int, int],
             geometry: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Attention over ``h x w`` regions -> ``[H, W]`` map: bilinear between the region centres."""
    from scipy.ndimage import map_coordinates  # optional dependency (seqvis[plots]), only for drawing

    h, w = grid
    hh, ww = image_hw
    y0, x0, sy, sx = resolve_geometry(grid, image_hw, geometry)
    ys = (np.arange(hh) + 0.5 - y0) / sy  # pixel centre -> fractional region index
    xs = (np.arange(ww) + 0.5 - x0) / sx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return map_coordinates(att.reshape(h, w), [yy, xx], order=1, mode="nearest")


def save_attention_png(path: str, image: np.ndarray, words: Sequence[str], attention: np.ndarray,
                       grid: tuple[int, int], boxes: np.ndarray | None = None, title: str = "",
                       geometry: tuple[float, float, float, float] | None = None) -> None:
    """One PNG: the image, then one panel per word with its attention map over the image."""
    # matplotlib is an optional dependency (seqvis[plots]): deferred, drawing only. A bare Figure
    # writes files without pyplot, so no backend is selected for the caller.
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img = np.asarray(image, np.float32)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    n = len(words) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
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


def render_workdir(workdir: str, out_dir: str | None = None, num_images: int = 8,
                   split: str | None = None) -> list[str]:
    """Decode ``num_images`` images of the eval split of a trained captioning workdir; one PNG each."""
    task = cap_task.workdir_task(workdir)  # with the workdir's vocabulary
    config = task.config
    variables = restore_variables(workdir, config.to_dict())
    tok = task.tokenizer
    decode = make_decoder(task.model, method="greedy", max_steps=task.max_len - 1, bos_id=tok.bos_id,
                          eos_id=tok.eos_id, pad_id=tok.pad_id)
    out_dir = out_dir or os.path.join(workdir, "attention_maps")
    os.makedirs(out_dir, exist_ok=True)
    batch = task.host_examples(split=split, limit=num_images)
    res = jax.device_get(decode(variables, batch["image"]))
    grid = task.feature_grid(variables)
    geometry = region_geometry(task.model.encoder, tuple(config.data.image_shape[:2]), grid)
    if res["attention"].shape[-1] == 0:
        raise ValueError(f"config.model.name={config.model.name!r} has no attention to draw; use a "
                         "show_attend_tell or transformer workdir.")
    paths = []
    for n in range(len(batch["image"])):
        ids = res["tokens"][n]
        words = token_words(ids, tok, keep_eos=True)
        path = os.path.join(out_dir, f"image_{int(batch['image_id'][n]):06d}.png")
        save_attention_png(path, batch["image"][n], words, res["attention"][n], grid,
                           boxes=batch.get("boxes", [None])[n] if "boxes" in batch else None,
                           title=tok.decode(ids), geometry=geometry)
        paths.append(path)
    return paths
