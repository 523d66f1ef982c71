#!/usr/bin/env bash
# README command 1: set up, then train the default ViT on Fashion-MNIST and print the test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m seqvis.cli.train --config=configs/vit.py --workdir="${WORKDIR:-workdirs/default}" "$@"
