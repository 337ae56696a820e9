"""The kernels compile with nvcc alone (no PyTorch headers) and spill no registers; what stops a
build of the extension is named."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "flash_attention.cu"


def compile_without_spills(*nvcc_args) -> tuple[str, list[str]]:
    """Runs nvcc with ptxas's report; asserts that it compiled, that no kernel spilled and that
    ptxas neither serialised wgmma (C7518: a chain in flight across a branch) nor waited inside
    a chain (C7517: an accumulator moved between its wgmma). Returns the report and the kernels'
    names."""
    result = subprocess.run(["nvcc", "-O3", "-Xptxas", "-v", *nvcc_args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels), report
    assert all(s == ("0", "0") for s in spills), report
    assert "C7518" not in report and "C7517" not in report, report
    return report, kernels


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit), not found on PATH")
@pytest.mark.parametrize("arch", ["arch=compute_90,code=sm_90", "arch=compute_90a,code=sm_90a"])
def test_kernels_compile_without_spills(tmp_path, arch):
    # sm_90a, as the build compiles for Hopper, holds Part III's kernel; sm_90 an empty stand-in for it
    report, kernels = compile_without_spills("-gencode", arch, "-DFLASH_ATTENTION_SM90A", "-c", str(SOURCE), "-o",
                                             str(tmp_path / "fa.o"))
    assert len(kernels) >= 8 and any("hopper" in kernel for kernel in kernels), report
    assert "stack frame" in report and not re.search(r"[1-9]\d* bytes stack frame", report), report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit), not found on PATH")
@pytest.mark.parametrize("name", ["wgmma_tf32", "hopper_forward", "hopper_backward"])
def test_hopper_benchmarks_compile_for_sm90a_without_spills_or_serialised_wgmma(tmp_path, name):
    source = SOURCE.parent / "benchmarks" / f"{name}.cu"
    report, kernels = compile_without_spills("-gencode", "arch=compute_90a,code=sm_90a", str(source), "-o",
                                             str(tmp_path / name))
    assert len(kernels) >= 1, report


@pytest.mark.parametrize("arch_list,hopper", [("9.0", True), ("8.0;9.0+PTX", True), ("9.0a", True), ("8.0;8.6", False)])
def test_hopper_targets_build_as_sm90a_with_part_iii(monkeypatch, arch_list, hopper):
    import flash_attention as fa

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    flags = fa.nvcc_flags()
    assert ("-DFLASH_ATTENTION_SM90A" in flags) == hopper, flags
    assert ("-gencode=arch=compute_90a,code=sm_90a" in flags) == hopper, flags
    assert "-gencode=arch=compute_90,code=sm_90" not in flags, flags  # Hopper's code is sm_90a's


@pytest.mark.skipif(__import__("torch").version.cuda is not None, reason="this PyTorch is a CUDA build")
def test_cpu_only_pytorch_says_what_is_missing():
    import flash_attention as fa

    with pytest.raises(RuntimeError, match="missing: a CUDA build of PyTorch .*CPU-only.*install.sh"):
        fa._compile_extension()


# ---------------------------------------------------------------------------- what stops a build

def fake_toolkit(tmp_path, complaint=None):
    """A CUDA_HOME whose bin/nvcc succeeds, or fails with `complaint` as a real nvcc does."""
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    body = f'echo "probe.cu:1:10: fatal error: {complaint}" >&2; exit 1' if complaint else "exit 0"
    nvcc.write_text(f"#!/bin/sh\n{body}\n")
    nvcc.chmod(0o755)
    return str(tmp_path)


@pytest.fixture
def cuda_pytorch_without_gpu(monkeypatch):
    import flash_attention as fa
    from torch.utils import cpp_extension

    monkeypatch.setattr(fa.torch.version, "cuda", "13.0")
    monkeypatch.setattr(fa.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(fa, "_extension_module", None)
    return fa, cpp_extension


def test_partial_toolkit_and_no_gpu_are_named(tmp_path, monkeypatch, cuda_pytorch_without_gpu):
    fa, cpp_extension = cuda_pytorch_without_gpu
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", fake_toolkit(tmp_path, "cusparse.h: No such file or directory"))
    blockers = fa.cuda_build_blockers(need_gpu_arch=True)
    assert len(blockers) == 2, blockers
    assert "cusparse.h: No such file or directory" in blockers[0] and str(tmp_path) in blockers[0]
    assert "a GPU to build for" in blockers[1] and "TORCH_CUDA_ARCH_LIST" in blockers[1]
    if importlib.util.find_spec("flash_attention_cuda") is None:
        status = fa.cuda_kernels_status()
        assert "not built" in status and "cusparse.h" in status and "raises an error" in status
    with pytest.raises(RuntimeError, match="missing: a complete CUDA toolkit .*cusparse.h"):
        fa._compile_extension()


def test_complete_toolkit_without_gpu_builds_on_first_use_or_for_the_arch_list(tmp_path, monkeypatch,
                                                                              cuda_pytorch_without_gpu):
    fa, cpp_extension = cuda_pytorch_without_gpu
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", fake_toolkit(tmp_path))
    assert fa.cuda_build_blockers() == []
    assert "a GPU to build for" in fa.cuda_build_blockers(need_gpu_arch=True)[0]
    if importlib.util.find_spec("flash_attention_cuda") is None:
        status = fa.cuda_kernels_status()
        assert "no GPU was found" in status and "the first CUDA call compiles them" in status
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert fa.cuda_build_blockers(need_gpu_arch=True) == []


def test_no_toolkit_is_named(monkeypatch, cuda_pytorch_without_gpu):
    fa, cpp_extension = cuda_pytorch_without_gpu
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    expected = ["the CUDA toolkit (nvcc not found on PATH and CUDA_HOME not set)"]
    assert fa.cuda_build_blockers(need_gpu_arch=True) == expected
