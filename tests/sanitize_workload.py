"""A small workload for compute-sanitizer: every kernel, both backward modes, partial tiles,
causal and not, Nq != Nk, and more key tiles than dQ partial buffers (Nk = 1100: the fast
deterministic backward's blocks wait for each other; Nk = 1000, causal: one chain of 16 key
tiles into dQ itself; B = H = 4 with Nk = 4000: 1008 fast blocks, several waves on any GPU,
whose chains of 4 partial buffers cross from one wave to the next). Then the fast
deterministic backward with its blocks taking their tiles as if the GPU started them in reverse
order, so that blocks take and compute whole chains of tiles. Then strided inputs read in place
(nanoGPT's split projection, a dout broadcast over the batch) and ones that are copied (rows
not 16-byte aligned). Run by tests/sanitize.sh; checks its own results against float64."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flash_attention as fa  # noqa: E402
from conftest import HOPPER_GPU, float64_grads, max_err, random_qkv  # noqa: E402

KERNELS = [kernel for kernel in fa.KERNELS if kernel != "hopper" or HOPPER_GPU]  # "hopper": H100, H200 only
if len(KERNELS) < len(fa.KERNELS):
    print('sanitize_workload: kernel="hopper" left out: this GPU is not of compute capability 9.0')

SHAPES = [(2, 2, 1, 1), (2, 2, 17, 33), (2, 2, 40, 17), (2, 2, 70, 70), (2, 2, 130, 1000), (2, 2, 130, 1100),
          (4, 4, 70, 4000)]  # (B, H, Nq, Nk)
for kernel in KERNELS:
    for deterministic in (False, True):
        for causal in (False, True):
            for B, H, Nq, Nk in SHAPES:
                q, k, v = random_qkv(B, H, Nq, Nk, device="cuda", seed=Nq + Nk, requires_grad=True)
                dout = torch.randn(B, H, Nq, 64, device="cuda")
                out = fa.flash_attention(q, k, v, causal=causal, deterministic=deterministic, kernel=kernel)
                out.backward(dout)
                ref, dq, dk, dv = float64_grads(q, k, v, dout, causal)
                errors = [max_err(out, ref), max_err(q.grad, dq), max_err(k.grad, dk), max_err(v.grad, dv)]
                assert max(errors) <= 5e-5, (kernel, deterministic, causal, B, H, Nq, Nk, errors)
ext = fa._extension()
for causal in (False, True):
    for B, H, Nq, Nk in [(2, 2, 130, 1000), (4, 4, 70, 4000)]:
        q, k, v = random_qkv(B, H, Nq, Nk, device="cuda", seed=Nq + Nk)
        dout = torch.randn(B, H, Nq, 64, device="cuda")
        out, L = ext.forward(q, k, v, causal, 0.125, "fast")
        grads = ext.backward(dout, q, k, v, out, L, causal, 0.125, True, "fast", reversed_start=True)
        ref = float64_grads(q, k, v, dout, causal, 0.125)
        errors = [max_err(x, r) for x, r in zip((out, *grads), ref)]
        assert max(errors) <= 5e-5, ("reversed start", causal, B, H, Nq, Nk, errors)
for kernel in KERNELS:
    for deterministic in (False, True):
        B, H, N = 2, 3, 70
        qkv = torch.randn(B, N, 3 * H * 64, device="cuda", requires_grad=True)
        q, k, v = (t.view(B, N, H, 64).transpose(1, 2) for t in qkv.split(H * 64, dim=2))
        dout = torch.randn(1, H, N, 64, device="cuda").expand(B, H, N, 64)
        base = torch.randn(1 + B * H * N * 64, device="cuda")
        misaligned = base[1:].view(B, H, N, 64).requires_grad_()
        for q_in in (q, misaligned):
            out = fa.flash_attention(q_in, k, v, causal=True, deterministic=deterministic, kernel=kernel)
            grads = torch.autograd.grad(out, (q_in, k, v), dout)
            ref = float64_grads(q_in, k, v, dout, True)
            errors = [max_err(x, r) for x, r in zip((out, *grads), ref)]
            assert max(errors) <= 5e-5, ("layouts", kernel, deterministic, errors)
torch.cuda.synchronize()
print("sanitize_workload: all results correct")
