"""The CUDA kernels: inputs of every layout, the determinism contract beyond test_properties.py
(pinned bits, few SMs, start order, buffers), and PyTorch integration.

Every test here needs a CUDA GPU and is skipped, with that reason, where there is none.
"""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_attention as fa
from conftest import (HOPPER_GPU, cuda_kernels, flash_grads, float64_grads, max_err, on_sms, random_qkv,
                      requires_cuda)
from flash_attention import FlashAttention, flash_attention

pytestmark = requires_cuda

@pytest.mark.parametrize("kernel", cuda_kernels())
@pytest.mark.parametrize("deterministic", [False, True])
def test_sum_loss_non_contiguous_inputs(deterministic, kernel):
    x = torch.randn(2, 300, 4, 3 * 64, device="cuda")  # (B, N, H, 3 * d) from a fused projection
    q, k, v = (t.transpose(1, 2) for t in x.split(64, dim=-1))
    assert not q.is_contiguous()
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=True, deterministic=deterministic, kernel=kernel)
    out.sum().backward()  # an expanded, stride-0 output gradient
    ref, dq, dk, dv = float64_grads(q, k, v, torch.ones_like(out), causal=True)
    assert max_err(out, ref) <= 1e-5
    assert max(max_err(q.grad, dq), max_err(k.grad, dk), max_err(v.grad, dv)) <= 5e-5


def test_softmax_scale_and_three_dim_input():
    q, k, v = random_qkv(3, 1, 70, 90, device="cuda", seed=5)
    dout = torch.randn(3, 70, 64, device="cuda")
    out, dq, dk, dv = flash_grads(q[:, 0], k[:, 0], v[:, 0], dout, causal=True, softmax_scale=0.3)
    ref, dq64, dk64, dv64 = float64_grads(q[:, 0], k[:, 0], v[:, 0], dout, causal=True, softmax_scale=0.3)
    assert out.shape == (3, 70, 64)
    assert max_err(out, ref) <= 1e-5
    assert max(max_err(dq, dq64), max_err(dk, dk64), max_err(dv, dv64)) <= 5e-5


def test_misaligned_storage():
    base = torch.randn(1 + 2 * 2 * 33 * 64, device="cuda")
    q = base[1:].view(2, 2, 33, 64)  # contiguous, but 4 bytes past a 16-byte boundary
    k, v = random_qkv(2, 2, 33, 40, device="cuda", seed=6)[1:]
    assert q.data_ptr() % 16 != 0
    ref, *_ = float64_grads(q, k, v, torch.zeros_like(q))
    assert max_err(flash_attention(q, k, v), ref) <= 1e-5


def test_empty_inputs():
    q = torch.randn(2, 2, 0, 64, device="cuda", requires_grad=True)
    k = torch.randn(2, 2, 5, 64, device="cuda", requires_grad=True)
    v = torch.randn(2, 2, 5, 64, device="cuda", requires_grad=True)
    out = flash_attention(q, k, v)
    out.sum().backward()
    assert out.shape == q.shape and torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0
    assert flash_attention(*random_qkv(0, 2, 5, 5, device="cuda")).shape == (0, 2, 5, 64)


@pytest.mark.parametrize("kernel", cuda_kernels())
def test_keys_no_query_sees_get_zero_gradients(kernel):
    q, k, v = random_qkv(1, 2, 20, 70, device="cuda", seed=7)  # causal: keys 20.. are hidden from every query
    _, _, dk, dv = flash_grads(q, k, v, torch.randn(1, 2, 20, 64, device="cuda"), causal=True, kernel=kernel)
    assert torch.count_nonzero(dk[:, :, 20:]) == 0 and torch.count_nonzero(dv[:, :, 20:]) == 0


def test_default_kernel_is_the_fastest_family_for_the_gpu():
    # kernel=None: "hopper" on compute capability 9.0 (the build targets the GPU it finds, so
    # with sm_90a there), "fast" elsewhere; the same bits as that family named.
    expected = "hopper" if HOPPER_GPU else "fast"
    assert fa._extension().hopper_available(torch.cuda.current_device()) == HOPPER_GPU
    assert fa._default_kernel(torch.cuda.current_device()) == expected
    q, k, v = random_qkv(2, 3, 300, 200, device="cuda", seed=16)
    dout = torch.randn(2, 3, 300, 64, device="cuda")
    default = flash_grads(q, k, v, dout, causal=True, deterministic=True)
    named = flash_grads(q, k, v, dout, causal=True, deterministic=True, kernel=expected)
    assert all(torch.equal(a, b) for a, b in zip(default, named))


# ---------------------------------------------------------------------------- determinism contract

# The deterministic outputs pinned by their SHA-256s (deterministic_sha256.json). Fast: 4
# buffers with chains of key tiles (Nk = 1100, 2100 causal, 4000), one chain into dq itself
# (causal, Nk = 1000), one key tile a buffer (Nk = 250: P = Tc = 4), two key tiles (Nk = 100:
# the default mode's kernels, pinned with those that summed two buffers); tutorial: 16 buffers.
PINNED = [("fast", 2, 3, 300, 1100, False), ("fast", 2, 3, 1000, 1000, True), ("fast", 2, 3, 777, 2100, True),
          ("fast", 4, 8, 200, 4000, False), ("fast", 2, 3, 300, 250, False), ("fast", 2, 3, 300, 100, False),
          ("tutorial", 2, 3, 300, 1100, False), ("tutorial", 2, 3, 200, 700, True)]
PINNED_HASHES = Path(__file__).with_name("deterministic_sha256.json")


def fixed_inputs(B, H, Nq, Nk, device):
    """q, k, v, dout from integer arithmetic alone (the same on every PyTorch version), uniform with variance 1."""
    def uniform(n, salt):
        i = torch.arange(n, dtype=torch.int64) + salt * 1_000_003
        bits = (i * 6364136223846793005 + 1442695040888963407) >> 40 & 0xFFFFFF  # 24 bits of an LCG step
        return ((bits.double() / 2**23 - 1.0) * 3**0.5).float()
    shapes = [(B, H, Nq, 64), (B, H, Nk, 64), (B, H, Nk, 64), (B, H, Nq, 64)]
    return [uniform(math.prod(s), n).view(s).to(device) for n, s in enumerate(shapes)]


def deterministic_outputs(kernel, B, H, Nq, Nk, causal, device="cuda"):
    """O, L, dQ, dK, dV from the forward and backward ops on fixed_inputs, deterministic mode."""
    q, k, v, dout = fixed_inputs(B, H, Nq, Nk, device)
    O, L = torch.ops.flash_attention.forward(q, k, v, causal, 0.125, kernel)
    return (O, L, *torch.ops.flash_attention.backward(dout, q, k, v, O, L, causal, 0.125, True, kernel))


def sha256(t):
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", PINNED, ids=["-".join(map(str, c)) for c in PINNED])
def test_deterministic_outputs_are_those_of_the_pinned_kernels(case):
    expected = json.loads(PINNED_HASHES.read_text())["-".join(map(str, case))]
    O, _, dQ, dK, dV = deterministic_outputs(*case)
    got = [sha256(t) for t in (O, dQ, dK, dV)]
    assert dict(zip(("O", "dQ", "dK", "dV"), got)) == dict(zip(("O", "dQ", "dK", "dV"), expected))


@pytest.mark.parametrize("kernel", cuda_kernels())
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_on_a_few_sms_equals_the_whole_gpu(causal, kernel):
    # The ops are called directly, on this thread: autograd's worker thread would not run
    # inside the green context. 16 multiprocessors hold 32 fast blocks at once, and the calls
    # launch 2 * 4 * 32 = 256 (non-causal: 4 partial buffers, chains of 8 key tiles), so the
    # blocks run in many waves and the chains cross them.
    q, k, v = random_qkv(2, 4, 500, 2040, device="cuda", seed=16)
    dout = torch.randn(2, 4, 500, 64, device="cuda")
    forward, backward = torch.ops.flash_attention.forward, torch.ops.flash_attention.backward

    def run():
        O, L = forward(q, k, v, causal, 0.125, kernel)
        return (O, *backward(dout, q, k, v, O, L, causal, 0.125, True, kernel))

    whole = run()
    few = on_sms(16, run)
    for name, a, b in zip(("O", "dQ", "dK", "dV"), whole, few):
        assert torch.equal(a, b), name


# The fast deterministic backward in a process of its own (tests/start_order.py), with its
# blocks taking their tiles as if the GPU started them in reverse order: a block that could
# wait for one that has not started would hang, and fail here by the timeout. Each row:
# causal, N, SMs (0: the whole GPU). At B = 4, H = 8, N = 4096 there are 2048 blocks, about 8
# waves of an H200; on 16 SMs, 32 blocks run at once.
START_ORDER = [(False, 4096, 0), (True, 4096, 0), (False, 2040, 16), (True, 1024, 16)]


@pytest.mark.parametrize("causal,N,num_sms", START_ORDER)
def test_fast_deterministic_backward_does_not_depend_on_the_order_blocks_start(causal, N, num_sms):
    command = [sys.executable, str(Path(__file__).with_name("start_order.py")), str(int(causal)), str(N), str(num_sms)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the backward did not finish in 300 s: a block waits for one that has not started")
    if result.stdout.startswith("skip: "):
        pytest.skip(result.stdout[len("skip: "):].strip())
    assert result.returncode == 0 and result.stdout.strip() == "equal", result.stdout + result.stderr


def test_kernels_use_the_documented_number_of_partial_buffers():
    # README, "Determinism": P = min(ceil(Nk / 64), 4) for the fast kernels, 1 when Nk <= 128,
    # or causal and Nk <= 1024; the tutorial kernels use the reference's P = min(ceil(Nk / 16), 16).
    P = fa._extension().dq_partials
    assert [P(n, "fast", False) for n in (0, 1, 64, 65, 128, 129, 192, 193, 256, 257, 100000)] == \
        [0, 1, 1, 1, 1, 3, 3, 4, 4, 4, 4]
    assert [P(n, "fast", True) for n in (0, 1, 65, 1024, 1025, 100000)] == [0, 1, 1, 1, 4, 4]
    for Nk in (1, 16, 17, 64, 65, 448, 512, 513, 1024, 1025, 100000):
        assert P(Nk, "tutorial", False) == P(Nk, "tutorial", True) == fa.dq_partials(Nk), Nk


def test_use_deterministic_algorithms_selects_deterministic_mode():
    q, k, v = random_qkv(2, 4, 2000, 2000, device="cuda", seed=10)
    dout = torch.randn(2, 4, 2000, 64, device="cuda")
    explicit = flash_grads(q, k, v, dout, deterministic=True)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(5):
            followed = flash_grads(q, k, v, dout)
            assert all(torch.equal(a, b) for a, b in zip(explicit, followed))
    finally:
        torch.use_deterministic_algorithms(was)


def test_forward_is_batch_invariant_in_default_mode():
    q, k, v = random_qkv(4, 2, 500, 600, device="cuda", seed=11)
    out = flash_attention(q, k, v, causal=True)
    for b in range(4):
        assert torch.equal(out[b : b + 1], flash_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], causal=True))


# ---------------------------------------------------------------------------- PyTorch integration

@pytest.mark.parametrize("causal", [False, True])
def test_torch_compile_fullgraph(causal):
    torch._dynamo.reset()
    fa._DEFAULT_KERNELS.clear()  # kernel=None's family is then found while tracing
    q, k, v = random_qkv(2, 2, 300, 200, device="cuda", seed=12, requires_grad=True)
    w = torch.randn(64, 64, device="cuda")

    def step(q, k, v):
        return (flash_attention(q @ w, k, v, causal=causal, deterministic=True) * 2).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = step(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(grads, grads_ref))


def test_module_trains_on_cuda():
    attn = FlashAttention(causal=True)
    q, k, v = random_qkv(2, 2, 64, 64, device="cuda", seed=14, requires_grad=True)
    attn(q, k, v).square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------------------- memory

def _peak_mib(N, deterministic, kernel, H=2, Nk=None, causal=True):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    q, k, v = random_qkv(1, H, N, Nk or N, device="cuda", seed=15, requires_grad=True)
    dout = torch.randn(1, H, N, 64, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    flash_attention(q, k, v, causal=causal, deterministic=deterministic, kernel=kernel).backward(dout)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("kernel", cuda_kernels())
@pytest.mark.parametrize("deterministic", [False, True])
def test_memory_grows_linearly_up_to_16384(deterministic, kernel):
    tensor_mib = 2 * 16384 * 64 * 4 / 2**20  # one (1, 2, 16384, 64) float32 tensor: 8 MiB
    small, large = _peak_mib(4096, deterministic, kernel), _peak_mib(16384, deterministic, kernel)
    # out, dq, dk, dv and the small L, D; plus P - 1 dQ partial buffers when deterministic
    # (buffer 0 is dq). The score matrix alone would be 2 * 16384^2 * 4 bytes = 2048 MiB.
    P = fa._extension().dq_partials(16384, kernel, True)
    assert large <= (6 + (P - 1 if deterministic else 0)) * tensor_mib
    assert large / small <= 4.5  # 4x the length, 4x the memory: linear, not quadratic (16x)


@pytest.mark.parametrize("Nk, causal", [(1024, True), (128, False)])
def test_fast_deterministic_backward_with_one_buffer_needs_no_extra_memory(Nk, causal):
    # P = 1 (causal up to 1024 keys; up to 128 keys, two key tiles, either way): dq itself is
    # the buffer; only the counters and flags (16 * 5 * B * H ints at most) are extra.
    assert fa._extension().dq_partials(Nk, "fast", causal) == 1
    extra = _peak_mib(1024, True, "fast", H=8, Nk=Nk, causal=causal) - \
        _peak_mib(1024, False, "fast", H=8, Nk=Nk, causal=causal)
    assert extra < 1.0  # one (1, 8, 1024, 64) float32 buffer would be 2 MiB


# ---------------------------------------------------------------------------- bad input on CUDA

def test_cpu_cuda_mix_raises_and_the_context_keeps_working():
    q, k, v = random_qkv(1, 2, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.cpu(), v)
    with pytest.raises(TypeError, match="float32"):
        flash_attention(q.double(), k, v)
    ref, *_ = float64_grads(q, k, v, torch.zeros_like(q))
    assert max_err(flash_attention(q, k, v), ref) <= 1e-5
