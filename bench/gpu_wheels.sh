#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (Python 3.12, no internet): megatron-core of our pin and
# pydantic (trainer configs). Fetched here into .wheels/ (git-ignored), carried with
# `run(carry=[".wheels"])` and installed there with
#   python3 -m pip install --no-deps .wheels/*.whl
# typing-extensions is left out: the image has its own and --no-deps must not replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
[ -f .wheels/.gitignore ] || echo '*' > .wheels/.gitignore
pip_download() { .venv/bin/pip download --quiet --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels "$@"; }
pip_download --no-deps "megatron-core==0.16.1"
pip_download pydantic  # with its dependencies, so pydantic-core matches pydantic's pin
rm -f .wheels/typing_extensions-*.whl
ls -1 .wheels/*.whl
