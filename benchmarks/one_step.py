"""One forward + backward, repeated, for a profiler to watch.

    ncu --kernel-name regex:fast --launch-skip 4 --launch-count 2 --set full \\
        python benchmarks/one_step.py --n 4096
    python benchmarks/one_step.py --n 1024 --table           # GPU time per kernel, CPU time per step
    python benchmarks/one_step.py --n 1024 --table --sdpa    # the same for SDPA's memory-efficient backend

The first repeats warm up (and compile the extension if needed); a profiler skips them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flash_attention import KERNELS, flash_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--h", type=int, default=8)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--kernel", choices=KERNELS, help="default: kernel=None, the GPU's fastest family")
    parser.add_argument("--sdpa", action="store_true", help="run SDPA's memory-efficient backend instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="print the GPU time of each kernel (torch.profiler)")
    args = parser.parse_args()

    torch.manual_seed(0)
    q, k, v = (torch.randn(args.b, args.h, args.n, 64, device="cuda", requires_grad=True) for _ in range(3))
    do = torch.randn(args.b, args.h, args.n, 64, device="cuda")

    def step():
        if args.sdpa:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        else:
            out = flash_attention(q, k, v, causal=args.causal, deterministic=args.deterministic, kernel=args.kernel)
        out.backward(do)

    for _ in range(args.repeats):
        step()
    torch.cuda.synchronize()
    if not args.table:
        return
    start = time.perf_counter()
    for _ in range(10):
        step()
    cpu_ms = (time.perf_counter() - start) * 100  # per step, before the synchronize: the launch cost
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"CPU time to issue one step: {cpu_ms:.3f} ms; GPU time per step by kernel (10 steps):")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=12))


if __name__ == "__main__":
    main()
