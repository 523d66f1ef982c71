#!/usr/bin/env bash
# README command 2: set up, then run the test suite (CPU, 8 fake devices) in two pytest-xdist workers, one file
# per worker at a time (module fixtures are built once). The tests are compile-bound and XLA compiles on one
# core: test_configs used 1.07 cores in one process (user 8m17 s over 7m44 s of wall time, cold cache) and ran
# in 303 s instead of 465 s with two workers. SEQVIS_TEST_WORKERS=1 runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKERS="${SEQVIS_TEST_WORKERS:-2}"
if [ "$WORKERS" -gt 1 ]; then
  exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile --max-worker-restart=0 "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
