"""Can the Triton kernels run here? (DESIGN 6, 8)

The Purifier falls back to the eager twins where they cannot, and ``puregen-fast info`` reports
the reason string.
"""

import os

import torch

__all__ = ["triton_available"]


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(ok, why)``: whether `puregen_fast.kernels`' Triton kernels run on ``device`` (default:
    CUDA if present, else CPU). True on a CUDA device with triton importable, or anywhere when the
    kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` set before
    `puregen_fast.kernels` was imported; slow, for tests)."""
    try:
        import triton
    except ImportError as e:
        return False, f"triton is not importable ({e}); the eager twins run instead"
    from ._launch import kernels_interpreted

    if kernels_interpreted():
        return True, (
            f"triton {triton.__version__} CPU interpreter (TRITON_INTERPRET=1): correct but slow, "
            "for tests"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        hint = ""
        if os.environ.get("TRITON_INTERPRET") == "1":
            hint = " (TRITON_INTERPRET=1 was set after puregen_fast.kernels was imported)"
        return False, f"no CUDA device for the Triton kernels on {dev}{hint}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if torch.version.hip is None:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        name = torch.cuda.get_device_name(idx)
        if major < 7:
            return False, f"{name} (sm_{major}{minor}) is older than Triton's minimum sm_70"
        return True, f"triton {triton.__version__} on {name} (sm_{major}{minor})"
    return True, f"triton {triton.__version__} on ROCm device {torch.cuda.get_device_name(dev)}"
