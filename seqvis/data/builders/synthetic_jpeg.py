"""An ImageNet-like set made offline: JPEGs of mixed sizes and aspect ratios, in several shards.

It stands in for ImageNet where no machine here has it: images are ``min_size..max_size``
pixels per side, drawn independently (aspect ratios from about 1:3 to 3:1), RGB with one
in ``gray_every`` grayscale (ImageNet holds a few), JPEG-encoded at ``quality``; their
content is smooth colour fields with texture and noise, so a JPEG is tens of kilobytes and
decodes at a realistic cost. The label is random (``num_classes``) and ``id`` is the
example's index in its split, so tests can check which examples a pipeline visited.

The files are written in the ``array_record`` format (random access) in ``num_shards``
shards per split, as a pod job reads ImageNet prepared with
``tfds build imagenet2012 --file_format=array_record``. Generation is deterministic in
``seed``; all parameters are part of the BuilderConfig name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds


@dataclasses.dataclass
class SyntheticJpegConfig(tfds.core.BuilderConfig):
    num_train: int = 2_000
    num_eval: int = 200
    min_size: int = 150
    max_size: int = 500
    num_classes: int = 10
    gray_every: int = 50
    quality: int = 90
    num_shards: int = 4
    seed: int = 0


def make_config(**kw) -> SyntheticJpegConfig:
    fields = {f.name for f in dataclasses.fields(SyntheticJpegConfig)} - {
        f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    unknown = set(kw) - fields
    if unknown:
        raise ValueError(f"config.data.builder_kwargs: unknown field(s) {sorted(unknown)} for synthetic_jpeg; "
                         f"valid: {sorted(fields)}.")
    c = SyntheticJpegConfig(name="x", **{k: int(v) for k, v in kw.items()})
    if not 16 <= c.min_size <= c.max_size:
        raise ValueError(f"config.data.builder_kwargs: need 16 <= min_size <= max_size, got {c.min_size}, "
                         f"{c.max_size}.")
    name = (f"n{c.num_train}-{c.num_eval}_px{c.min_size}-{c.max_size}_k{c.num_classes}_g{c.gray_every}_"
            f"q{c.quality}_sh{c.num_shards}_s{c.seed}")
    return dataclasses.replace(c, name=name, description="Synthetic ImageNet-like JPEGs.")


def make_image(rng: np.random.Generator, min_size: int, max_size: int, gray: bool) -> np.ndarray:
    """A ``[h, w, 1 or 3]`` uint8 picture: a bilinearly upsampled coarse colour field, stripes and noise."""
    import tensorflow as tf  # deferred on purpose: only when images are generated

    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    c = 1 if gray else 3
    coarse = rng.uniform(0, 255, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), c)).astype(np.float32)
    img = tf.image.resize(coarse, (h, w), method="bilinear").numpy()
    k = 2 * np.pi / rng.uniform(4, 24)
    angle = rng.uniform(0, np.pi)
    ay, ax = k * np.sin(angle) * np.arange(h, dtype=np.float32), k * np.cos(angle) * np.arange(w, dtype=np.float32)
    stripes = np.outer(np.sin(ay), np.cos(ax)) + np.outer(np.cos(ay), np.sin(ax))  # sin(ay + ax)
    img += 25 * stripes[..., None] + 8 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


class SyntheticJpeg(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Synthetic ImageNet-like JPEGs (see the module docstring); kwargs from ``config.data.builder_kwargs``."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, idx_dir: str | None = None, **kwargs):
        del idx_dir  # no source files: everything is generated
        gen_fields = {f.name for f in dataclasses.fields(SyntheticJpegConfig)} - {
            f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        gen = {k: kwargs.pop(k) for k in list(kwargs) if k in gen_fields}
        if kwargs.get("config") is None:
            kwargs["config"] = make_config(**gen)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
                "id": tfds.features.Scalar(np.int64)}),
            supervised_keys=("image", "label"))

    def download_and_prepare(self, *, download_config=None, **kwargs):
        download_config = download_config or tfds.download.DownloadConfig(num_shards=self.builder_config.num_shards)
        return super().download_and_prepare(download_config=download_config, **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {"train": self._generate_examples(c.num_train, 0), "validation": self._generate_examples(c.num_eval, 1)}

    def _generate_examples(self, n: int, salt: int):
        import tensorflow as tf  # deferred on purpose: only when images are generated

        c = self.builder_config
        rng = np.random.default_rng([c.seed, salt])
        for i in range(n):
            gray = c.gray_every > 0 and i % c.gray_every == c.gray_every - 1
            img = make_image(rng, c.min_size, c.max_size, gray)
            data = tf.io.encode_jpeg(img, quality=c.quality).numpy()  # grayscale stays a 1-channel JPEG
            yield i, {"image": data, "label": int(rng.integers(c.num_classes)), "id": i}
