"""The kernels compile with nvcc alone (no PyTorch headers) and spill no registers."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "flash_attention.cu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit), not found on PATH")
def test_kernels_compile_without_spills(tmp_path):
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", str(SOURCE), "-o", str(tmp_path / "fa.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(kernels) >= 4, report
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels), report
    assert all(s == ("0", "0") for s in spills), report
    assert "stack frame" in report and not re.search(r"[1-9]\d* bytes stack frame", report), report


@pytest.mark.skipif(__import__("torch").version.cuda is not None, reason="this PyTorch is a CUDA build")
def test_cpu_only_pytorch_says_what_is_missing():
    import flash_attention as fa

    with pytest.raises(RuntimeError, match="missing: a CUDA build of PyTorch .*CPU-only.*install.sh"):
        fa._compile_extension()
