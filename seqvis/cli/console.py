"""The console of seqvis' commands: seqvis' own lines on stderr, library output only when asked.

``quiet_environment()`` runs first in a command, before jax or TensorFlow is imported: it sets the
libraries' public log switches (``TF_CPP_MIN_LOG_LEVEL``, ``GRPC_VERBOSITY``) unless the user set
them. ``setup(verbose)`` then configures Python logging (seqvis lines plainly, the libraries' at
ERROR), turns off tfds' progress bars and imports TensorFlow.

TensorFlow's import is the one place no switch reaches. Where oneDNN is on (TensorFlow's default
on AVX-512 CPUs, or ``TF_ENABLE_ONEDNN_OPTS=1``) each of its two shared libraries logs a oneDNN
notice while it loads, through absl, before absl's logging is initialised, so that absl first
prints "All log messages before absl::InitializeLog() ..." and ``TF_CPP_MIN_LOG_LEVEL`` does not
apply. :func:`import_tensorflow` therefore imports TensorFlow with the process's stderr (file
descriptor 2) pointed at a temporary file, and writes back every line of it that is not one of
those start-up notices. With ``verbose`` nothing is hidden.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings

# The start-up notices of TensorFlow's shared libraries: absl's pre-initialisation warning, absl-format
# log lines (severity letter, MMDD, time: "I0000 00:00:1796.. port.cc:153] oneDNN custom operations ...")
# and the continuation line of TensorFlow's CPU-feature notice.
_STARTUP_NOTICE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d\d"
                             r"|To enable the following instructions: ")

# Loggers of the libraries seqvis runs on: their INFO/WARNING lines are hidden unless verbose.
LIBRARY_LOGGERS = ("absl", "tensorflow", "jax", "jax._src", "orbax", "tensorflow_datasets", "matplotlib", "h5py")

# Library messages that only repeat, as noise, an error seqvis reports once itself: threads of the
# checkpoint writer (tensorstore) print "Event loop is closed" tracebacks when a write fails (a full disk);
# seqvis.train.checkpoint reports the failure once.
_ECHOES = ("Event loop is closed",)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """``--verbose`` on the command line or ``SEQVIS_VERBOSE=1``."""
    argv = sys.argv if argv is None else argv
    return os.environ.get("SEQVIS_VERBOSE", "") not in ("", "0") or "--verbose" in argv


def quiet_environment(verbose: bool) -> None:
    """The libraries' public log switches, read when they are imported: call this before importing them."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def import_tensorflow(verbose: bool = False):
    """``import tensorflow``, keeping its shared libraries' start-up notices off the console (module docstring)."""
    if verbose or "tensorflow" in sys.modules:
        import tensorflow

        return tensorflow
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            kept = [line for line in buf.read().decode(errors="replace").splitlines(keepends=True)
                    if not _STARTUP_NOTICE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    return tensorflow


class _Formatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


def _not_orbax(record: logging.LogRecord) -> bool:
    """orbax logs a failed asynchronous write from each of its threads; the trainer reports it once."""
    return "/orbax/" not in (record.pathname or "")


def _drop_echoes() -> None:
    previous = sys.excepthook

    def hook(etype, value, tb):
        if isinstance(value, RuntimeError) and any(e in str(value) for e in _ECHOES):
            return
        previous(etype, value, tb)

    sys.excepthook = hook
    previous_unraisable = sys.unraisablehook

    def unraisable(arg):
        if isinstance(arg.exc_value, RuntimeError) and any(e in str(arg.exc_value) for e in _ECHOES):
            return
        previous_unraisable(arg)

    sys.unraisablehook = unraisable


def setup(verbose: bool) -> None:
    """seqvis lines (INFO) on stderr, plainly; library output only when ``verbose``."""
    quiet_environment(verbose)
    seqvis_log = logging.getLogger("seqvis")
    seqvis_log.setLevel(logging.INFO)
    if not any(getattr(h, "_seqvis", False) for h in seqvis_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        handler._seqvis = True  # noqa: SLF001 - our own marker on our own handler
        seqvis_log.addHandler(handler)
    seqvis_log.propagate = False
    root = logging.getLogger()
    if verbose:
        root.setLevel(logging.INFO)
        return
    root.setLevel(logging.ERROR)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("absl").addFilter(_not_orbax)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(tensorflow|tensorflow_datasets|orbax|flax|jax|absl|keras|ml_collections)")
    _drop_echoes()
    import_tensorflow(verbose)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
