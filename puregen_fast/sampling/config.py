"""`SamplerConfig`: the frozen settings a sampler is built from (the engine's step counts,
sizes, seed, resolved device and precision, and how to compile); never the engine object itself.

It lives in the sampling layer, with the samplers it builds, and imports only what a sampler
needs (the paper's chain, the runtime's choices, the noise's seed range, the DDPM schedule): not
the purify configuration (`puregen_fast.config`), which knows data sets and their readers. The
engine (`puregen_fast.purifier`) makes one from its `EngineConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from puregen_fast import paper
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.noise import MAX_SEED
from puregen_fast.runtime import CONV_IMPLS, check_mode, check_precision

__all__ = ["SamplerConfig"]


@dataclass(frozen=True)
class SamplerConfig:
    """What a sampler is built from. ``cuda_graph=None``: capture on CUDA only. ``compile=False``
    keeps the models eager (tests, debugging); ``compile_mode`` is one of
    `runtime.COMPILE_MODES`; ``conv_impl`` one of `runtime.CONV_IMPLS` (the fast EBM's
    convolutions)."""

    ebm_steps: int = paper.LANGEVIN_STEPS
    ebm_eps: float = paper.LANGEVIN_EPS
    ebm_temp: float = paper.LANGEVIN_TEMP
    ddpm_steps: int = paper.DDPM_STEPS
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    compile: bool = True
    cuda_graph: bool | None = None
    compile_mode: str = "default"
    conv_impl: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if self.ebm_steps < 1 or self.ddpm_steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.ebm_steps}, {self.ddpm_steps}")
        if not (self.ebm_eps > 0 and self.ebm_temp > 0):
            raise ValueError(f"need eps > 0, temp > 0; got {self.ebm_eps}, {self.ebm_temp}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must lie in [0, 2**63); got {self.seed}")
        check_precision(self.precision)
        check_mode(self.compile_mode)
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(
                f"conv_impl must be one of {', '.join(CONV_IMPLS)}; got {self.conv_impl!r}"
            )
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph needs a CUDA device")

    @property
    def graphs(self) -> bool:
        """Whether the loops run as captured CUDA graphs."""
        return self.device.type == "cuda" if self.cuda_graph is None else self.cuda_graph

    def check_ddpm_steps(self, schedule: DDPMSchedule) -> None:
        if not 1 <= self.ddpm_steps < schedule.num_train_timesteps:
            raise ValueError(
                f"steps must lie in [1, {schedule.num_train_timesteps}); got {self.ddpm_steps}"
            )
