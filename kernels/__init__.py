"""Triton kernels of the fast path, installed as ``puregen_fast.kernels`` (DESIGN 6).

Each kernel has an eager twin (plain torch, same signature and noise) that runs anywhere; use
`triton_available` to pick.

What the kernels import (DESIGN 1: kernels sit above models, below sampling). Kernels know
tensors only, plus:

* ``torch``, and ``triton`` where it is installed (without it the modules still import and the
  eager twins run);
* `puregen_fast.noise`: the keyed noise stream they reproduce (`randn`, the ``STREAM_*`` ids,
  the id and stream limits), in `_launch`, `langevin` and `ddpm`;
* `puregen_fast.models.schedule`, in `ddpm` only: the DDPM coefficient table's column layout
  (``COL_*``, ``N_COLS``) and `ddpm_coefficients`, the paper's table used when none is given;
* each other: `_launch` holds what every launcher shares (triton or its stand-in, argument
  checks, block sizes, device guard), used by `_noise`, `langevin`, `ddpm`, `ebm_conv` and
  `availability`; `_noise` holds the keyed stream in Triton (the Philox helpers the update
  kernels call, and `randn_triton`/`philox_triton`), used by `langevin` and `ddpm`.

Nothing else of the package: never the sampling layer, the engine, the reference or the
configuration.
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
