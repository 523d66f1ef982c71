#!/usr/bin/env bash
# README command 2: set up, then run the test suite (CPU, 8 fake devices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
