"""tfds builders for data that must work offline.

``LOCAL_BUILDERS`` maps a ``config.data.name`` to ``(module, class)``; the pipeline builds
the class with ``idx_dir``, ``data_dir`` and ``**config.data.builder_kwargs`` and prepares
it (once per data_dir). Builders whose output depends on generation parameters must put
those parameters in their BuilderConfig name, so another setting never reuses stale data.
"""

import importlib

LOCAL_BUILDERS: dict[str, tuple[str, str]] = {
    "fashion_mnist_idx": ("seqvis.data.builders.idx", "FashionMnistIdx"),
    "mnist_idx": ("seqvis.data.builders.idx", "MnistIdx"),
    "fashion_scenes": ("seqvis.data.builders.fashion_scenes", "FashionScenes"),
    "moving_fashion": ("seqvis.data.builders.moving_fashion", "MovingFashion"),
    "synthetic_jpeg": ("seqvis.data.builders.synthetic_jpeg", "SyntheticJpeg"),
}


def local_builder_class(name: str):
    """The builder class of ``name``; its module (which imports tfds) is loaded only now."""
    module, cls = LOCAL_BUILDERS[name]
    return getattr(importlib.import_module(module), cls)
