"""Each property of flash_attention, tested once on every implementation: the PyTorch reference
(CPU tensors; these cases run in CI) and every CUDA kernel family (skipped, with the reason,
where there is no GPU, or for "hopper" no H100 or H200). The CPU cases use smaller shapes: the
reference is slow."""

import math

import pytest
import torch

import flash_attention as fa
from conftest import bad_inputs, cuda_marks, flash_grads, float64_grads, max_err, random_qkv, requires_cuda
from flash_attention import flash_attention


def implementations(cpu, cuda):
    """pytest params (device, kernel, *case): the reference with each case of `cpu`, and each CUDA
    kernel family with each case of `cuda`."""
    params = [pytest.param("cpu", None, *case, id="-".join(map(str, ("cpu", *case)))) for case in cpu]
    for kernel in fa.KERNELS:
        params += [pytest.param("cuda", kernel, *case, id="-".join(map(str, (kernel, *case))),
                                marks=cuda_marks(kernel)) for case in cuda]
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

# CUDA, Nk = 1000 and 1500: the fast kernels, causal, use one buffer (dq itself) and 4 buffers;
# Nk = 128: two key tiles, added atomically, in either order, by 128 heads at once; Nk = 256,
# non-causal: a buffer per key tile, stored with no counters (causal: one chain into dq).
@pytest.mark.parametrize("device,kernel,B,H,Nq,Nk,causal",
                         implementations(grid([(2, 2, 70, 300)], [False, True]),
                                         grid([(2, 4, 1000, 1000), (2, 4, 1000, 1500), (8, 16, 300, 128),
                                               (8, 16, 300, 256)],
                                              [False, True])))
def test_deterministic_repeats_are_bit_identical(device, kernel, B, H, Nq, Nk, causal):
    q, k, v = random_qkv(B, H, Nq, Nk, device=device, seed=8)
    dout = torch.randn(B, H, Nq, 64, device=device)
    first = flash_grads(q, k, v, dout, causal=causal, deterministic=True, kernel=kernel)
    for _ in range(3 if device == "cpu" else 20):
        again = flash_grads(q, k, v, dout, causal=causal, deterministic=True, kernel=kernel)
        for name, a, b in zip(("O", "dQ", "dK", "dV"), first, again):
            assert torch.equal(a, b), name


# CUDA: the batched call fills an H100's or H200's SMs, the one-sample and one-head calls do
# not, so Part III's forward takes blocks of 128 query rows for the first and of 64 for the others.
@pytest.mark.parametrize("device,kernel,Nq,Nk,causal",
                         implementations(grid([(50, 290)], [False, True]),
                                         grid([(777, 999), (777, 1111), (777, 100)], [False, True])))
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


# ---------------------------------------------------------------------------- layouts

def _nanogpt(B, H, N, device, g):
    """q, k, v as nanoGPT makes them: qkv(x).split(C, dim=2), then .view(B, N, H, 64).transpose(1, 2)."""
    x = torch.randn(B, N, 3 * H * 64, device=device, generator=g)
    return [t.view(B, N, H, 64).transpose(1, 2) for t in x.split(H * 64, dim=2)]


def _rows_in(B, H, N, device, g, *, row_stride=64, offset=0):
    """(B, H, N, 64) tensors whose rows are row_stride floats apart, starting offset floats into their storage."""
    def one():
        storage = torch.randn(offset + B * H * N * row_stride, device=device, generator=g)
        return storage[offset:].view(B, H, N, row_stride)[..., :64]
    return [one() for _ in range(3)]


def _layout(name, B, H, N, device, seed):
    """q, k, v (B, H, N, 64) and dout in the layout `name`, random."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    dout = randn(B, H, N, 64)
    if name == "nanogpt":  # rows 3 H 64 floats apart, heads 64: read in place
        q, k, v = _nanogpt(B, H, N, device, g)
    elif name == "bnhd":  # (B, N, H, 64), transposed: read in place
        q, k, v = (randn(B, N, H, 64).transpose(1, 2) for _ in range(3))
        dout = randn(B, N, H, 64).transpose(1, 2)
    elif name == "offset":  # 16-byte aligned rows at a storage offset, padded to 68 floats: read in place
        q, k, v = _rows_in(B, H, N, device, g, row_stride=68, offset=4)
    elif name == "broadcast":  # k, v shared by the heads, dout by the batch (stride 0): read in place
        q, k, v = randn(B, H, N, 64), randn(B, 1, N, 64).expand(B, H, N, 64), randn(B, 1, N, 64).expand(B, H, N, 64)
        dout = randn(1, H, N, 64).expand(B, H, N, 64)
    elif name == "misaligned":  # rows 4 bytes past a 16-byte boundary: copied
        q, k, v = _rows_in(B, H, N, device, g, offset=1)
    elif name == "odd_rows":  # rows 66 floats apart, so every other one misaligned: copied
        q, k, v = _rows_in(B, H, N, device, g, row_stride=66)
    elif name == "columns":  # the 64 floats of a row are not contiguous: copied
        q, k, v = (randn(B, H, 64, N).transpose(2, 3) for _ in range(3))
    elif name == "sum_loss":  # out.sum()'s gradient: one number, every stride 0; copied as one row
        q, k, v = randn(B, H, N, 64), randn(B, H, N, 64), randn(B, H, N, 64)
        dout = torch.ones((), device=device).expand(B, H, N, 64)
    else:
        raise ValueError(name)
    return q, k, v, dout


LAYOUTS = ["nanogpt", "bnhd", "offset", "broadcast", "misaligned", "odd_rows", "columns", "sum_loss"]
IN_PLACE = ["nanogpt", "bnhd", "offset", "broadcast"]


def _ops(q, k, v, dout, causal, deterministic, kernel):
    """The ops called directly: O, L, dQ, dK, dV."""
    O, L = torch.ops.flash_attention.forward(q, k, v, causal, 0.125, kernel or "fast")
    return (O, L, *torch.ops.flash_attention.backward(dout, q, k, v, O, L, causal, 0.125, deterministic,
                                                      kernel or "fast"))


def _allocations(fn):
    """How many times fn() allocates CUDA memory."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    fn()
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before


@pytest.mark.parametrize("device,kernel,layout,deterministic",
                         implementations(grid(LAYOUTS, [False]), grid(LAYOUTS, MODES)))
def test_any_layout_gives_the_results_of_contiguous_inputs(device, kernel, layout, deterministic):
    q, k, v, dout = _layout(layout, 2, 3, 70, device, seed=LAYOUTS.index(layout))
    # through autograd, as a model calls it
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, causal=True, deterministic=deterministic, kernel=kernel)
    out.backward(dout)
    ref, dq64, dk64, dv64 = float64_grads(q, k, v, dout, causal=True)
    assert max_err(out, ref) <= 1e-5
    assert max(max_err(leaves[0].grad, dq64), max_err(leaves[1].grad, dk64), max_err(leaves[2].grad, dv64)) <= 5e-5
    # the outputs come in the inputs' layouts
    O, L, dq, dk, dv = _ops(q, k, v, dout, True, deterministic, kernel)
    for name, x, t in (("O", O, q), ("dQ", dq, q), ("dK", dk, k), ("dV", dv, v)):
        assert x.stride() == fa._output_like(t).stride(), name
    if device == "cuda":
        # the kernels compute the same bits from any layout (dQ: where the order of its sums is fixed)
        dense = _ops(*(t.contiguous() for t in (q, k, v, dout)), True, deterministic, kernel)
        for name, x, y in zip(("O", "L", "dQ", "dK", "dV"), (O, L, dq, dk, dv), dense):
            if name != "dQ" or deterministic:
                assert torch.equal(x, y), name
        # and read the layouts they can read in place without a copy
        if layout in IN_PLACE:
            calls = lambda *inputs: lambda: _ops(*inputs, True, deterministic, kernel)  # noqa: E731
            dense_inputs = [t.contiguous() for t in (q, k, v, dout)]
            assert _allocations(calls(q, k, v, dout)) == _allocations(calls(*dense_inputs))


@pytest.mark.parametrize("device,kernel,layout", implementations(grid(["contiguous"] + LAYOUTS),
                                                                 grid(["contiguous", "nanogpt", "sum_loss"])))
def test_opcheck(device, kernel, layout):
    if layout == "contiguous":
        q, k, v = random_qkv(2, 2, 45, 45, device=device, seed=13)
        dout = torch.randn_like(q)
    else:
        q, k, v, dout = _layout(layout, 2, 2, 45, device, seed=13)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.flash_attention.forward.default, (q, k, v, True, 0.125, kernel or "fast"))
    O, L = torch.ops.flash_attention.forward(q, k, v, True, 0.125, kernel or "fast")
    for deterministic in (False, True):
        args = (dout, q.detach(), k.detach(), v.detach(), O, L, True, 0.125, deterministic, kernel or "fast")
        torch.library.opcheck(torch.ops.flash_attention.backward.default, args)
        if device == "cuda":  # the differentiable op of the CUDA path
            torch.library.opcheck(torch.ops.flash_attention.attention.default,
                                  (q, k, v, True, 0.125, deterministic, kernel))


# ---------------------------------------------------------------------------- autograd
# The CPU path differentiates through _FlashAttentionFunction (flash_attention.py), the CUDA path
# through the C++ autograd of the op flash_attention::attention (flash_attention.cu): the same
# behaviour, tested on both.

ONE_CASE = implementations([()], [()])


@pytest.mark.parametrize("device,kernel", ONE_CASE)
def test_first_order_gradients_with_create_graph_are_right(device, kernel):
    q, k, v = random_qkv(1, 2, 19, 23, device=device, seed=6, requires_grad=True)
    dout = torch.randn(1, 2, 19, 64, device=device)
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=True, kernel=kernel), (q, k, v), dout,
                                create_graph=True)
    _, *grads64 = float64_grads(q, k, v, dout, causal=True)
    assert max(max_err(g, g64) for g, g64 in zip(grads, grads64)) <= 5e-5


@pytest.mark.parametrize("device,kernel", ONE_CASE)
def test_gradient_penalty_raises_instead_of_dropping_the_second_order_term(device, kernel):
    q, k, v = random_qkv(1, 2, 9, 12, device=device, seed=7, requires_grad=True)
    (dq,) = torch.autograd.grad(flash_attention(q, k, v, kernel=kernel).sum(), q, create_graph=True)
    assert dq.requires_grad  # as it would be with any differentiable attention
    penalty = dq.square().sum()
    with pytest.raises(RuntimeError, match="flash_attention: double backward is not supported"):
        penalty.backward()


@pytest.mark.parametrize("device,kernel", ONE_CASE)
def test_without_autograd_the_output_is_the_same(device, kernel):
    q, k, v = random_qkv(2, 2, 30, 40, device=device, seed=12, requires_grad=True)
    out = flash_attention(q, k, v, causal=True, kernel=kernel)
    assert out.requires_grad
    with torch.no_grad():
        no_grad = flash_attention(q, k, v, causal=True, kernel=kernel)
    with torch.inference_mode():
        inference = flash_attention(q, k, v, causal=True, kernel=kernel)
    detached = flash_attention(q.detach(), k.detach(), v.detach(), causal=True, kernel=kernel)
    assert not no_grad.requires_grad and not inference.requires_grad and not detached.requires_grad
    assert torch.equal(out, no_grad) and torch.equal(out, inference) and torch.equal(out, detached)


@pytest.mark.parametrize("device,kernel", ONE_CASE)
def test_one_input_that_requires_grad_gets_its_gradient(device, kernel):
    q, k, v = random_qkv(1, 2, 19, 23, device=device, seed=13)
    v.requires_grad_()
    dout = torch.randn(1, 2, 19, 64, device=device)
    out = flash_attention(q, k, v, causal=True, kernel=kernel)
    assert out.requires_grad
    (dv,) = torch.autograd.grad(out, v, dout)
    *_, dv64 = float64_grads(q, k, v, dout, causal=True)
    assert max_err(dv, dv64) <= 5e-5


@pytest.mark.parametrize("device,kernel", ONE_CASE)
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(device, kernel):
    import torch.autograd.forward_ad as fwAD

    q, k, v = random_qkv(1, 1, 8, 8, device=device, seed=14)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="(?i)jvp"):
        flash_attention(fwAD.make_dual(q, torch.ones_like(q)), k, v, kernel=kernel)


class _BackwardSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the `deterministic` argument of every call of the backward op, from Python or C++."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.flash_attention.backward.default:
            self.seen.append(args[8])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,kernel", ONE_CASE)
def test_deterministic_none_follows_torch_setting(device, kernel):
    q, k, v = random_qkv(1, 1, 4, 4, device=device, requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    with _BackwardSpy() as spy:
        flash_attention(q, k, v, kernel=kernel).sum().backward()
        try:
            torch.use_deterministic_algorithms(True)
            flash_attention(q, k, v, kernel=kernel).sum().backward()
            flash_attention(q, k, v, deterministic=False, kernel=kernel).sum().backward()
        finally:
            torch.use_deterministic_algorithms(was)
        flash_attention(q, k, v, deterministic=True, kernel=kernel).sum().backward()
    assert spy.seen == [False, True, False, True]


@pytest.mark.parametrize("device,kernel,causal", implementations(grid([False, True]), grid([False, True])))
def test_torch_compile_fullgraph(device, kernel, causal):
    torch._dynamo.reset()
    q, k, v = random_qkv(2, 2, 21, 35, device=device, seed=9, requires_grad=True)

    def step(q, k, v):
        return flash_attention(q, k, v, causal=causal, deterministic=True, kernel=kernel).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = step(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
