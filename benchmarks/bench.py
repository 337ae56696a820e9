"""Benchmark: this project's kernels against PyTorch's FP32 attention, on one GPU.

    python benchmarks/bench.py                 # the full grid (several minutes)
    python benchmarks/bench.py --quick         # B=2, H=8, N in {1024, 4096}: about a minute
    python benchmarks/bench.py --impl flash --impl sdpa_efficient --n 4096

For each (impl, B, H, N, causal) it measures, on the same random inputs:
- forward time (under no_grad), backward time (autograd.grad on one forward's graph,
  retained) and the time of both with autograd (fwdbwd_ms, in the JSON): CUDA events
  around each call, the calls queued back to back after a warm-up (as in training, where
  the CPU runs ahead of the GPU), median of the repeats;
- TFLOP/s: forward 4*B*H*N*N*d (half when causal), backward 2.5x the forward;
- peak memory above the inputs, forward alone and forward + backward;
- max abs error of O, dQ, dK, dV against float64 attention (where it fits in memory);
- whether the backward is bit-identical over repeats, and whether dQ of sample 0 in the
  batch equals dQ of sample 0 computed alone (batch invariance);
- the ratio of each time to SDPA's memory-efficient backend in the same run;
- with --gpu-time, the GPU's time alone for the forward and for forward + backward
  (fwd_gpu_ms, fwdbwd_gpu_ms): a CUDA graph of 10 calls, replayed, so that no CPU work sits
  between the kernels. At small shapes the times above are mostly the CPU's time to issue
  the calls (and autograd's, to run the backward); these are the kernels'.
Correctness comes first: an error over 1e-4 stops the run with an error.
It prints a markdown table and writes one JSON record per row to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flash_attention import flash_attention  # noqa: E402

D = 64
STOP_ERROR = 1e-4  # far above FP32 rounding (~1e-6): anything past it is a bug


def naive(q, k, v, causal):
    """Plain matmul-softmax-matmul: materializes the (N, N) scores."""
    S = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if causal:
        S = S.masked_fill(torch.ones(S.shape[-2:], dtype=torch.bool, device=S.device).triu(1), -math.inf)
    return torch.softmax(S, dim=-1) @ v


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def flash(**options):
    return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, **options)


IMPLS = {
    "flash": flash(deterministic=False),  # kernel=None: "hopper" on H100 and H200, else "fast"
    "flash_det": flash(deterministic=True),
    "flash_fast": flash(deterministic=False, kernel="fast"),
    "flash_tutorial": flash(deterministic=False, kernel="tutorial"),
    "flash_hopper": flash(deterministic=False, kernel="hopper"),  # H100, H200 only
    "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_math": sdpa(SDPBackend.MATH),
    "naive": naive,
}
QUADRATIC = {"sdpa_math", "naive"}  # memory grows with N^2


def cuda_time_ms(fn, min_total_ms=200.0, max_reps=30):
    """Median time of fn in ms, from CUDA events around each call.

    After a warm-up the calls are queued back to back, as in a training loop: the CPU runs
    ahead of the GPU, so the cost of issuing a call (Python, autograd, launches) shows only
    where it is longer than the GPU's work. Every implementation is timed the same way.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(3, min(max_reps, math.ceil(min_total_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def graph_time_ms(fn, calls=10, replays=10):
    """Median time of fn in ms on the GPU alone: fn called `calls` times in one CUDA graph, and
    the graph replayed `replays` times between CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graph asks
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / calls


def peak_mib(fn):
    """Peak memory allocated while fn runs, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fits(impl, B, H, N, extra_bytes):
    """Whether a run needs less memory than is free (quadratic impls hold several N x N tensors)."""
    free = torch.cuda.mem_get_info()[0]
    need = (4 * 4 * B * H * N * N if impl in QUADRATIC else 0) + extra_bytes
    return need < 0.8 * free


def measure(impl, B, H, N, causal, check_error, gpu_time):
    fn = IMPLS[impl]
    g = torch.Generator(device="cuda").manual_seed(N + B)
    q, k, v, dout = (torch.randn(B, H, N, D, device="cuda", generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            return fn(q, k, v, causal)

    def forward_backward():
        out = fn(q, k, v, causal)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    row = {"impl": impl, "B": B, "H": H, "N": N, "D": D, "causal": causal}
    results = forward_backward()
    err = None
    if check_error:
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out64 = naive(q64, k64, v64, causal)
        ref = (out64, *torch.autograd.grad(out64, (q64, k64, v64), dout.double()))
        err = {name: (x.double() - r).abs().max().item() for name, x, r in zip(("o", "dq", "dk", "dv"), results, ref)}
        del q64, k64, v64, out64, ref
        if not all(e <= STOP_ERROR for e in err.values()):
            raise SystemExit(f"bench.py: WRONG RESULT for {row}: max errors {err} exceed {STOP_ERROR}")
    again = forward_backward()
    row["bwd_bitexact"] = all(torch.equal(a, b) for a, b in zip(results[1:], again[1:]))
    del again
    alone_q, alone_k, alone_v = (t[:1].detach().clone().requires_grad_() for t in (q, k, v))
    alone_out = fn(alone_q, alone_k, alone_v, causal)
    dq_alone = torch.autograd.grad(alone_out, alone_q, dout[:1])[0]
    row["dq_batch_invariant"] = bool(torch.equal(dq_alone, results[1][:1]))
    row["fwd_batch_invariant"] = bool(torch.equal(alone_out.detach(), results[0][:1].detach()))
    del results, alone_out, dq_alone

    row["fwd_ms"] = cuda_time_ms(forward)
    row["fwdbwd_ms"] = cuda_time_ms(forward_backward)
    out = fn(q, k, v, causal)  # the backward alone, on one forward's saved graph
    row["bwd_ms"] = cuda_time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    del out
    if gpu_time:
        row["fwd_gpu_ms"] = graph_time_ms(forward)
        row["fwdbwd_gpu_ms"] = graph_time_ms(forward_backward)
    flop = 4 * B * H * N * N * D / (2 if causal else 1)
    row["fwd_tflops"] = flop / row["fwd_ms"] / 1e9
    row["bwd_tflops"] = 2.5 * flop / row["bwd_ms"] / 1e9
    row["fwd_peak_mib"] = peak_mib(forward)
    row["peak_mib"] = peak_mib(forward_backward)
    row["max_err"] = err
    return row


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows):
    gpu_time = any("fwd_gpu_ms" in r for r in rows)
    lines = [
        "| impl | B | H | N | causal | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd / sdpa_eff | bwd / sdpa_eff "
        "| peak MiB fwd / fwd+bwd | bwd bit-exact | dQ batch-invariant | max err O / dQ / dK / dV |"
        + (" GPU alone: fwd / fwd+bwd ms (/ sdpa_eff) |" if gpu_time else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu_time else ""),
    ]
    for r in rows:
        e = r["max_err"]
        errs = "-" if e is None else " / ".join(f"{e[n]:.1e}" for n in ("o", "dq", "dk", "dv"))
        gpu = (f" {fmt(r.get('fwd_gpu_ms'))} / {fmt(r.get('fwdbwd_gpu_ms'))} ({fmt(r.get('fwd_gpu_vs_sdpa'), 2)} / "
               f"{fmt(r.get('fwdbwd_gpu_vs_sdpa'), 2)}) |" if gpu_time else "")
        lines.append(
            f"| {r['impl']} | {r['B']} | {r['H']} | {r['N']} | {int(r['causal'])} | {fmt(r['fwd_ms'])} "
            f"| {fmt(r['fwd_tflops'], 1)} | {fmt(r['bwd_ms'])} | {fmt(r['bwd_tflops'], 1)} "
            f"| {fmt(r.get('fwd_vs_sdpa'), 2)} | {fmt(r.get('bwd_vs_sdpa'), 2)} "
            f"| {r['fwd_peak_mib']:.0f} / {r['peak_mib']:.0f} | {'yes' if r['bwd_bitexact'] else 'NO'} "
            f"| {'yes' if r['dq_batch_invariant'] else 'NO'} | {errs} |{gpu}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=2, H=8, N in {1024, 4096}: about a minute")
    parser.add_argument("--impl", action="append", choices=sorted(IMPLS), help="implementations (default: all)")
    parser.add_argument("--n", type=int, action="append", help="sequence lengths (default: 512 .. 16384)")
    parser.add_argument("--bh", action="append", help="B,H pairs such as 2,8 (default: 2,8 and 8,16)")
    parser.add_argument("--causal", choices=["both", "0", "1"], default="both")
    parser.add_argument("--gpu-time", action="store_true",
                        help="also time the kernels alone, in CUDA graphs (fwd_gpu_ms, fwdbwd_gpu_ms)")
    parser.add_argument("--error-max-n", type=int, default=2048, help="check errors against float64 up to this N")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/<gpu>_<date>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    hopper = torch.cuda.get_device_capability() == (9, 0)
    # By default each family once: "flash" is "hopper" on H100 and H200 (then "flash_fast" is
    # Part II), and "fast" elsewhere.
    impls = args.impl or [impl for impl in IMPLS if impl != "flash_hopper" and (impl != "flash_fast" or hopper)]
    if args.quick:
        lengths, shapes = args.n or [1024, 4096], [(2, 8)]
    else:
        lengths = args.n or [512, 1024, 2048, 4096, 8192, 16384]
        shapes = [tuple(int(x) for x in bh.split(",")) for bh in args.bh] if args.bh else [(2, 8), (8, 16)]
    causals = [False, True] if args.causal == "both" else [args.causal == "1"]
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).resolve().parent / "results" / f"{gpu.replace(' ', '_')}_{date}.json"

    configs = [(B, H, N, c) for (B, H) in shapes for N in lengths for c in causals]
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")  # rows are appended as they are measured: a run cut short keeps them
    with tqdm(total=len(configs) * len(impls), desc="bench", file=sys.stderr) as bar:
        for B, H, N, causal in configs:
            group = []
            for impl in impls:
                bar.set_postfix_str(f"{impl} B={B} H={H} N={N} causal={int(causal)}")
                check = N <= args.error_max_n and fits("naive", B, H, N, 0)
                if fits(impl, B, H, N, 16 * 4 * B * H * N * D):
                    group.append(measure(impl, B, H, N, causal, check, args.gpu_time))
                torch.cuda.empty_cache()
                bar.update()
            sdpa_row = next((r for r in group if r["impl"] == "sdpa_efficient"), None)
            for r in group:
                r.update(gpu=gpu, date=date, torch=torch.__version__)
                if sdpa_row:  # fwd_vs_sdpa, bwd_vs_sdpa and, with --gpu-time, fwd_gpu_vs_sdpa, fwdbwd_gpu_vs_sdpa
                    for key in ("fwd_ms", "bwd_ms", "fwd_gpu_ms", "fwdbwd_gpu_ms"):
                        if key in r:
                            r[key.replace("_ms", "_vs_sdpa")] = r[key] / sdpa_row[key]
            rows += group
            with out.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in group)

    print(f"\n{gpu}, PyTorch {torch.__version__}, {date}, FP32 (TF32 off), d={D}; times are medians of CUDA events.")
    print(f"Ratios: time / sdpa_efficient's time in the same run (< 1 is faster). JSON lines: {out}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
