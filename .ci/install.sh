#!/usr/bin/env bash
# Installs NeuroX and its dependencies into the active Python environment (CPU machine).
# Usage: bash .ci/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade "pip>=24" wheel setuptools
"${PIP[@]}" -c constraints.txt torch==2.13.0
"${PIP[@]}" -r requirements.txt -c constraints.txt
# setup.py of deepspeed imports torch; build against the torch we just installed. DS_BUILD_OPS=0: no JIT ops at build.
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation -c constraints.txt "deepspeed==0.19.8"
# mup declares torchvision (-> CUDA torch); it needs only pyyaml/pandas/seaborn at run time, installed above.
"${PIP[@]}" --no-deps "mup==1.0.0"
if [[ "${1:-}" == "--dev" ]]; then
  "${PIP[@]}" -r requirements-dev.txt -c constraints.txt
fi
"${PIP[@]}" --no-deps --no-build-isolation -e .
