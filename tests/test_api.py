"""The public API on CPU: shapes, dtypes, settings, every bad input, torch.compile and opcheck."""

import math

import pytest
import torch

from conftest import attention_float64, max_err, random_qkv
from flash_attention import FlashAttention, flash_attention


def test_three_dim_input_is_one_head():
    q, k, v = random_qkv(3, 1, 20, 31, seed=1)
    out3 = flash_attention(q[:, 0], k[:, 0], v[:, 0], causal=True)
    out4 = flash_attention(q, k, v, causal=True)
    assert out3.shape == (3, 20, 64)
    assert torch.equal(out3, out4[:, 0])


def test_output_has_q_shape_and_dtype():
    q, k, v = random_qkv(2, 5, 9, 40)
    out = flash_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = random_qkv(1, 2, 17, 17, seed=2)
    assert torch.equal(flash_attention(q, k, v), flash_attention(q, k, v, softmax_scale=1 / math.sqrt(64)))


def test_non_contiguous_inputs_and_expanded_grad():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 3, 3 * 64, generator=g)  # (B, N, H, 3 * d), as a fused projection gives
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in x.split(64, dim=-1))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    out.sum().backward()  # hands the backward an expanded, stride-0 gradient
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_float64(q64, k64, v64, causal=True)
    ref.sum().backward()
    assert max_err(out, ref) <= 1e-5
    assert max(max_err(q.grad, q64.grad), max_err(k.grad, k64.grad), max_err(v.grad, v64.grad)) <= 5e-5


@pytest.mark.parametrize("shape_q,shape_kv", [((0, 2, 5, 64), (0, 2, 7, 64)), ((2, 0, 5, 64), (2, 0, 7, 64)),
                                              ((2, 2, 0, 64), (2, 2, 7, 64)), ((2, 2, 0, 64), (2, 2, 0, 64)),
                                              ((0, 4, 64), (0, 3, 64))])
def test_empty_inputs_give_empty_results(shape_q, shape_kv):
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_kv, requires_grad=True)
    v = torch.randn(shape_kv, requires_grad=True)
    out = flash_attention(q, k, v)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("kernel", [None, "fast", "tutorial", "hopper"])
def test_every_documented_kernel_name_is_accepted(kernel):
    q, k, v = random_qkv(1, 2, 20, 20, seed=5)
    assert torch.equal(flash_attention(q, k, v, kernel=kernel), FlashAttention(kernel=kernel)(q, k, v))


def test_module_has_no_parameters_and_matches_function():
    attn = FlashAttention(head_dim=64, causal=True, softmax_scale=0.2, deterministic=True)
    assert list(attn.parameters()) == []
    q, k, v = random_qkv(2, 2, 18, 18, seed=4)
    assert torch.equal(attn(q, k, v), flash_attention(q, k, v, causal=True, softmax_scale=0.2))
    assert "causal=True" in repr(attn)


# ---------------------------------------------------------------------------- the ops

def test_the_ops_are_not_differentiable_flash_attention_is():
    q, k, v = random_qkv(1, 2, 9, 12, seed=11, requires_grad=True)
    out, L = torch.ops.flash_attention.forward(q, k, v, False, 0.125, "tutorial")
    assert not out.requires_grad and not L.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()
    assert flash_attention(q, k, v).requires_grad
