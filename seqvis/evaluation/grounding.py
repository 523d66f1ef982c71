"""Caption grounding: does the attention that produced an item word point at that item?

For every generated word that names an item (a head noun of the scene grammar, e.g.
``sneaker`` or ``boot`` of ``ankle boot``), take the attention weights that produced the
word, ``α_t [L]`` over the ``h x w`` regions; the argmax region ``(r, c)`` is mapped back to
the pixel at the centre of its receptive field (:func:`seqvis.models.captioning.region_geometry`:
``(16r + ½, 16c + ½)`` for the stride-16 ResNet, the patch centre for ViT patches), and the
word is *grounded* if that pixel lies inside the named item's box ``[y0, x0, y1, x1)``. The
named item is the item of the scene with the word's class; if the scene has several, the
colour word in front of the noun picks one. Words naming a class that is not in the scene
have no box: they are not counted in the grounding fraction, but in ``item_word_precision``
(the fraction of item words naming an item that is there). ``grounding_colour`` is the same
test for the colour words (the item of that colour), which in this grammar come right
before the noun.

The captioning task's final evaluation reports these scores; the pictures of the maps are
:mod:`seqvis.analysis.attention_maps`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from seqvis.models.captioning import stretched_geometry


COUNT_KEYS = ("item_words", "with_referent", "grounded", "colour_words", "colour_with_referent", "colour_grounded")


def resolve_geometry(grid: tuple[int, int], image_hw: tuple[int, int],
                     geometry: tuple[float, float, float, float] | None) -> tuple[float, float, float, float]:
    """``geometry``, or by default the grid stretched over the image (region r centred at (r + ½)·H/h)."""
    return geometry if geometry is not None else stretched_geometry(grid, image_hw)


def region_centres(grid: tuple[int, int], image_hw: tuple[int, int],
                   geometry: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Centres ``[h·w, 2]`` (y, x) of the regions, in continuous pixel coordinates (pixel i spans [i, i+1)).

    ``geometry = (y_0, x_0, step_y, step_x)`` from :func:`seqvis.models.captioning.region_geometry`
    (where the encoder's receptive fields are centred); default: the grid stretched over the image.
    """
    h, w = grid
    y0, x0, sy, sx = resolve_geometry(grid, image_hw, geometry)
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
