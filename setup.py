"""Builds the CUDA extension `flash_attention_cuda` beside flash_attention.py, where it can.

    pip install --no-build-isolation -e .        (./install.sh does this)

The kernels are compiled for the GPUs that PyTorch sees, or for TORCH_CUDA_ARCH_LIST when it
is set (e.g. TORCH_CUDA_ARCH_LIST="9.0"). Where they cannot be (a CPU-only PyTorch, no nvcc, a
partial CUDA toolkit, no GPU and no TORCH_CUDA_ARCH_LIST), or their build fails, only the
Python module is installed, and one line says why: CPU tensors run the PyTorch reference, and
the first CUDA call compiles the kernels or says what is missing.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils import cpp_extension

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build backends do not put it there
from flash_attention import COMPILE_FLAGS, cuda_build_blockers, nvcc_flags  # noqa: E402  (the flags of both builds)


class BuildKernelsIfPossible(cpp_extension.BuildExtension):
    """PyTorch's BuildExtension, except that a failed build installs the Python module alone."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # the compiler's errors, or PyTorch's own checks of the toolkit
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"setup.py: the CUDA kernels failed to build ({first}); installing the Python module alone")
            self.extensions = []


class BuildPyWithKernelSource(build_py):
    """Installs flash_attention.cu beside flash_attention.py: where the kernels were not built
    here, the first CUDA call compiles them from it."""

    def run(self):
        super().run()
        self.copy_file("flash_attention.cu", str(Path(self.build_lib, "flash_attention.cu")))


ext_modules = []
blockers = cuda_build_blockers(need_gpu_arch=True)
if blockers:
    print(f"setup.py: not building the CUDA kernels; missing: {'; '.join(blockers)}")
else:
    ext_modules.append(
        cpp_extension.CUDAExtension(
            name="flash_attention_cuda",
            sources=["flash_attention.cu"],
            extra_compile_args={"cxx": COMPILE_FLAGS, "nvcc": nvcc_flags()},
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildKernelsIfPossible, "build_py": BuildPyWithKernelSource})
