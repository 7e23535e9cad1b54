"""The fast backend of the `Purifier`: `LangevinSampler` for the EBM, `DDPMSampler` for the DDPM.

On CUDA: compiled models, fused Triton updates, each K-step loop one CUDA graph. On CPU: the
compiled models with the kernels' eager twins (DESIGN 6, 8). Same keyed noise as the reference,
so the two agree trajectory by trajectory (DESIGN 2.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from puregen_fast import noise as pgnoise
from puregen_fast.ddpm_sampler import DDPMSampler
from puregen_fast.langevin import LangevinSampler

if TYPE_CHECKING:
    from puregen_fast.purifier import Purifier

__all__ = ["available", "FastSampler"]


def available(device: torch.device, precision: str) -> tuple[bool, str]:
    """Whether the fast path runs on ``device`` in ``precision``, and why (or why not)."""
    try:
        import puregen_fast.kernels.langevin  # noqa: F401
    except ImportError as e:
        return False, f"kernels not importable ({e})"
    if device.type == "cuda":
        from puregen_fast.kernels.availability import triton_available

        ok, why = triton_available()
        impl = "Triton kernels" if ok else f"eager update twins ({why})"
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return False, "this GPU has no bf16 support"
        return True, f"CUDA: torch.compile + CUDA graphs + {impl}"
    if device.type == "cpu":
        if precision == "bf16":
            return False, "bf16 model math is GPU-only; use fp32 on CPU"
        return True, "CPU: torch.compile'd models and update twins (no CUDA graphs)"
    return False, f"no fast path for device type {device.type!r}"


class FastSampler:
    name = "fast"

    def __init__(self, p: Purifier) -> None:
        self.p = p
        self.langevin = (
            LangevinSampler(
                p.ebm,
                p.ebm_steps,
                p.ebm_eps,
                p.ebm_temp,
                p.seed,
                device=p.device,
                precision=p.precision,
            )
            if p.ebm is not None
            else None
        )
        self.diffusion = (
            DDPMSampler(
                p.ddpm, p.schedule, p.ddpm_steps, p.seed, device=p.device, precision=p.precision
            )
            if p.ddpm is not None
            else None
        )

    def ebm(
        self, x: torch.Tensor, ids: torch.Tensor, rep: int = 0, pad_to: int | None = None
    ) -> torch.Tensor:
        assert self.langevin is not None
        stream = pgnoise.stream_id(pgnoise.STREAM_EBM, rep)
        return self.langevin(x, ids, stream=stream, pad_to=pad_to)

    def ddpm(
        self, x: torch.Tensor, ids: torch.Tensor, rep: int = 0, pad_to: int | None = None
    ) -> torch.Tensor:
        assert self.diffusion is not None
        stream = pgnoise.stream_id(pgnoise.STREAM_DDPM, rep)
        return self.diffusion(x, ids, stream=stream, pad_to=pad_to)
