"""``torch.compile`` as the samplers use it: static shapes, and room for many shapes.

Dynamo keeps at most ``recompile_limit`` (8 by default) compiled versions per code object, and
every sampler's gradient goes through the same code object (``torch.func.grad``'s wrapper), so a
long process (several batch shapes, precisions, models) would hit the limit, which with
``fullgraph=True`` is a hard error. We raise it once, for the whole process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["COMPILE_MODES", "check_mode", "compile_static"]

# the samplers capture their own CUDA graphs, so no mode that makes inductor capture one;
# max-autotune-no-cudagraphs also tries inductor's Triton convolution and matmul templates
# (which take fused epilogues) against cuDNN/cuBLAS, at a much longer compile
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

F = TypeVar("F", bound=Callable)
_LIMITS = {  # the names moved between torch releases; set whichever this torch has
    "recompile_limit": 64,
    "cache_size_limit": 64,
    "accumulated_recompile_limit": 1024,
    "accumulated_cache_size_limit": 1024,
}


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_static(fn: F, fullgraph: bool = True, mode: str = "default") -> F:
    check_mode(mode)
    cfg = torch._dynamo.config
    for name, value in _LIMITS.items():
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, mode=mode)
