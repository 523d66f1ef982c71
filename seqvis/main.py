"""Train and evaluate from a config:

    python -m seqvis.main --config=configs/vit.py[:ARG] --workdir=DIR [--config.a.b=value ...] [--verbose]

Re-running the same command resumes from the latest checkpoint in DIR.

The console shows what seqvis does (preparing a data set once, compiling, progress with
ETA, the result and where it was written). Library output (TensorFlow, tfds progress bars,
absl INFO lines, deprecation warnings) is hidden unless ``--verbose`` or
``SEQVIS_VERBOSE=1``. Errors a user can cause end in one message; ``SEQVIS_TRACEBACK=1``
shows the traceback too.
"""

import json
import logging
import os
import sys
import warnings

VERBOSE = os.environ.get("SEQVIS_VERBOSE", "") not in ("", "0") or "--verbose" in sys.argv
if not VERBOSE:  # before TensorFlow is imported anywhere
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/vit.py:Ti/4,fashion_mnist.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("verbose", False, "Show library output (TensorFlow, tfds, absl, orbax) too; "
                  "also SEQVIS_VERBOSE=1.")

# Library messages that only repeat, as noise, an error seqvis reports once itself.
_ECHOES = ("Event loop is closed",)


class _SeqvisFormatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def _drop_orbax(record: logging.LogRecord) -> bool:
    """orbax logs a failed asynchronous write from each of its threads; the trainer reports it once."""
    return "/orbax/" not in (record.pathname or "")


def setup_console(verbose: bool) -> None:
    """seqvis lines (INFO) on stderr, plainly; library output only when ``verbose``."""
    root = logging.getLogger()
    seqvis_log = logging.getLogger("seqvis")
    seqvis_log.setLevel(logging.INFO)
    if not any(getattr(h, "_seqvis", False) for h in seqvis_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_SeqvisFormatter())
        handler._seqvis = True  # noqa: SLF001
        seqvis_log.addHandler(handler)
    seqvis_log.propagate = False
    if verbose:
        root.setLevel(logging.INFO)
        return
    root.setLevel(logging.ERROR)
    for name in ("absl", "tensorflow", "jax", "jax._src", "orbax", "tensorflow_datasets", "matplotlib", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("absl").addFilter(_drop_orbax)
    try:
        absl_logging.set_verbosity(absl_logging.ERROR)
    except Exception:  # noqa: BLE001
        pass
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(tensorflow|tensorflow_datasets|orbax|flax|jax|absl|keras|ml_collections)")

    # Threads of the checkpoint writer (tensorstore) print "Event loop is closed" tracebacks
    # (as unraisable exceptions) when a write fails (e.g. a full disk): the failure itself is
    # reported once by seqvis.train.checkpoint.
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
    _quiet_tfds()


def _quiet_tfds() -> None:
    """tfds prints its own 'Downloading and preparing dataset Unknown size' and progress bars;
    say instead, once, that the data set is being prepared and where."""
    try:
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import dataset_builder

        tfds.disable_progress_bar()
        log = logging.getLogger("seqvis.data")

        def preparing(self):
            log.info("Preparing data set %s in %s (once; later runs reuse it)...", self.name, self.data_dir)

        def prepared(self):
            log.info("Data set %s ready.", self.name)

        dataset_builder.DatasetBuilder._log_download_bytes = preparing  # noqa: SLF001
        dataset_builder.DatasetBuilder._log_download_done = prepared  # noqa: SLF001
    except Exception:  # noqa: BLE001 - tfds internals moved: its own lines stay, nothing breaks
        pass


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr)
    print("(set SEQVIS_TRACEBACK=1 to see the traceback)", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)


def main(argv):
    del argv
    verbose = VERBOSE or FLAGS.verbose
    setup_console(verbose)
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("usage: python -m seqvis.main --config=configs/vit.py[:ARG] --workdir=DIR")

    # Deferred on purpose: jax, orbax and TensorFlow load only after the console is quieted.
    from seqvis.errors import CheckpointError
    from seqvis.train.trainer import TrainingInterrupted, train_and_evaluate

    traceback = os.environ.get("SEQVIS_TRACEBACK", "") not in ("", "0")
    # The exit happens after the except blocks: while an exception is alive its traceback keeps the
    # training frames (and the input pipeline's threads) alive, and tearing those down during
    # interpreter shutdown can hang; once the exception is gone they are closed normally.
    failure, results = None, None
    try:
        results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt as e:
        if traceback:
            raise
        failure = (e.message if isinstance(e, TrainingInterrupted) else
                   "interrupted; re-run the same command to resume.", 130, False)
    except (CheckpointError, FloatingPointError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError) as e:
        # Errors a user can cause carry a message naming the field/file and the fix; the
        # traceback would only bury it. SEQVIS_TRACEBACK=1 shows it anyway.
        if traceback:
            raise
        failure = (str(e), 1, True)
    except OSError as e:
        if traceback or e.errno not in (28, 122):  # ENOSPC, EDQUOT
            raise
        failure = (f"{e.strerror}: {e.filename or ''}. Free some disk space, then re-run the same command to "
                   "resume.", 1, True)
    if failure is not None:
        message, code, as_error = failure
        if as_error:
            _fail(message, code)
        print(message, file=sys.stderr)
        sys.exit(code)
    if results is not None:
        print(json.dumps({k: results[k] for k in results if not isinstance(results[k], (list, dict))}, indent=2))
        if "accuracy" in results:
            print(f"test accuracy: {results['accuracy']:.4f} ({results['num_examples']} examples) "
                  f"-> {os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == "__main__":
    app.run(main)
