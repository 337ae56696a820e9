"""The PyTorch reference (what CPU tensors run) against float64 attention, and its determinism."""

import pytest
import torch

import flash_attention as fa
from conftest import flash_grads, float64_grads, max_err, random_qkv
from flash_attention import flash_attention

LENGTHS = [1, 15, 16, 17, 100, 257]
SHAPES = [(n, n) for n in LENGTHS] + [(1, 17), (17, 1), (15, 33), (100, 37), (37, 100), (257, 130)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", SHAPES)
def test_matches_float64(Nq, Nk, causal):
    q, k, v = random_qkv(2, 3, Nq, Nk, seed=Nq * 1000 + Nk, requires_grad=True)
    dout = torch.randn(2, 3, Nq, 64, generator=torch.Generator().manual_seed(7))
    out = flash_attention(q, k, v, causal=causal)
    out.backward(dout)
    ref, dq, dk, dv = float64_grads(q, k, v, dout, causal)
    assert max_err(out, ref) <= 1e-5
    assert max_err(q.grad, dq) <= 5e-5
    assert max_err(k.grad, dk) <= 5e-5
    assert max_err(v.grad, dv) <= 5e-5


def test_softmax_scale():
    q, k, v = random_qkv(1, 2, 40, 23, seed=3, requires_grad=True)
    dout = torch.randn(1, 2, 40, 64)
    out = flash_attention(q, k, v, causal=True, softmax_scale=0.3)
    out.backward(dout)
    ref, dq, dk, dv = float64_grads(q, k, v, dout, causal=True, softmax_scale=0.3)
    assert max_err(out, ref) <= 1e-5
    assert max(max_err(q.grad, dq), max_err(k.grad, dk), max_err(v.grad, dv)) <= 5e-5


def test_logsumexp_is_saved():
    q, k, v = random_qkv(2, 2, 33, 50, seed=4)
    _, L = torch.ops.flash_attention.forward(q, k, v, False, 0.125, "tutorial")
    ref = torch.logsumexp(0.125 * q.double() @ k.double().transpose(-1, -2), dim=-1)
    assert L.shape == (2, 2, 33)
    assert max_err(L, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_repeats_are_bit_identical(causal):
    q, k, v = random_qkv(2, 2, 70, 300, seed=5)
    dout = torch.randn(2, 2, 70, 64)
    first = flash_grads(q, k, v, dout, causal=causal, deterministic=True)
    for _ in range(3):
        again = flash_grads(q, k, v, dout, causal=causal, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("causal", [False, True])
def test_batch_invariant(causal):
    q, k, v = random_qkv(4, 2, 50, 290, seed=6)
    dout = torch.randn(4, 2, 50, 64)
    batched = flash_grads(q, k, v, dout, causal=causal, deterministic=True)
    for b in range(4):
        alone = flash_grads(q[b : b + 1], k[b : b + 1], v[b : b + 1], dout[b : b + 1], causal=causal, deterministic=True)
        assert all(torch.equal(x[b : b + 1], y) for x, y in zip(batched, alone))


def test_dq_partials_formula():
    assert [fa.dq_partials(n) for n in (1, 16, 17, 100, 256, 257, 100000)] == [1, 1, 2, 7, 16, 16, 16]
    assert [fa.dq_partials(n, "fast") for n in (1, 64, 65, 192, 193, 256, 257, 100000)] == [1, 1, 2, 3, 4, 4, 4, 4]
    assert [fa.dq_partials(n, "fast", causal=True) for n in (1, 65, 1024, 1025, 100000)] == [1, 1, 1, 4, 4]
    assert [fa.dq_partials(n, "tutorial", causal=True) for n in (1, 17, 100000)] == [1, 2, 16]


def test_nan_in_a_hidden_key_stays_hidden():
    N = 40
    q, k, v = random_qkv(1, 2, N, N, seed=8)
    dout = torch.randn(1, 2, N, 64)
    clean = flash_grads(q, k, v, dout, causal=True)
    k[0, 1, N - 1, 3] = float("nan")  # causal: only query N-1 sees key N-1
    v[0, 1, N - 1, 5] = float("nan")
    dirty = flash_grads(q, k, v, dout, causal=True)
    assert dirty[0][0, 1, N - 1].isnan().all()
    for x, y in zip(dirty[:2], clean[:2]):  # O and dQ of every other query are untouched
        assert torch.equal(x[:, :, : N - 1], y[:, :, : N - 1])
