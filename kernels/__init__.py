"""Triton kernels of the fast path, installed as ``puregen_fast.kernels`` (DESIGN 6).

Each kernel has an eager twin (plain torch, same signature and noise) that runs anywhere; use
`triton_available` to pick. Kernels know tensors only; the one import from the package is the
keyed noise stream they reproduce (`puregen_fast.noise`).
"""

from ._noise import philox_triton, randn_triton
from .availability import triton_available
from .ddpm import (
    ddpm_add_noise_,
    ddpm_add_noise_eager,
    ddpm_step_,
    ddpm_step_eager,
)
from .langevin import langevin_step_, langevin_step_eager

__all__ = [
    "triton_available",
    "randn_triton",
    "philox_triton",
    "langevin_step_",
    "langevin_step_eager",
    "ddpm_add_noise_",
    "ddpm_add_noise_eager",
    "ddpm_step_",
    "ddpm_step_eager",
]
