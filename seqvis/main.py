"""Train and evaluate from a config:

    python -m seqvis.main --config=configs/vit.py[:ARG] --workdir=DIR [--config.a.b=value ...]

Re-running the same command resumes from the latest checkpoint in DIR.
"""

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/vit.py:Ti/4,fashion_mnist.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if FLAGS.config is None or FLAGS.workdir is None:
        sys.exit("usage: python -m seqvis.main --config=configs/vit.py[:ARG] --workdir=DIR")

    from seqvis.train.trainer import ConfigError, train_and_evaluate
    from seqvis.train.checkpoint import CheckpointError

    try:
        results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, CheckpointError, FloatingPointError, ValueError, FileNotFoundError) as e:
        # Errors a user can cause carry a message naming the field and the fix; the
        # traceback would only bury it. SEQVIS_TRACEBACK=1 shows it anyway.
        if os.environ.get("SEQVIS_TRACEBACK"):
            raise
        sys.exit(f"error: {e}\n(set SEQVIS_TRACEBACK=1 to see the traceback)")
    if results is not None:
        print(json.dumps({k: results[k] for k in results if not isinstance(results[k], (list, dict))}, indent=2))
        if "accuracy" in results:
            print(f"test accuracy: {results['accuracy']:.4f} ({results['num_examples']} examples) "
                  f"-> {os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == "__main__":
    app.run(main)
