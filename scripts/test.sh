#!/usr/bin/env bash
# README command 2: set up, then run the test suite (CPU, 8 fake devices), one test file per worker
# process: SEQVIS_TEST_WORKERS of them (default 2, the cores of the reference machine; 0 = in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${SEQVIS_TEST_WORKERS:-2}" --dist loadfile "$@"
