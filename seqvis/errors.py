"""The errors a user can cause, in one place.

Each is raised with one message that names the field, file or flag at fault and the fix.
Each keeps a built-in base (``ValueError`` / ``RuntimeError``), so code that catches those
still does. Import them from here.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used; the message says what to do."""


class DataError(ValueError):
    """A dataset that cannot be loaded or read as configured; the message names the dataset/field and the fix."""


class IdxError(ValueError):
    """An IDX (MNIST-format) file that is truncated, corrupt or empty; the message names the file."""


class MovingClipsError(ValueError):
    """A moving-clips generation parameter that cannot work; the message names the field and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be restored or written; the message names it and the fix."""
