#!/usr/bin/env bash
# Sets up a machine, with or without a GPU: PyTorch (only if it is missing), then this package
# with what its trainer and tests need (the lists are in pyproject.toml), then one line that
# says whether the CUDA kernels were built, and if not, why and what a CUDA call will do.
#   ./install.sh
# FLASH_ATTENTION_TORCH names the PyTorch to install when none is there (default: torch), and may
# carry pip options, e.g. FLASH_ATTENTION_TORCH="torch --index-url URL" for PyTorch's CPU build.
# PYTHON names the interpreter (default: python3), e.g. that of a virtual environment.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    read -ra torch_spec <<< "${FLASH_ATTENTION_TORCH:-torch}"
    echo "install.sh: PyTorch is missing; installing ${torch_spec[*]}"
    "$PYTHON" -m pip install "${torch_spec[@]}"
fi
# --no-build-isolation builds against the PyTorch installed above, not a fresh download of it,
# so the build tools must be here first. Where the kernels cannot be built, setup.py installs
# the Python module alone.
"$PYTHON" -m pip install setuptools wheel
"$PYTHON" -m pip install --no-build-isolation -e ".[train,test]"
"$PYTHON" -c "import flash_attention as fa, torch
print(f'install.sh: flash_attention ready with torch {torch.__version__}; {fa.cuda_kernels_status()}')"
