"""Builds the CUDA extension `flash_attention_cuda` beside flash_attention.py.

    pip install --no-build-isolation -e .        (./install.sh does this)

The kernels are compiled for the GPUs that PyTorch sees, or for TORCH_CUDA_ARCH_LIST
when it is set (e.g. TORCH_CUDA_ARCH_LIST="9.0"). With a CPU-only PyTorch or without
nvcc, only the Python module is installed: CPU tensors run the PyTorch reference, and
the first CUDA call says what is missing.
"""

import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build backends do not put it there
from flash_attention import COMPILE_FLAGS  # noqa: E402  (one list of flags for both builds)

ext_modules = []
if cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None:
    ext_modules.append(
        cpp_extension.CUDAExtension(
            name="flash_attention_cuda",
            sources=["flash_attention.cu"],
            extra_compile_args={"cxx": COMPILE_FLAGS, "nvcc": COMPILE_FLAGS},
        )
    )
else:
    print("setup.py: no CUDA build of PyTorch or no nvcc: installing the CPU reference only")

setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension})
