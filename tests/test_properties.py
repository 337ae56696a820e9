"""Each property of flash_attention, tested once on every implementation: the PyTorch reference
(CPU tensors; these cases run in CI) and both CUDA kernel families (skipped, with the reason,
where there is no GPU). The CPU cases use smaller shapes: the reference is slow."""

import math

import pytest
import torch

import flash_attention as fa
from conftest import bad_inputs, flash_grads, float64_grads, max_err, random_qkv, requires_cuda


def implementations(cpu, cuda):
    """pytest params (device, kernel, *case): the reference with each case of `cpu`, and each CUDA
    kernel family with each case of `cuda`."""
    params = [pytest.param("cpu", None, *case, id="-".join(map(str, ("cpu", *case)))) for case in cpu]
    for kernel in fa.KERNELS:
        params += [pytest.param("cuda", kernel, *case, id="-".join(map(str, (kernel, *case))), marks=requires_cuda)
                   for case in cuda]
    return params


def grid(*axes):
    """Every combination of the values of the axes, as flat tuples (a tuple value adds its items)."""
    cases = [()]
    for axis in axes:
        cases = [case + (value if isinstance(value, tuple) else (value,)) for case in cases for value in axis]
    return cases


CPU_SHAPES = [(n, n) for n in (1, 15, 16, 17, 100, 257)] + [(1, 17), (17, 1), (15, 33), (100, 37), (37, 100),
                                                            (257, 130)]
CUDA_SHAPES = [(n, n) for n in (1, 15, 16, 17, 100, 257, 1024, 2048)] + [(17, 1), (1, 40), (100, 37), (37, 300),
                                                                         (1000, 2048), (2048, 999)]
MODES = [False, True]  # deterministic; the reference is deterministic in both


# ---------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("device,kernel,Nq,Nk,causal,deterministic",
                         implementations(grid(CPU_SHAPES, [False, True], [False]),
                                         grid(CUDA_SHAPES, [False, True], MODES)))
def test_matches_float64(device, kernel, Nq, Nk, causal, deterministic):
    q, k, v = random_qkv(2, 3, Nq, Nk, device=device, seed=Nq * 7919 + Nk)
    dout = torch.randn(2, 3, Nq, 64, device=device)
    out, dq, dk, dv = flash_grads(q, k, v, dout, causal=causal, deterministic=deterministic, kernel=kernel)
    ref, dq64, dk64, dv64 = float64_grads(q, k, v, dout, causal)
    assert max_err(out, ref) <= 1e-5
    assert max_err(dq, dq64) <= 5e-5
    assert max_err(dk, dk64) <= 5e-5
    assert max_err(dv, dv64) <= 5e-5


# ---------------------------------------------------------------------------- determinism contract

# CUDA, Nk = 1000 and 1500: the fast kernels, causal, use one buffer (dq itself) and 4 buffers.
@pytest.mark.parametrize("device,kernel,B,H,Nq,Nk,causal",
                         implementations(grid([(2, 2, 70, 300)], [False, True]),
                                         grid([(2, 4, 1000, 1000), (2, 4, 1000, 1500)], [False, True])))
def test_deterministic_repeats_are_bit_identical(device, kernel, B, H, Nq, Nk, causal):
    q, k, v = random_qkv(B, H, Nq, Nk, device=device, seed=8)
    dout = torch.randn(B, H, Nq, 64, device=device)
    first = flash_grads(q, k, v, dout, causal=causal, deterministic=True, kernel=kernel)
    for _ in range(3 if device == "cpu" else 20):
        again = flash_grads(q, k, v, dout, causal=causal, deterministic=True, kernel=kernel)
        for name, a, b in zip(("O", "dQ", "dK", "dV"), first, again):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("device,kernel,Nq,Nk,causal",
                         implementations(grid([(50, 290)], [False, True]),
                                         grid([(777, 999), (777, 1111)], [False, True])))
def test_deterministic_batch_and_head_invariant(device, kernel, Nq, Nk, causal):
    q, k, v = random_qkv(4, 3, Nq, Nk, device=device, seed=9)
    dout = torch.randn(4, 3, Nq, 64, device=device)
    batched = flash_grads(q, k, v, dout, causal=causal, deterministic=True, kernel=kernel)
    for b in range(4):
        alone = flash_grads(q[b : b + 1], k[b : b + 1], v[b : b + 1], dout[b : b + 1], causal=causal, deterministic=True,
                            kernel=kernel)
        for name, x, y in zip(("O", "dQ", "dK", "dV"), batched, alone):
            assert torch.equal(x[b : b + 1], y), f"{name} of sample {b}"
    one_head = flash_grads(q[:, 1:2], k[:, 1:2], v[:, 1:2], dout[:, 1:2], causal=causal, deterministic=True,
                           kernel=kernel)
    for name, x, y in zip(("O", "dQ", "dK", "dV"), batched, one_head):
        assert torch.equal(x[:, 1:2], y), f"{name} of head 1"


# ---------------------------------------------------------------------------- NaN containment

# N = 45: key N - 1 in the first tile of 64; N = 130: in the third.
@pytest.mark.parametrize("device,kernel,N,where,deterministic",
                         implementations(grid([40], ["k", "v"], [False]), grid([45, 130], ["k", "v"], MODES)))
def test_nan_in_a_hidden_key_reaches_only_the_queries_that_see_it(device, kernel, N, where, deterministic):
    q, k, v = random_qkv(1, 2, N, N, device=device, seed=2)
    dout = torch.randn(1, 2, N, 64, device=device)
    ref, dq64, _, _ = float64_grads(q, k, v, dout, causal=True)
    (k if where == "k" else v)[0, 1, N - 1, 7] = math.nan  # causal: only query N-1 sees key N-1
    out, dq, dk, dv = flash_grads(q, k, v, dout, causal=True, deterministic=deterministic, kernel=kernel)
    if where == "k":  # a NaN score: the whole row of the output is NaN
        assert out[0, 1, N - 1].isnan().all()
    else:  # a NaN value: only its column
        assert out[0, 1, N - 1].isnan().nonzero().flatten().tolist() == [7]
    assert max_err(out[:, :, : N - 1], ref[:, :, : N - 1]) <= 1e-5
    assert max_err(dq[:, :, : N - 1], dq64[:, :, : N - 1]) <= 5e-5
    assert max_err(out[0, 0], ref[0, 0]) <= 1e-5 and not dk[0, 0].isnan().any()


# ---------------------------------------------------------------------------- bad input

BAD = [case[0] for case in bad_inputs("cpu")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("case", range(len(BAD)), ids=BAD)
def test_bad_input_raises_a_clear_error(case, device):
    what, call, exc, words = bad_inputs(device)[case]
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    # the next call works (on CUDA: the context is still usable)
    q, k, v = random_qkv(1, 2, 33, 47, device=device, seed=case)
    dout = torch.randn(1, 2, 33, 64, device=device)
    out, dq, dk, dv = flash_grads(q, k, v, dout, causal=True)
    ref, dq64, dk64, dv64 = float64_grads(q, k, v, dout, causal=True)
    assert max_err(out, ref) <= 1e-5 and max(max_err(dq, dq64), max_err(dk, dk64), max_err(dv, dv64)) <= 5e-5
