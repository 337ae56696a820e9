"""What only the PyTorch reference (what CPU tensors run) has to show: a softmax scale, the saved
logsumexp, its number of dQ partial buffers. The properties it shares with the kernels (accuracy,
determinism, NaN containment, bad inputs) are in test_properties.py."""

import torch

import flash_attention as fa
from conftest import float64_grads, max_err, random_qkv
from flash_attention import flash_attention

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


def test_dq_partials_formula():
    assert [fa.dq_partials(n) for n in (1, 16, 17, 100, 256, 257, 100000)] == [1, 1, 2, 7, 16, 16, 16]
