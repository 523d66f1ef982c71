"""Train and evaluate from a config:

    python -m seqvis.cli.train --config=configs/vit.py[:ARG] --workdir=DIR [--config.a.b=value ...] [--verbose]

Re-running the same command resumes from the latest checkpoint in DIR.

The console shows what seqvis does (preparing a data set once, compiling, progress with
ETA, the result and where it was written). Library output (TensorFlow, tfds progress bars,
absl INFO lines, deprecation warnings) is hidden unless ``--verbose`` or
``SEQVIS_VERBOSE=1``. Errors a user can cause end in one message; ``SEQVIS_TRACEBACK=1``
shows the traceback too.
"""

import json
import os
import signal
import sys

from seqvis.cli import config_cli, console

VERBOSE = console.verbose_requested()
console.quiet_environment(VERBOSE)  # before TensorFlow or jax is imported anywhere

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/vit.py:Ti/4,fashion_mnist.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("verbose", False, "Show library output (TensorFlow, tfds, absl, orbax) too; "
                  "also SEQVIS_VERBOSE=1.")


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr)
    print("(set SEQVIS_TRACEBACK=1 to see the traceback)", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)


def main(argv):
    del argv
    verbose = VERBOSE or FLAGS.verbose
    console.setup(verbose)
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("usage: python -m seqvis.cli.train --config=configs/vit.py[:ARG] --workdir=DIR")

    # Deferred on purpose: jax, orbax and TensorFlow load only after the console is quieted.
    from seqvis.errors import CheckpointError
    from seqvis.trainer import TrainingInterrupted, TrainingPreempted, train_and_evaluate

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
    except TrainingPreempted as e:
        if traceback:
            raise
        failure = (str(e), 128 + signal.SIGTERM, False)
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


def parse_flags(argv):
    """absl's parsing, with one line instead of a traceback for a command line that cannot work."""
    spec = config_cli.config_spec(argv)
    if spec and not os.path.isfile(spec.partition(":")[0]):
        _usage_error(f"--config={spec}: there is no file {spec.partition(':')[0]!r}; e.g. --config=configs/vit.py.")
    try:
        return FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
        if os.environ.get("SEQVIS_TRACEBACK", "") not in ("", "0"):
            raise
        cause = e.__cause__ or e.__context__ if isinstance(e, flags.Error) else e
        _usage_error(config_cli.explain_flag_error(argv, cause) if cause is not None else str(e))


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
