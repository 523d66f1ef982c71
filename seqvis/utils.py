"""Small helpers with no dependency beyond the standard library (no jax, flax or TensorFlow).

Here so that every layer can use them: the data layer imports no jax/flax at import time, and
``seqvis.models.common`` (which does) is the layer below data, not beside it.
"""

from __future__ import annotations

import numbers
from typing import Sequence


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """A size given as one int (square) or as ``(height, width)`` -> ``(height, width)``.

    Raises ``ValueError`` for anything else (three numbers, a string, a lone float).
    """
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return (int(v), int(v))
    try:
        out = tuple(v)
    except TypeError:
        raise ValueError(f"expected an int or a pair (height, width), got {v!r}") from None
    if len(out) != 2 or not all(_whole(a) for a in out):
        raise ValueError(f"expected an int or a pair (height, width), got {v!r}")
    return (int(out[0]), int(out[1]))


def _whole(a) -> bool:
    """An int, or a real number with no fraction (``28.0`` in a pair read from a config)."""
    if isinstance(a, bool):
        return False
    return isinstance(a, numbers.Integral) or (isinstance(a, numbers.Real) and float(a).is_integer())
