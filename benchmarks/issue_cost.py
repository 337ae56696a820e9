"""Issue cost: the CPU time to issue one attention call, where the GPU work is too small to matter.

    python benchmarks/issue_cost.py                  # flash, flash_det, sdpa on the GPU
    python benchmarks/issue_cost.py --device cpu --calls 20 --rounds 2   # smoke run

A small model is CPU-bound: its step takes as long as Python and PyTorch take to issue its
kernels, so what an attention costs there is its issue time. For each attention it issues
--calls calls on tiny inputs (B=1, H=1, N=64) back to back, with one synchronize at the end,
and reports the median over --rounds of the time per call, in microseconds:
- forward: one forward with autograd recording (inputs require grad);
- forward_backward: one forward and its backward (torch.autograd.backward on the output).
Attentions: flash (this project, default mode), flash_det (deterministic=True) and sdpa
(scaled_dot_product_attention, memory-efficient backend on the GPU). The rounds take the
attentions in turn (round r times each of them, then round r + 1), so that a host whose speed
drifts during the run (the GPU machine's does, by 10-30%) slows them alike. Prints a markdown
table and writes one JSON line per row to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flash_attention import flash_attention  # noqa: E402

IMPLS = {
    "flash": lambda q, k, v: flash_attention(q, k, v, causal=True),
    "flash_det": lambda q, k, v: flash_attention(q, k, v, causal=True, deterministic=True),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


def seconds_per_call(fn, calls: int, device: torch.device) -> float:
    """The wall time per call of `calls` calls of fn, synchronized once at the end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def measure(device: torch.device, calls: int, rounds: int) -> list[dict]:
    """One row per attention: the median over rounds of the microseconds per call of each
    workload, the attentions taking turns in every round; the first round warms up."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 64, device=device, generator=g).requires_grad_() for _ in range(3))
    workloads = {}
    for impl, attention in IMPLS.items():
        def forward(attention=attention):
            return attention(q, k, v)

        def forward_backward(attention=attention):
            out = attention(q, k, v)
            torch.autograd.backward(out, torch.ones_like(out))

        workloads[impl] = {"forward_us": forward, "forward_backward_us": forward_backward}
    times = {impl: {name: [] for name in w} for impl, w in workloads.items()}
    backend = SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        for _ in range(rounds + 1):
            for impl, w in workloads.items():
                for name, fn in w.items():
                    times[impl][name].append(seconds_per_call(fn, calls, device) * 1e6)
    return [dict(impl=impl, **{name: statistics.median(t[1:]) for name, t in ts.items()})
            for impl, ts in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--out", type=Path, help="JSON lines (default: benchmarks/results/<gpu>_<date>_issue.jsonl)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (use --device cpu)")
    if args.calls < 1 or args.rounds < 1:
        parser.error(f"--calls and --rounds must be at least 1, got {args.calls} and {args.rounds}")
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"{gpu.replace(' ', '_')}_{date}_issue.jsonl"
    rows = measure(device, args.calls, args.rounds)
    for row in rows:
        row.update(device=gpu, date=date, torch=torch.__version__, calls=args.calls, rounds=args.rounds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{gpu}, PyTorch {torch.__version__}, {date}; median of {args.rounds} rounds of {args.calls} calls, "
          f"CPU microseconds per call. JSON lines: {out}\n")
    print("| attention | forward (us) | forward + backward (us) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['forward_us']:.1f} | {r['forward_backward_us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
