"""Shared test setup.

Without a GPU, Triton kernels run in the CPU interpreter (DESIGN 8). ``TRITON_INTERPRET`` is read
when a ``@triton.jit`` function is defined, i.e. when `puregen_fast.kernels` is first imported,
which any test module may do at collection; so it is set here, before any test module loads. On
a CUDA machine it is left alone so the kernels compile for the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
