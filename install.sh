#!/usr/bin/env bash
# Sets up a fresh machine: PyTorch (only if it is missing), this package and its dev tools.
#   ./install.sh
# FLASH_ATTENTION_TORCH names the PyTorch to install when none is there (default: torch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install.sh: PyTorch is missing; installing ${FLASH_ATTENTION_TORCH:-torch}"
    "$PYTHON" -m pip install "${FLASH_ATTENTION_TORCH:-torch}"
fi
"$PYTHON" -m pip install ninja pytest tqdm hypothesis setuptools wheel
# --no-build-isolation: build against the PyTorch installed above, not a fresh copy.
"$PYTHON" -m pip install --no-build-isolation -e .
"$PYTHON" - <<'PY'
import torch, flash_attention
print(f"install.sh: flash_attention ready (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
PY
