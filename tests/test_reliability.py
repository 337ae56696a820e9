"""Hostile values, large shapes, streams and CUDA graphs (all need a GPU). NaN in hidden keys and bad
input: test_properties.py."""

import math

import pytest
import torch

import flash_attention as fa
from conftest import attention_float64, cuda_kernels, flash_grads, float64_grads, max_err, random_qkv, requires_cuda
from flash_attention import flash_attention

pytestmark = requires_cuda


# ---------------------------------------------------------------------------- hostile values

@pytest.mark.parametrize("kernel", cuda_kernels())
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_bad_value_in_one_query_row_stays_in_that_row(value, deterministic, kernel):
    q, k, v = random_qkv(2, 2, 50, 70, device="cuda", seed=1)
    dout = torch.randn(2, 2, 50, 64, device="cuda")
    q[1, 0, 33, 5] = value
    out, dq, dk, dv = flash_grads(q, k, v, dout, deterministic=deterministic, kernel=kernel)
    assert out[1, 0, 33].isnan().all() and dq[1, 0, 33].isnan().all()
    assert dk[1, 0].isnan().all() and dv[1, 0].isnan().all()  # every key meets the bad row
    clean = torch.ones(2, 2, 50, dtype=torch.bool, device="cuda")
    clean[1, 0, 33] = False
    ref, dq64, dk64, dv64 = float64_grads(q.nan_to_num(0.0, 0.0, 0.0), k, v, dout)
    assert max_err(out[clean], ref[clean]) <= 1e-5 and max_err(dq[clean], dq64[clean]) <= 5e-5
    assert max_err(dk[0], dk64[0]) <= 5e-5 and max_err(dv[:, 1], dv64[:, 1]) <= 5e-5


def test_huge_logits_stay_finite_and_match_float64():
    q, k, v = random_qkv(2, 2, 300, 300, device="cuda", seed=3)
    q = q * 1e4
    dout = torch.randn_like(q)
    for causal in (False, True):
        out, dq, dk, dv = flash_grads(q, k, v, dout, causal=causal)
        ref, dq64, dk64, dv64 = float64_grads(q, k, v, dout, causal)
        assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
        # FP32 rounds a score s by up to |s| * 2^-24 per operation; with |s| ~ 1e4 the
        # probabilities of near-tied keys are only that exact, so the bound scales with max |s|.
        s_max = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() / 8
        bound = 64 * s_max * 2**-24 * v.abs().max().item()
        assert max_err(out, ref) <= bound
        assert max_err(dv, dv64) <= bound * dout.abs().max().item() * 300


def test_all_equal_scores_give_the_exact_uniform_average():
    B, H, N = 2, 3, 257
    q = torch.zeros(B, H, N, 64, device="cuda")
    k, v = random_qkv(B, H, N, N, device="cuda", seed=4)[1:]
    for causal in (False, True):
        out = flash_attention(q, k, v, causal=causal)
        counts = torch.arange(1, N + 1, device="cuda", dtype=torch.float64)[:, None]
        mean = v.double().cumsum(-2) / counts if causal else v.double().mean(-2, keepdim=True).expand(-1, -1, N, -1)
        assert max_err(out, mean) <= 1e-6


# ---------------------------------------------------------------------------- large shapes

@pytest.mark.parametrize("deterministic", [False, True])
def test_more_than_2_31_elements_use_64_bit_offsets(deterministic):
    N = 2**25 + 3000  # q, out, dout and dq hold N * 64 > 2^31 elements each (8 GiB each)
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 1, N, 64, device="cuda", generator=g, requires_grad=True)
    # 200 keys: 4 key tiles of the fast kernels, so the deterministic mode chains P = 4 partial
    # buffers (3 more of dQ's size, past 2^31 elements too) and sums them.
    Nk = 200
    assert fa._extension().dq_partials(Nk, "fast", False) == 4
    k, v = (torch.randn(1, 1, Nk, 64, device="cuda", generator=g, requires_grad=True) for _ in range(2))
    out = flash_attention(q, k, v, deterministic=deterministic)
    tail = slice(N - 2000, N)
    assert tail.start * 64 > 2**31  # the tail rows lie past element 2^31
    assert max_err(out[:, :, tail], attention_float64(q[:, :, tail], k, v)) <= 1e-5
    dout = torch.zeros_like(out)
    dout[:, :, tail] = torch.randn(1, 1, 2000, 64, device="cuda", generator=g)
    out.backward(dout)
    # Only the tail has a non-zero output gradient: it alone decides dk, dv and its own dq.
    _, dq64, dk64, dv64 = float64_grads(q[:, :, tail], k, v, dout[:, :, tail])
    assert max_err(q.grad[:, :, tail], dq64) <= 5e-5
    assert max_err(k.grad, dk64) <= 5e-5 and max_err(v.grad, dv64) <= 5e-5
    assert torch.count_nonzero(q.grad[:, :, : tail.start]) == 0


def test_n_65536_runs_in_linear_memory():
    H, N = 2, 65536
    q, k, v = random_qkv(1, H, N, N, device="cuda", seed=7, requires_grad=True)
    dout = torch.randn(1, H, N, 64, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = flash_attention(q, k, v, causal=True)
    out.backward(dout)
    torch.cuda.synchronize()
    tensor = H * N * 64 * 4
    assert (torch.cuda.max_memory_allocated() - base) <= 6 * tensor  # the scores alone: 32 GiB
    ref = attention_float64(q[:, :, -1:].detach(), k.detach(), v.detach())
    assert max_err(out[:, :, -1:], ref) <= 1e-5  # causal: the last query sees every key
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------------------- streams and graphs

def test_side_stream_with_inputs_from_another_stream():
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(producer):
        q, k, v = random_qkv(2, 4, 600, 500, device="cuda", seed=8)
        dout = torch.randn(2, 4, 600, 64, device="cuda")
    consumer.wait_stream(producer)
    with torch.cuda.stream(consumer):
        for t in (q, k, v, dout):
            t.record_stream(consumer)
        out, dq, dk, dv = flash_grads(q, k, v, dout, causal=True)
    torch.cuda.current_stream().wait_stream(consumer)
    ref, dq64, dk64, dv64 = float64_grads(q, k, v, dout, causal=True)
    assert max_err(out, ref) <= 1e-5
    assert max(max_err(dq, dq64), max_err(dk, dk64), max_err(dv, dv64)) <= 5e-5


@pytest.mark.parametrize("deterministic", [False, True])
def test_training_step_in_a_cuda_graph(deterministic):
    torch.manual_seed(9)
    proj = torch.nn.Linear(64, 3 * 64, device="cuda")
    x = torch.randn(2, 4, 300, 64, device="cuda")

    def step():
        q, k, v = proj(x).split(64, dim=-1)
        loss = flash_attention(q, k, v, causal=True, deterministic=deterministic).square().mean()
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graph asks
        for _ in range(2):
            proj.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(side)
    proj.zero_grad(set_to_none=False)
    eager_loss = step().detach().clone()
    eager_grad = proj.weight.grad.clone()

    graph = torch.cuda.CUDAGraph()
    proj.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        graph_loss = step()
    for _ in range(3):
        proj.weight.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(graph_loss, eager_loss, rtol=1e-6)
        assert torch.allclose(proj.weight.grad, eager_grad, rtol=1e-5, atol=1e-7)
        if deterministic:
            assert torch.equal(graph_loss, eager_loss) and torch.equal(proj.weight.grad, eager_grad)
