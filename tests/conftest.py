"""Shared helpers: float64 attention (the ground truth), random inputs, the GPU skip mark, a few SMs, bad inputs."""

import math

import pytest
import torch

import flash_attention as fa
from flash_attention import FlashAttention, flash_attention

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")
HOPPER_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def cuda_marks(kernel):
    """The marks of a CUDA test of kernel family `kernel`: a GPU, and for "hopper" an H100 or H200."""
    if kernel != "hopper":
        return [requires_cuda]
    return [requires_cuda, pytest.mark.skipif(not HOPPER_GPU, reason='kernel="hopper" needs a GPU of compute '
                                              "capability 9.0 (H100, H200)")]


def cuda_kernels():
    """pytest params of every kernel family, with cuda_marks."""
    return [pytest.param(kernel, marks=cuda_marks(kernel)) for kernel in fa.KERNELS]


def random_qkv(B, H, Nq, Nk, device="cpu", seed=0, requires_grad=False):
    """q (B, H, Nq, 64), k and v (B, H, Nk, 64), float32, standard normal."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, Nq, 64, device=device, generator=g)
    k = torch.randn(B, H, Nk, 64, device=device, generator=g)
    v = torch.randn(B, H, Nk, 64, device=device, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def attention_float64(q, k, v, causal=False, softmax_scale=None):
    """softmax(scale * q k^T) v in float64, the plain way (materializes the score matrix)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    S = scale * q @ k.transpose(-1, -2)
    if causal:
        Nq, Nk = S.shape[-2:]
        hidden = torch.ones(Nq, Nk, dtype=torch.bool, device=S.device).triu(1)
        S = S.masked_fill(hidden, -math.inf)
    return torch.softmax(S, dim=-1) @ v


def float64_grads(q, k, v, dout, causal=False, softmax_scale=None):
    """Output and (dq, dk, dv) of attention_float64 for the output gradient dout."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_float64(q64, k64, v64, causal, softmax_scale)
    out.backward(dout.double())
    return out, q64.grad, k64.grad, v64.grad


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def flash_grads(q, k, v, dout, **kwargs):
    """Output and (dq, dk, dv) of flash_attention (with kwargs) for the output gradient dout."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, **kwargs)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def on_sms(num_sms, fn):
    """fn() run on num_sms multiprocessors (a green context), on this thread; skips the test where
    this PyTorch or GPU has no green contexts. Autograd's worker thread would not run inside the
    context: fn should call the ops directly."""
    green = getattr(torch.cuda, "green_contexts", None)
    if green is None:
        pytest.skip("needs torch.cuda.green_contexts (PyTorch >= 2.9)")
    try:
        context = green.GreenContext.create(num_sms=num_sms, device_id=torch.cuda.current_device())
    except RuntimeError as e:  # e.g. a driver or GPU without green contexts
        pytest.skip(f"green contexts are not available here: {e}")
    torch.cuda.synchronize()
    if hasattr(context, "Stream"):
        stream = context.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = fn()
        torch.cuda.current_stream().wait_stream(stream)
    else:
        context.set_context()
        try:
            result = fn()
            torch.cuda.synchronize()
        finally:
            context.pop_context()
    torch.cuda.synchronize()
    return result


def bad_inputs(device):
    """(what, call, exception, words its message must hold) for every kind of bad input, on device."""

    def qkv(shape_q=(2, 2, 8, 64), shape_kv=(2, 2, 8, 64), dtype=torch.float32):
        return [torch.randn(s, device=device).to(dtype) for s in (shape_q, shape_kv, shape_kv)]

    other = "meta" if device == "cpu" else "cpu"  # a tensor on another device
    return [
        ("float64", lambda: flash_attention(*qkv(dtype=torch.float64)), TypeError, ["q", "torch.float64", "float32"]),
        ("float16 v", lambda: flash_attention(*qkv()[:2], qkv(dtype=torch.float16)[2]), TypeError,
         ["v", "torch.float16", "float32"]),
        ("head_dim 32", lambda: flash_attention(*qkv((2, 2, 8, 32), (2, 2, 8, 32))), ValueError, ["head_dim 32", "64"]),
        ("2-D", lambda: flash_attention(*qkv((8, 64), (8, 64))), ValueError, ["q", "(8, 64)", "2-D", "4-D"]),
        ("5-D", lambda: flash_attention(*qkv((1, 2, 2, 8, 64), (1, 2, 2, 8, 64))), ValueError, ["5-D", "3-D"]),
        ("ranks differ", lambda: flash_attention(qkv((2, 8, 64))[0], *qkv()[1:]), ValueError, ["same rank"]),
        ("k, v shapes", lambda: flash_attention(*qkv()[:2], qkv((2, 2, 9, 64))[0]), ValueError,
         ["k (2, 2, 8, 64)", "v (2, 2, 9, 64)"]),
        ("batch mismatch", lambda: flash_attention(*qkv((3, 2, 8, 64))), ValueError, ["batch", "q (3, 2, 8, 64)"]),
        ("heads mismatch", lambda: flash_attention(*qkv((2, 4, 8, 64))), ValueError, ["head", "k (2, 2, 8, 64)"]),
        ("Nk = 0", lambda: flash_attention(*qkv(shape_kv=(2, 2, 0, 64))), ValueError, ["Nk = 0", "Nk >= 1"]),
        ("not a tensor", lambda: flash_attention([[1.0]], *qkv()[1:]), TypeError, ["q", "list"]),
        ("device mix", lambda: flash_attention(*qkv()[:2], torch.randn(2, 2, 8, 64, device=other)), ValueError,
         ["v", other]),
        ("causal", lambda: flash_attention(*qkv(), causal="yes"), TypeError, ["causal", "'yes'"]),
        ("scale NaN", lambda: flash_attention(*qkv(), softmax_scale=float("nan")), ValueError, ["softmax_scale", "nan"]),
        ("scale str", lambda: flash_attention(*qkv(), softmax_scale="0.1"), TypeError,
         ["softmax_scale", "'0.1'", "str"]),
        ("scale inf", lambda: flash_attention(*qkv(), softmax_scale=math.inf), ValueError, ["softmax_scale", "inf"]),
        ("deterministic", lambda: flash_attention(*qkv(), deterministic=1), TypeError, ["deterministic", "1"]),
        ("kernel", lambda: flash_attention(*qkv(), kernel="turbo"), ValueError,
         ["kernel", "'turbo'", "fast", "tutorial"]),
        ("kernel type", lambda: flash_attention(*qkv(), kernel=1), TypeError, ["kernel", "string", "1"]),
        ("module head_dim", lambda: FlashAttention(head_dim=128), ValueError, ["head_dim", "64", "128"]),
        ("module head_dim type", lambda: FlashAttention(head_dim="64"), TypeError, ["head_dim", "int", "'64'"]),
        ("module causal", lambda: FlashAttention(causal=None), TypeError, ["causal", "None"]),
    ]
