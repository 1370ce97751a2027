#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of PyTorch and dpmsolve with its test extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# k-diffusion is a peer in the lab and the tests; its own dependencies (torchvision, ...) are not needed there.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "k-diffusion==0.1.1.post1"
