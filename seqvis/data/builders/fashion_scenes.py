"""Fashion scenes: an offline captioning dataset made of real Fashion-MNIST items.

Each image is a black ``canvas x canvas x 3`` picture holding 2-3 real 28x28 Fashion-MNIST
items, each tinted with a different colour and pasted without overlap. Five reference
captions name colour, item and spatial relation, drawn from a small grammar with
synonyms, orderings and templates, like five COCO annotators::

    a red sneaker to the left of a blue bag
    there is a blue handbag on the right of a red trainer
    a pair of green pants above an orange boot which is left of a white coat

Every item's tight box (its non-black pixels, ``[y0, x0, y1, x1)`` in pixels), class and
colour are stored, so that grounding can be measured. Train scenes use items from the
Fashion-MNIST *train* split only, test scenes items from its *test* split only.

Grammar. Let ``NP(x)`` be ``a[n] <colour> <noun>`` (``a pair of <colour> trousers|pants``
for trousers). Relations come from the item centres: with ``dx, dy`` the displacement from
``x`` to ``y``, ``rel(x, y)`` is *left of / right of* when ``|dx| > |dy|`` and *above / below*
otherwise (placements where ``||dx| - |dy|| < margin`` are re-drawn, so no relation is a
judgement call). The caption of 2 items is ``[there is] NP(a) rel(a, b) NP(b)``; of 3 items
``[there is] NP(a) rel(a, b) NP(b) which|that is rel(b, c) NP(c)``. The items are mentioned in
reading order (left to right, or top to bottom when the layout is taller than wide) with
probability 0.6 (2 items: 0.7), otherwise in another order; each noun and relation uses
its most common wording with probability 0.6 and a synonym otherwise; the five references
of an image are distinct.

Generation is deterministic in ``seed``; all parameters are part of the BuilderConfig
name, so another setting never reuses stale prepared data.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds

from seqvis.data.builders.idx import load_split

ITEM = 28  # Fashion-MNIST item size in pixels
NUM_REFS = 5

COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (225, 35, 35)), ("green", (40, 185, 55)), ("blue", (45, 90, 235)), ("yellow", (235, 215, 35)),
    ("purple", (150, 55, 205)), ("orange", (245, 135, 25)), ("white", (235, 235, 235)),
]
# Per Fashion-MNIST class: nouns, the most common first. ("ankle boot" ends in the noun "boot".)
NOUNS: list[list[str]] = [
    ["top", "tee"],                      # 0 T-shirt/top
    ["trousers", "pants"],               # 1 Trouser (plural: "a pair of ...")
    ["pullover", "sweater", "jumper"],   # 2 Pullover
    ["dress"],                           # 3 Dress
    ["coat", "jacket"],                  # 4 Coat
    ["sandal"],                          # 5 Sandal
    ["shirt"],                           # 6 Shirt
    ["sneaker", "trainer", "shoe"],      # 7 Sneaker
    ["bag", "handbag"],                  # 8 Bag
    ["boot", "ankle boot"],              # 9 Ankle boot
]
PLURAL = {1}
RELATIONS: dict[str, list[str]] = {
    "left": ["to the left of", "left of", "on the left of"],
    "right": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
}


def noun_classes() -> dict[str, int]:
    """Head noun (last word of every wording) -> Fashion-MNIST class, for grounding."""
    return {n.split()[-1]: c for c, names in enumerate(NOUNS) for n in names}


def colour_ids() -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(COLOURS)}


@dataclasses.dataclass
class FashionScenesConfig(tfds.core.BuilderConfig):
    num_train: int = 20_000
    num_test: int = 2_000
    canvas: int = 84
    min_items: int = 2
    max_items: int = 3
    margin: int = 8
    seed: int = 0


def make_config(num_train: int = 20_000, num_test: int = 2_000, canvas: int = 84, min_items: int = 2,
                max_items: int = 3, margin: int = 8, seed: int = 0) -> FashionScenesConfig:
    for field, v, lo in (("num_train", num_train, 1), ("num_test", num_test, 1), ("min_items", min_items, 2),
                         ("margin", margin, 0)):
        if int(v) < lo:
            raise ValueError(f"config.data.builder_kwargs.{field}={v} must be >= {lo}.")
    if max_items < min_items or max_items > 3:
        raise ValueError(f"config.data.builder_kwargs: need min_items <= max_items <= 3, got {min_items}..{max_items} "
                         "(the grammar describes 2 or 3 items).")
    if canvas < 2 * ITEM:
        raise ValueError(f"config.data.builder_kwargs.canvas={canvas} is too small for {max_items} items of "
                         f"{ITEM} px; use at least {2 * ITEM} ({3 * ITEM} for 3 items is comfortable).")
    name = f"n{num_train}-{num_test}_c{canvas}_k{min_items}-{max_items}_m{margin}_s{seed}"
    return FashionScenesConfig(name=name, num_train=int(num_train), num_test=int(num_test), canvas=int(canvas),
                               min_items=int(min_items), max_items=int(max_items), margin=int(margin),
                               seed=int(seed), description="Fashion-MNIST scenes with captions.")


# ----------------------------------------------------------------------------- layout


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    """Where item a is relative to item b (centres [y, x])."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    if abs(dx) > abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def place(rng: np.random.Generator, n: int, canvas: int, margin: int, max_tries: int = 10_000) -> np.ndarray:
    """Top-left corners ``[n, 2]`` (y, x) of n non-overlapping items with unambiguous pairwise relations."""
    hi = canvas - ITEM
    for _ in range(max_tries):
        pos = rng.integers(0, hi + 1, size=(n, 2))
        ok = True
        for i, j in itertools.combinations(range(n), 2):
            dy, dx = np.abs(pos[i] - pos[j])
            if (dy < ITEM and dx < ITEM) or abs(int(dx) - int(dy)) < margin:
                ok = False
                break
        if ok:
            return pos
    raise ValueError(f"cannot place {n} items of {ITEM} px on a {canvas} px canvas with margin {margin}; "
                     "increase config.data.builder_kwargs.canvas or lower margin.")


def tight_box(gray: np.ndarray, top: int, left: int, threshold: int = 40) -> list[int]:
    """``[y0, x0, y1, x1)`` in canvas pixels of the item's pixels brighter than ``threshold``."""
    ys, xs = np.nonzero(gray > threshold)
    if len(ys) == 0:  # an (almost) black item: its whole square
        return [top, left, top + ITEM, left + ITEM]
    return [top + int(ys.min()), left + int(xs.min()), top + int(ys.max()) + 1, left + int(xs.max()) + 1]


def render(rng: np.random.Generator, grays: np.ndarray, colours: list[int], pos: np.ndarray,
           canvas: int) -> np.ndarray:
    """Tinted items on a dark, slightly noisy canvas: ``pixel = gray/255 · colour · brightness``."""
    img = rng.integers(0, 12, size=(canvas, canvas, 3)).astype(np.float32)
    for g, c, (y, x) in zip(grays, colours, pos):
        rgb = np.clip(np.asarray(COLOURS[c][1], np.float32) + rng.uniform(-20, 20, 3), 0, 255)
        item = g.astype(np.float32)[..., None] / 255.0 * rgb * rng.uniform(0.75, 1.0)
        img[y:y + ITEM, x:x + ITEM] = np.maximum(img[y:y + ITEM, x:x + ITEM], item)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- grammar


def _pick(rng: np.random.Generator, options: list[str], p_first: float = 0.6) -> str:
    if len(options) == 1 or rng.random() < p_first:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


def _np(rng: np.random.Generator, label: int, colour: int) -> str:
    colour_name = COLOURS[colour][0]
    noun = _pick(rng, NOUNS[label])
    if label in PLURAL:
        return f"a pair of {colour_name} {noun}"
    article = "an" if colour_name[0] in "aeiou" else "a"
    return f"{article} {colour_name} {noun}"


def reading_order(centres: np.ndarray) -> list[int]:
    """Left to right, or top to bottom when the layout spreads more vertically."""
    spread = centres.max(0) - centres.min(0)
    axis = 1 if spread[1] >= spread[0] else 0
    return [int(i) for i in np.lexsort((centres[:, 1 - axis], centres[:, axis]))]


def caption(rng: np.random.Generator, labels: list[int], colours: list[int], centres: np.ndarray) -> str:
    """One caption of the scene, sampled from the grammar (see the module docstring)."""
    n = len(labels)
    order = reading_order(centres)
    p_reading = 0.7 if n == 2 else 0.6
    if rng.random() >= p_reading:
        others = [list(p) for p in itertools.permutations(range(n)) if list(p) != order]
        order = others[int(rng.integers(len(others)))]
    words = ["there is"] if rng.random() < 0.25 else []
    a = order[0]
    words.append(_np(rng, labels[a], colours[a]))
    for k in range(1, n):
        prev, cur = order[k - 1], order[k]
        if k == 2:
            words.append("which is" if rng.random() < 0.6 else "that is")
        words.append(_pick(rng, RELATIONS[_relation(centres[prev], centres[cur])]))
        words.append(_np(rng, labels[cur], colours[cur]))
    return " ".join(words)


def references(rng: np.random.Generator, labels, colours, centres, k: int = NUM_REFS) -> list[str]:
    """k distinct captions (distinct while the grammar allows; duplicates only after many draws)."""
    refs: list[str] = []
    for _ in range(200):
        c = caption(rng, labels, colours, centres)
        if c not in refs:
            refs.append(c)
            if len(refs) == k:
                return refs
    while len(refs) < k:
        refs.append(caption(rng, labels, colours, centres))
    return refs


def generate(images: np.ndarray, labels: np.ndarray, num: int, cfg: FashionScenesConfig, split_index: int):
    """Yield ``num`` scenes (dicts of numpy values) built from the given Fashion-MNIST items."""
    rng = np.random.default_rng([cfg.seed, split_index])
    mx = cfg.max_items
    for i in range(num):
        n = int(rng.integers(cfg.min_items, cfg.max_items + 1))
        idx = rng.choice(len(images), size=n, replace=False)
        colours = [int(c) for c in rng.choice(len(COLOURS), size=n, replace=False)]
        pos = place(rng, n, cfg.canvas, cfg.margin)
        grays = images[idx]
        img = render(rng, grays, colours, pos, cfg.canvas)
        item_labels = [int(labels[j]) for j in idx]
        centres = pos.astype(np.float64) + ITEM / 2.0
        refs = references(rng, item_labels, colours, centres)
        boxes = np.full((mx, 4), -1, np.int32)
        lab = np.full((mx,), -1, np.int32)
        col = np.full((mx,), -1, np.int32)
        for j in range(n):
            boxes[j] = tight_box(grays[j], int(pos[j, 0]), int(pos[j, 1]))
            lab[j] = item_labels[j]
            col[j] = colours[j]
        yield i, {"image": img, "image_id": np.int32(i), "captions": refs, "num_items": np.int32(n),
                  "labels": lab, "colours": col, "boxes": boxes}


class FashionScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Captioned scenes of 2-3 tinted Fashion-MNIST items (see the module docstring).

    Built offline from the local Fashion-MNIST IDX files (``idx_dir``, ``$SEQVIS_IDX_DIR`` or
    the Debian package); keyword arguments (``num_train``, ``num_test``, ``canvas``,
    ``min_items``, ``max_items``, ``margin``, ``seed``) come from ``config.data.builder_kwargs``.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, idx_dir: str | None = None, **kwargs):
        gen_fields = {f.name for f in dataclasses.fields(FashionScenesConfig)} - {
            f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        gen = {k: kwargs.pop(k) for k in list(kwargs) if k in gen_fields}
        if kwargs.get("config") is None:
            unknown = set(kwargs) - {"data_dir", "version", "config"}
            if unknown:
                raise ValueError(f"config.data.builder_kwargs: unknown field(s) {sorted(unknown)} for fashion_scenes; "
                                 f"valid: {sorted(gen_fields)}.")
            kwargs["config"] = make_config(**gen)
        self._idx_dir = idx_dir or None
        super().__init__(**kwargs)

    def _info(self):
        cfg = self.builder_config
        mx = cfg.max_items
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(cfg.canvas, cfg.canvas, 3)),
                "image_id": np.int32,
                "captions": tfds.features.Sequence(tfds.features.Text(), length=NUM_REFS),
                "num_items": np.int32,
                "labels": tfds.features.Tensor(shape=(mx,), dtype=np.int32),
                "colours": tfds.features.Tensor(shape=(mx,), dtype=np.int32),
                "boxes": tfds.features.Tensor(shape=(mx, 4), dtype=np.int32),
            }),
            description=__doc__.split("\n\n")[0])

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train, 0),
                "test": self._generate_examples("test", cfg.num_test, 1)}

    def _generate_examples(self, split: str, num: int, split_index: int):
        images, labels = load_split("fashion_mnist", split, self._idx_dir)
        yield from generate(images, labels, num, self.builder_config, split_index)
