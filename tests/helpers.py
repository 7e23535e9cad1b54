"""Helpers shared by the tests (importable by name: pyproject puts tests/ on the path)."""

from __future__ import annotations

import pytest
import torch

from puregen_fast.kernels.availability import triton_available

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAD = 31  # NaN elements on each side of a kernel's buffer


def padded(shape: tuple[int, ...], fill: torch.Tensor, pad: int = PAD) -> tuple:
    """A contiguous view of ``fill``'s values inside a NaN-poisoned buffer (``pad`` elements on
    both sides), so a kernel that writes out of bounds, or leaves an element unwritten, shows."""
    n = fill.numel()
    buf = torch.full((n + 2 * pad,), float("nan"), dtype=fill.dtype, device=fill.device)
    view = buf[pad : pad + n].view(shape)
    view.copy_(fill)
    return buf, view


def pads_untouched(buf: torch.Tensor, n: int, pad: int = PAD) -> bool:
    return bool(buf[:pad].isnan().all() and buf[pad + n :].isnan().all())


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    """Max abs error within ``tol`` times the larger of 1 and the reference's magnitude."""
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def require_kernels() -> None:
    """Skip, with the reason, where the Triton kernels cannot run."""
    ok, why = triton_available(DEV)
    if not ok:
        pytest.skip(f"Triton kernels cannot run here: {why}")
