#!/usr/bin/env bash
# README command 2: set up, then run the test suite (CPU, 8 fake devices). One process: the tests' XLA and
# tf.data work already keeps both cores of the reference machine busy (pytest-xdist with 2 workers was slower).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
