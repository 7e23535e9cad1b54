"""Runtime: device resolution, the precision context, ``torch.compile`` helpers and a
description of the device. A leaf: it imports nothing of ours.

``torch.compile`` as the samplers use it: static shapes, and room for many shapes. Dynamo keeps
at most ``recompile_limit`` (8 by default) compiled versions per code object, and every sampler's
gradient goes through the same code object (``torch.func.grad``'s wrapper), so a long process
(several batch shapes, precisions, models) would hit the limit, which with ``fullgraph=True`` is a
hard error. We raise it once, for the whole process.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = [
    "PRECISIONS",
    "COMPILE_MODES",
    "check_mode",
    "check_precision",
    "compile_static",
    "describe_device",
    "precision_context",
    "resolve_device",
]

PRECISIONS = ("fp32", "tf32", "bf16")

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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ValueError for a bad or unavailable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        msg = f"{str(device)!r} is not a device; use auto, cpu, cuda or cuda:N"
        raise ValueError(msg) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but no CUDA device is available; use --device cpu"
        )
    return dev


def describe_device(device: torch.device | None) -> dict[str, Any]:
    """The device as manifests and reports record it: name, torch (and CUDA or CPU threads)."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device is not None and device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Model math in fp32 (tf32 off), tf32 (matmul/conv on tensor cores) or bf16 (autocast).
    The state x stays fp32 in every mode. cuDNN is held to deterministic algorithms, so a fixed
    batch size gives bit-identical results (DESIGN 2.2; some input-gradient convolutions would
    otherwise sum with atomics)."""
    check_precision(precision)
    b = torch.backends
    old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic)
    tf32 = precision == "tf32"
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = tf32
    b.cudnn.deterministic = True
    try:
        if precision == "bf16":
            # no weight-cast cache: CUDA graph capture must not keep autocast's cached casts
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic = old


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_static(fn: F, fullgraph: bool = True, mode: str = "default") -> F:
    """``torch.compile`` with static shapes, after raising dynamo's recompile limits."""
    check_mode(mode)
    cfg = torch._dynamo.config
    for name, value in _LIMITS.items():
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, mode=mode)
