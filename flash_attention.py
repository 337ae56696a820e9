"""FP32 FlashAttention for PyTorch: readable, exact, memory-lean and bit-reproducible.

    from flash_attention import flash_attention, FlashAttention

    out = flash_attention(q, k, v, causal=False, softmax_scale=None, deterministic=None)
    attn = FlashAttention(head_dim=64, causal=True)
    out = attn(q, k, v)

q is (B, H, Nq, 64), k and v are (B, H, Nk, 64), all float32; a 3-D (B, N, 64) input is
one head. CUDA tensors run the kernels of flash_attention.cu; CPU tensors run the
reference below, which walks the same 16x16 tiles in the same order.

This file has four parts, in reading order:
  1. the reference: FlashAttention-2's Algorithm 1 (forward) and Algorithm 2 (backward) in PyTorch;
  2. the CUDA extension: loaded if installed, compiled on first use if not;
  3. the torch.library ops "flash_attention::forward", "flash_attention::backward" and, on CUDA,
     the differentiable "flash_attention::attention", with fake implementations (torch.compile),
     and the autograd function of the CPU path;
  4. the public API: input checks, flash_attention() and FlashAttention.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["flash_attention", "FlashAttention"]

HEAD_DIM = 64  # the only head dimension the kernels are built for
Br = 16  # query rows in a tile of the reference (and of Part I of flash_attention.cu)
Bc = 16  # key/value rows in a tile
DQ_PARTIALS = 16  # most dQ partial buffers of the reference's deterministic backward
KERNELS = ("fast", "tutorial", "hopper")  # the kernel families of flash_attention.cu (default: _default_kernel)


def dq_partials(Nk: int) -> int:
    """Number P of dQ partial buffers of the reference's deterministic backward, as in Part I of
    flash_attention.cu (kernel="tutorial"): P = min(Tc, DQ_PARTIALS), Tc = ceil(Nk / Bc) key tiles.

    P depends only on Nk, not on B or H. Buffer 0 is dQ itself, so the extra memory is
    (P - 1) * B * H * Nq * 64 float32 values. The fast kernels use fewer (README,
    "Determinism"); their extension says how many: _extension().dq_partials(Nk, kernel, causal).
    """
    return min(math.ceil(Nk / Bc), DQ_PARTIALS)


# ----------------------------------------------------------------------------------------
# 1. The reference: the tiled algorithm in PyTorch, in the kernels' loop order
# ----------------------------------------------------------------------------------------
# Shapes: q (B, H, Nq, d), k and v (B, H, Nk, d). A "tile" is a slice of Br query rows or
# Bc key rows; the last tile may be shorter. Each loop body below is what one thread block
# of flash_attention.cu does, with the same names and the same algorithm line numbers.


def _causal_mask(rows: range, cols: range, device) -> Tensor:
    """True where key `col` is hidden from query `row` (col > row), shape (len(rows), len(cols))."""
    r = torch.arange(rows.start, rows.stop, device=device)
    c = torch.arange(cols.start, cols.stop, device=device)
    return c[None, :] > r[:, None]


def _matmul_visible(A: Tensor, B: Tensor, hidden: Tensor | None) -> Tensor:
    """A @ B without the products of hidden entries of A (hidden: a bool mask of A's last two dims).

    A hidden score has probability 0, but 0 * NaN is NaN: a NaN in a hidden key must not
    reach the queries it is hidden from. The kernels skip these products the same way.
    """
    if hidden is None or not hidden.any():
        return A @ B
    products = A[..., :, :, None] * B[..., None, :, :]  # (..., rows of A, cols of A, cols of B)
    return products.masked_fill(hidden[..., None], 0.0).sum(-2)


def reference_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float):
    """FlashAttention-2's Algorithm 1 (its line numbers in the comments). Returns O (B, H, Nq, d)
    and L (B, H, Nq)."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    O = q.new_empty(B, H, Nq, d)
    L = q.new_empty(B, H, Nq)
    Tr, Tc = math.ceil(Nq / Br), math.ceil(Nk / Bc)
    for i in range(Tr):  # line 3: one thread block per query tile
        rows = range(i * Br, min((i + 1) * Br, Nq))
        Q_i = q[:, :, rows.start : rows.stop]  # line 4: load Q_i
        m_i = q.new_full((B, H, len(rows)), -math.inf)  # line 5: m_i = -inf
        l_i = q.new_zeros(B, H, len(rows))  # line 5: l_i = 0
        O_i = q.new_zeros(B, H, len(rows), d)  # line 5: O_i = 0
        Tc_end = min(Tc, (rows.stop - 1) // Bc + 1) if causal else Tc
        for j in range(Tc_end):  # line 6
            cols = range(j * Bc, min((j + 1) * Bc, Nk))
            K_j = k[:, :, cols.start : cols.stop]  # line 7: load K_j, V_j
            V_j = v[:, :, cols.start : cols.stop]
            hidden = _causal_mask(rows, cols, q.device) if causal else None
            S_ij = softmax_scale * (Q_i @ K_j.transpose(-1, -2))  # line 8
            if causal:
                S_ij = S_ij.masked_fill(hidden, -math.inf)
            m_new = torch.maximum(m_i, S_ij.amax(-1))  # line 9: m_i, P~_ij, l_i
            P_ij = torch.exp(S_ij - m_new[..., None])
            alpha = torch.exp(m_i - m_new)
            l_i = alpha * l_i + P_ij.sum(-1)
            O_i = alpha[..., None] * O_i + _matmul_visible(P_ij, V_j, hidden)  # line 10
            m_i = m_new
        O[:, :, rows.start : rows.stop] = O_i / l_i[..., None]  # lines 12, 14: O_i / l_i
        L[:, :, rows.start : rows.stop] = m_i + torch.log(l_i)  # lines 13, 15: the logsumexp L_i
    return O, L


def reference_backward(dO, q, k, v, O, L, causal: bool, softmax_scale: float):
    """FlashAttention-2's Algorithm 2 (its line numbers in the comments), with the
    deterministic dQ combine.

    Key tile j adds its dQ contributions to partial buffer p = j % P, in the order j = p,
    p + P, ...; dQ is the sum of the P buffers in the order p = 0 .. P-1, exactly as the
    deterministic CUDA backward does (there buffer 0 is dQ itself, and 0 + x = x). Returns
    dQ, dK, dV.
    """
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    Tr, Tc = math.ceil(Nq / Br), math.ceil(Nk / Bc)
    P = dq_partials(Nk)
    D = (dO * O).sum(-1)  # line 4: D = rowsum(dO * O)
    dQ_partial = q.new_zeros(P, B, H, Nq, d)
    dK = k.new_empty(B, H, Nk, d)
    dV = v.new_empty(B, H, Nk, d)
    for j in range(Tc):  # line 5: one thread block per key tile
        cols = range(j * Bc, min((j + 1) * Bc, Nk))
        K_j = k[:, :, cols.start : cols.stop]  # line 6
        V_j = v[:, :, cols.start : cols.stop]
        dK_j = k.new_zeros(B, H, len(cols), d)  # line 7
        dV_j = v.new_zeros(B, H, len(cols), d)
        i_start = (j * Bc) // Br if causal else 0
        for i in range(i_start, Tr):  # line 8
            rows = range(i * Br, min((i + 1) * Br, Nq))
            Q_i = q[:, :, rows.start : rows.stop]  # line 9
            dO_i = dO[:, :, rows.start : rows.stop]
            L_i = L[:, :, rows.start : rows.stop]
            D_i = D[:, :, rows.start : rows.stop]
            hidden = _causal_mask(rows, cols, q.device) if causal else None
            hidden_T = hidden.T if causal else None
            S_ij = softmax_scale * (Q_i @ K_j.transpose(-1, -2))  # line 10
            P_ij = torch.exp(S_ij - L_i[..., None])  # line 11: P recomputed from L
            dV_j = dV_j + _matmul_visible(P_ij.transpose(-1, -2), dO_i, hidden_T)  # line 12
            dP_ij = dO_i @ V_j.transpose(-1, -2)  # line 13
            dS_ij = P_ij * (dP_ij - D_i[..., None])  # line 14
            dQ_ij = softmax_scale * _matmul_visible(dS_ij, K_j, hidden)  # line 15, into buffer j % P
            dQ_partial[j % P, :, :, rows.start : rows.stop] += dQ_ij
            dK_j = dK_j + _matmul_visible(dS_ij.transpose(-1, -2), Q_i, hidden_T)  # line 16
        dK[:, :, cols.start : cols.stop] = softmax_scale * dK_j  # line 18
        dV[:, :, cols.start : cols.stop] = dV_j
    dQ = q.new_zeros(B, H, Nq, d)
    for p in range(P):  # the fixed-order sum of the partial buffers
        dQ = dQ + dQ_partial[p]
    return dQ, dK, dV


# ----------------------------------------------------------------------------------------
# 2. The CUDA extension
# ----------------------------------------------------------------------------------------

CUDA_SOURCE = Path(__file__).with_name("flash_attention.cu")
COMPILE_FLAGS = ["-O3", "-DFLASH_ATTENTION_WITH_TORCH"]  # setup.py builds with the same flags
_extension_module = None


def nvcc_flags() -> list[str]:
    """COMPILE_FLAGS and the GPU architectures to build for, as PyTorch chooses them (the visible
    GPUs, or TORCH_CUDA_ARCH_LIST), except that Hopper (compute capability 9.0) is built as
    sm_90a: Part III needs its instructions (wgmma, setmaxnreg), and Parts I and II compile to
    the same code there. FLASH_ATTENTION_SM90A then tells the host code that Part III is built."""
    from torch.utils import cpp_extension

    arch = [flag.replace("arch=compute_90,code=sm_90", "arch=compute_90a,code=sm_90a")
            for flag in cpp_extension._get_cuda_arch_flags()]
    if any("code=sm_90a" in flag for flag in arch):
        arch.append("-DFLASH_ATTENTION_SM90A")
    return COMPILE_FLAGS + arch


def cuda_build_blockers(need_gpu_arch: bool = False) -> list[str]:
    """What this machine lacks to compile the CUDA kernels, one phrase each ([] if nothing).

    need_gpu_arch: building ahead of use (setup.py) also needs an architecture to build
    for: a visible GPU or TORCH_CUDA_ARCH_LIST. Compiling on first use has the GPU at hand.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # importing it warns "No CUDA runtime is found" on a machine without a GPU
    from torch.utils import cpp_extension

    logger.setLevel(level)

    if torch.version.cuda is None:
        return [f"a CUDA build of PyTorch (this one, {torch.__version__}, is CPU-only)"]
    if cpp_extension.CUDA_HOME is None:
        return ["the CUDA toolkit (nvcc not found on PATH and CUDA_HOME not set)"]
    missing = []
    header_error = _toolkit_header_error(cpp_extension.CUDA_HOME)
    if header_error:
        missing.append(f"a complete CUDA toolkit (nvcc of {cpp_extension.CUDA_HOME} says: {header_error})")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if need_gpu_arch and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        missing.append('a GPU to build for (none found; TORCH_CUDA_ARCH_LIST="9.0" builds for the H100 without one)')
    return missing


def _toolkit_header_error(cuda_home: str) -> str | None:
    """The compiler's first complaint when it reads the PyTorch CUDA headers the kernels include
    (e.g. "cusparse.h: No such file or directory" from a toolkit without its libraries), or None."""
    torch_include = Path(torch.__file__).parent / "include"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cu")
        probe.write_text("#include <ATen/cuda/CUDAContext.h>\n")
        command = [str(Path(cuda_home, "bin", "nvcc")), "-E", f"-I{torch_include}",
                   f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{Path(cuda_home, 'include')}",
                   str(probe), "-o", os.devnull]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            return f"{command[0]} does not run ({e})"
    if result.returncode == 0:
        return None
    errors = [line.split("error:", 1)[1].strip() for line in result.stderr.splitlines() if "error:" in line]
    return errors[0] if errors else f"exit code {result.returncode}"


def cuda_kernels_status() -> str:
    """One line: whether the compiled CUDA kernels are installed, and if not, why and what a CUDA call does."""
    try:
        import flash_attention_cuda  # noqa: F401
    except ImportError:
        pass
    else:
        return "CUDA kernels installed (flash_attention_cuda)"
    blockers = cuda_build_blockers()
    if not blockers:
        why = ("no GPU was found and TORCH_CUDA_ARCH_LIST is not set"
               if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST")
               else "the build did not complete: pip install -v --no-build-isolation . shows why")
        return f"CUDA kernels not built ({why}); the first CUDA call compiles them with ninja (minutes, then cached)"
    if torch.version.cuda is None:
        return (f"CUDA kernels not built: PyTorch {torch.__version__} is a CPU-only build; CPU tensors run the "
                f"PyTorch reference (install a CUDA build of PyTorch, then ./install.sh again, to use a GPU)")
    return (f"CUDA kernels not built; missing: {'; '.join(blockers)}. CPU tensors run the PyTorch reference; "
            f"a CUDA call raises an error that says what is missing")


def _extension():
    """The compiled kernels: the installed module, or one compiled now with ninja (cached).
    Loading it registers the CUDA kernels of the ops (see part 3)."""
    global _extension_module
    if _extension_module is None:
        try:
            import flash_attention_cuda as module
        except ModuleNotFoundError:  # not installed; an installed module that fails to load raises
            module = _compile_extension()
        _extension_module = module
    return _extension_module


_DEFAULT_KERNELS: dict[int, str] = {}  # CUDA device index -> the family that kernel=None runs there


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps its answer
def _default_kernel(device: int) -> str:
    """The family that kernel=None runs on CUDA device `device`, the fastest there: "hopper"
    where it runs (compute capability 9.0, the kernels built for sm_90a), else "fast". The
    first call for a device loads the kernels, which registers the ops' CUDA kernels."""
    kernel = _DEFAULT_KERNELS.get(device)
    if kernel is None:
        kernel = _DEFAULT_KERNELS[device] = "hopper" if _extension().hopper_available(device) else "fast"
    return kernel


def _compile_extension():
    from torch.utils import cpp_extension

    missing = cuda_build_blockers()
    if not CUDA_SOURCE.exists():
        missing.append(f"the kernel source {CUDA_SOURCE}")
    if missing:
        raise RuntimeError(
            "flash_attention: the CUDA extension is not installed and cannot be compiled; missing: "
            + "; ".join(missing)
            + ". Install with ./install.sh, or use CPU tensors (the PyTorch reference)."
        )
    return cpp_extension.load(
        name="flash_attention_cuda",
        sources=[str(CUDA_SOURCE)],
        extra_cflags=COMPILE_FLAGS,
        extra_cuda_cflags=nvcc_flags(),
    )


# ----------------------------------------------------------------------------------------
# 3. The torch.library ops and autograd
# ----------------------------------------------------------------------------------------
# forward returns O and the logsumexp L; backward returns dQ, dK, dV; attention returns O and
# is differentiable. CPU tensors run the reference: forward and backward here, and
# flash_attention() differentiates through _FlashAttentionFunction, which calls them.
# CUDA tensors run the extension, which registers the CUDA kernels of all three ops and the
# autograd of `attention` in C++ (flash_attention.cu, the binding): a CUDA call runs no Python
# past flash_attention()'s checks, which is what a small model's step is made of. The fake
# implementations give torch.compile the output shapes and strides. forward and backward are
# not differentiable (their Autograd key falls through). Declared with torch.library.Library
# rather than the custom_op decorator, which costs tens of microseconds of Python a call.
#
# The kernels read q, k, v, dout and out in place whenever their rows of 64 floats are
# contiguous and 16-byte aligned (the extension copies the others), and O, dQ, dK, dV come
# in the layouts of q, k, v (_output_like), so that the views and splits that made q, k, v
# (e.g. nanoGPT's qkv(x).split(C, dim=2), then .view(B, T, H, 64).transpose(1, 2)) cost
# autograd no copy.

_library = torch.library.Library("flash_attention", "DEF")
_library.define("forward(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, str kernel) -> (Tensor, Tensor)")
_library.define(
    "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor L, bool causal, "
    "float softmax_scale, bool deterministic, str kernel) -> (Tensor, Tensor, Tensor)"
)
_library.define(
    "attention(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, bool deterministic, str kernel) -> Tensor"
)


def _output_like(t: Tensor) -> Tensor:
    """An empty output (O, or a gradient) for the input t: in t's order of dimensions when t's rows
    are contiguous (torch.empty_like: t's strides if t is dense, else dense in t's order),
    contiguous otherwise. output_like in flash_attention.cu is the same rule."""
    return torch.empty_like(t) if t.stride(-1) == 1 else t.new_empty(t.shape)


def _in_layout_of(x: Tensor, t: Tensor) -> Tensor:
    """x (contiguous, from the reference) in the layout the CUDA op gives an output for t."""
    out = _output_like(t)
    return x if out.stride() == x.stride() else out.copy_(x)


def _forward_cpu(q, k, v, causal, softmax_scale, kernel):
    with torch.no_grad():  # the op is not differentiable on any device (see above)
        O, L = reference_forward(q, k, v, causal, softmax_scale)
        return _in_layout_of(O, q), L


def _forward_fake(q, k, v, causal, softmax_scale, kernel):
    return _output_like(q), q.new_empty(q.shape[:-1])


def _backward_cpu(dout, q, k, v, out, L, causal, softmax_scale, deterministic, kernel):
    with torch.no_grad():
        grads = reference_backward(dout, q, k, v, out, L, causal, softmax_scale)
        return tuple(_in_layout_of(g, t) for g, t in zip(grads, (q, k, v)))


def _backward_fake(dout, q, k, v, out, L, causal, softmax_scale, deterministic, kernel):
    return _output_like(q), _output_like(k), _output_like(v)


def _attention_fake(q, k, v, causal, softmax_scale, deterministic, kernel):
    return _output_like(q)


_library.impl("forward", _forward_cpu, "CPU")
_library.impl("forward", torch.library.fallthrough_kernel, "Autograd")
torch.library.register_fake("flash_attention::forward", _forward_fake, lib=_library)
_library.impl("backward", _backward_cpu, "CPU")
_library.impl("backward", torch.library.fallthrough_kernel, "Autograd")
torch.library.register_fake("flash_attention::backward", _backward_fake, lib=_library)
torch.library.register_fake("flash_attention::attention", _attention_fake, lib=_library)


class _FlashAttentionFunction(torch.autograd.Function):
    """Autograd on the CPU (the CUDA path's is Attention in flash_attention.cu): the forward op
    saves O and L; the backward op recomputes P from them.

    forward takes ctx itself: with a separate setup_context, Function.apply binds the
    arguments with inspect.signature on every call, which costs more than the op.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, deterministic, kernel):
        out, L = torch.ops.flash_attention.forward(q, k, v, causal, softmax_scale, kernel)
        ctx.save_for_backward(q, k, v, out, L)
        ctx.mark_non_differentiable(L)
        ctx.set_materialize_grads(False)  # L has no gradient: no tensor of zeros for it
        ctx.settings = (causal, softmax_scale, deterministic, kernel)
        return out, L

    @staticmethod
    def backward(ctx, dout, dL):
        q, k, v, out, L = ctx.saved_tensors
        dq, dk, dv = torch.ops.flash_attention.backward(dout, q, k, v, out, L, *ctx.settings)
        if torch.is_grad_enabled():  # create_graph=True: someone may differentiate dq, dk, dv
            dq, dk, dv = _NoDoubleBackward.apply(dq, dk, dv, dout, q, k, v)
        return dq, dk, dv, None, None, None, None


class _NoDoubleBackward(torch.autograd.Function):
    """Passes dq, dk, dv through, and raises if anything differentiates them.

    The backward op is not differentiable, so without this the gradients taken with
    create_graph=True would not depend on q, k, v, dout at all, and a loss built from them
    (a gradient penalty) would silently lose its second-order term. The extra inputs
    (dout, q, k, v) make the gradients require grad exactly when the true ones would.
    """

    @staticmethod
    def forward(ctx, dq, dk, dv, *depends_on):
        return dq, dk, dv

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "flash_attention: double backward is not supported: the gradients of flash_attention "
            "were differentiated again (torch.autograd.grad(..., create_graph=True), then a backward "
            "through them, as a gradient penalty does). Use PyTorch's attention for that loss, e.g. "
            "torch.nn.functional.scaled_dot_product_attention with the math backend."
        )


# ----------------------------------------------------------------------------------------
# 4. The public API
# ----------------------------------------------------------------------------------------


def _valid_at_a_glance(q, k, v, causal, softmax_scale, deterministic, kernel) -> bool:
    """True for the usual valid call, in a few steps (a small model calls attention so often that
    _check_inputs' thoroughness shows in its step time); False sends it to _check_inputs."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return False
    qs, ks = q.shape, k.shape
    return (q.dtype is torch.float32 and k.dtype is torch.float32 and v.dtype is torch.float32
            and len(qs) in (3, 4) and len(ks) == len(qs) and qs[-1] == HEAD_DIM and ks[-1] == HEAD_DIM
            and ks == v.shape and qs[:-2] == ks[:-2] and (ks[-2] > 0 or qs[-2] == 0)
            and ((q.is_cuda and k.is_cuda and v.is_cuda and q.get_device() == k.get_device() == v.get_device())
                 or (q.is_cpu and k.is_cpu and v.is_cpu))
            and (causal is True or causal is False) and (softmax_scale is None or type(softmax_scale) is float
                                                         and math.isfinite(softmax_scale))
            and (deterministic is None or deterministic is True or deterministic is False)
            and (kernel is None or kernel in KERNELS))


def _check_inputs(q, k, v, causal, softmax_scale, deterministic, kernel) -> None:
    """Raise a TypeError or ValueError naming the argument, what was given and what is accepted."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(
                f"flash_attention: {name} has dtype {t.dtype}; only torch.float32 is accepted "
                f"(convert with {name}.float(): nothing is converted silently)"
            )
        if t.dim() not in (3, 4):
            raise ValueError(
                f"flash_attention: {name} has shape {tuple(t.shape)} ({t.dim()}-D); accepted: "
                f"4-D (B, H, N, {HEAD_DIM}) or 3-D (B, N, {HEAD_DIM}) for one head"
            )
        if t.shape[-1] != HEAD_DIM:
            raise ValueError(
                f"flash_attention: {name} has head_dim {t.shape[-1]} (shape {tuple(t.shape)}); "
                f"only head_dim {HEAD_DIM} is accepted"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"flash_attention: {name} is on {t.device}; accepted: cpu or cuda tensors")
    if not q.dim() == k.dim() == v.dim():
        raise ValueError(
            f"flash_attention: q, k, v must have the same rank; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have one shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"flash_attention: q and k must agree on the batch and head sizes {'(B, H)' if q.dim() == 4 else '(B)'}; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if not q.device == k.device == v.device:
        raise ValueError(
            f"flash_attention: q, k, v must be on one device; got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if k.shape[-2] == 0 and q.shape[-2] > 0 and q.numel() > 0:
        raise ValueError(
            f"flash_attention: k and v have no keys (Nk = 0, shape {tuple(k.shape)}) but q has "
            f"Nq = {q.shape[-2]} queries: a softmax over no keys is undefined; accepted: Nk >= 1"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be True or False, got {causal!r}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(
                f"flash_attention: softmax_scale must be None or a number, got {softmax_scale!r} "
                f"({type(softmax_scale).__name__})"
            )
        if not math.isfinite(softmax_scale):
            raise ValueError(f"flash_attention: softmax_scale must be a finite number, got {softmax_scale!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"flash_attention: deterministic must be None, True or False, got {deterministic!r}")
    if kernel is not None and not isinstance(kernel, str):
        raise TypeError(f"flash_attention: kernel must be None or a string, one of {KERNELS}, got {kernel!r}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"flash_attention: kernel must be None or one of {KERNELS}, got {kernel!r}")


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    deterministic: bool | None = None,
    kernel: str | None = None,
) -> Tensor:
    """softmax(softmax_scale * q k^T) v, computed tile by tile without the (Nq, Nk) matrix.

    Args:
        q: (B, H, Nq, 64) or (B, Nq, 64), float32.
        k, v: (B, H, Nk, 64) or (B, Nk, 64), float32, on q's device.
        causal: hide key j from query i when j > i (top-left aligned, as
            scaled_dot_product_attention(is_causal=True)).
        softmax_scale: defaults to 1 / sqrt(64).
        deterministic: None follows torch.are_deterministic_algorithms_enabled(); True makes
            the backward bit-reproducible and batch-invariant (dQ from partial buffers summed
            in a fixed order); False lets dQ use atomicAdd.
        kernel: which kernel family runs on CUDA tensors: None (the default: the fastest for
            the GPU, "hopper" on H100 and H200, "fast" elsewhere), "fast" (64x64 tiles on the
            tensor cores, FP32-accurate by 3xTF32), "tutorial" (the 16x16 teaching kernels,
            plain FP32 FMAs) or "hopper" (H100 and H200 only: the forward on warpgroup MMA,
            the backward of "fast"). Every family meets the same contract; name one to get the
            same bits on every GPU. CPU tensors run the PyTorch reference whatever kernel says.

    Returns:
        The attention output, with q's shape.
    """
    if not _valid_at_a_glance(q, k, v, causal, softmax_scale, deterministic, kernel):
        _check_inputs(q, k, v, causal, softmax_scale, deterministic, kernel)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(HEAD_DIM)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    one_head = q.dim() == 3
    if one_head:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    if q.is_cuda:
        if kernel is None:
            kernel = _default_kernel(q.get_device())
        elif _extension_module is None:
            _extension()  # registers the CUDA kernels
        out = torch.ops.flash_attention.attention.default(q, k, v, causal, float(softmax_scale), deterministic, kernel)
    else:  # the reference, whatever kernel says
        out, _ = _FlashAttentionFunction.apply(q, k, v, causal, float(softmax_scale), deterministic,
                                               kernel or KERNELS[0])
    return out.squeeze(1) if one_head else out


class FlashAttention(nn.Module):
    """flash_attention() as a module. It has no parameters: the projections that make q, k
    and v belong to the model around it.

    Args:
        head_dim: must be 64.
        causal, softmax_scale, deterministic, kernel: as in flash_attention().
    """

    def __init__(
        self,
        head_dim: int = HEAD_DIM,
        causal: bool = False,
        softmax_scale: float | None = None,
        deterministic: bool | None = None,
        kernel: str | None = None,
    ):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"FlashAttention: head_dim must be an int, {HEAD_DIM}; got {head_dim!r}")
        if head_dim != HEAD_DIM:
            raise ValueError(f"FlashAttention: head_dim must be {HEAD_DIM}, got {head_dim!r}")
        probe = torch.empty(1, 1, HEAD_DIM)
        _check_inputs(probe, probe, probe, causal, softmax_scale, deterministic, kernel)
        self.head_dim = head_dim
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.deterministic = deterministic
        self.kernel = kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flash_attention(q, k, v, self.causal, self.softmax_scale, self.deterministic, self.kernel)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, causal={self.causal}, softmax_scale={self.softmax_scale}, "
            f"deterministic={self.deterministic}, kernel={self.kernel}"
        )


# The installed kernels register themselves now, so that the ops run on CUDA tensors from the
# start; without them, the first CUDA call of flash_attention() compiles them (_extension()).
try:
    import flash_attention_cuda as _extension_module
except ImportError:  # not built here (_extension() says why when a CUDA call needs it)
    pass
