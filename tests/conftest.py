"""Shared helpers: float64 attention (the ground truth), random inputs, the GPU skip mark, a few SMs."""

import math

import pytest
import torch

from flash_attention import flash_attention

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")


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
