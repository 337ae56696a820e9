#!/usr/bin/env bash
# Runs every test: the CPU tests always; the GPU tests where a CUDA GPU is present
# (elsewhere pytest reports them as skipped, with the reason).
#   ./test_installation.sh [extra pytest arguments]
# Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "test_installation.sh: GPU found; building the CUDA extension if needed"
    "$PYTHON" -c "import flash_attention as fa; fa._extension(); print('test_installation.sh: CUDA extension ready')"
else
    echo "test_installation.sh: no GPU; the GPU tests will be skipped"
fi
exec "$PYTHON" -m pytest tests -ra "$@"
