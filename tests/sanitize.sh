#!/usr/bin/env bash
# Runs the kernels under compute-sanitizer's four tools (memcheck, racecheck, synccheck,
# initcheck) on tests/sanitize_workload.py. Needs a GPU and compute-sanitizer.
#   tests/sanitize.sh
# Exits non-zero if any tool reports an error. PyTorch's caching allocator is turned off so
# that memcheck sees every out-of-bounds access, not only those past a cached block.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in memcheck racecheck synccheck initcheck; do
    # memcheck, racecheck and synccheck look at this project's kernels only (their names all
    # hold "flash"). initcheck watches every kernel: it must see the writes of the kernels
    # that made the inputs (torch.randn's), or it reports their reads as uninitialized.
    filter=(--kernel-name kns=flash)
    [ "$tool" = initcheck ] && filter=()
    echo "=== compute-sanitizer --tool $tool ${filter[*]}"
    # The last 3 lines of its report; on a failure the last 40, which hold the workload's own error.
    log=$(mktemp)
    if compute-sanitizer --tool "$tool" --error-exitcode 1 "${filter[@]}" \
            "$PYTHON" tests/sanitize_workload.py > "$log" 2>&1; then
        tail -n 3 "$log"
    else
        tail -n 40 "$log"
        echo "=== $tool: FAILED"
        status=1
    fi
    rm -f "$log"
done
[ "$status" -eq 0 ] && echo "=== sanitize.sh: all four tools report no errors"
exit "$status"
