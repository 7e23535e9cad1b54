"""The fast DDPM purification loop (the sampler; the fused kernels it launches are
`puregen_fast.kernels.ddpm`): compiled UNet, fused noising and posterior kernels, one CUDA graph
for the whole reverse loop.

Same algorithm and noise as `reference.ddpm_purify`: forward-noise to ``t = steps`` with keyed
draw 0, then reverse ``t = steps-1 .. 0`` with keyed draw ``i`` at reverse step ``i`` (none at
t = 0). The UNet is compiled once (``fullgraph=True``) with the timestep as a 0-d device tensor,
so changing t never recompiles; on CUDA the forward noising and every reverse step are captured
in one graph over static buffers, with seed, timesteps, step numbers and sample ids read from
device memory. The state x is float32; ``precision`` sets the UNet math. Built from a
`SamplerConfig`; `backends.FastSampler` and `backends.DDPMSampler` drive it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from puregen_fast.kernels import ddpm as kddpm
from puregen_fast.kernels.availability import triton_available
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.runtime import compile_static, precision_context
from puregen_fast.sampling.config import SamplerConfig
from puregen_fast.sampling.cuda_graphs import LoopGraphs

__all__ = ["FastDDPM"]


def _update_fns(device: torch.device, compile: bool) -> tuple[Callable, Callable, str]:
    if device.type == "cuda":
        ok, why = triton_available()
        if ok:
            return kddpm.ddpm_add_noise_, kddpm.ddpm_step_, "triton kernels"
        return kddpm.ddpm_add_noise_eager, kddpm.ddpm_step_eager, f"eager twins ({why})"
    if not compile:
        return kddpm.ddpm_add_noise_eager, kddpm.ddpm_step_eager, "eager twins (CPU)"
    # compiled, the twins' counter-based noise is one fused loop (far faster than eager on CPU)
    add, step = (
        compile_static(f, fullgraph=False)
        for f in (kddpm.ddpm_add_noise_eager, kddpm.ddpm_step_eager)
    )
    return add, step, "compiled eager twins (CPU)"


class FastDDPM:
    """``FastDDPM(cfg, unet, schedule).run(x, ids, stream, pad_to)``; see the module doc."""

    def __init__(self, cfg: SamplerConfig, unet: nn.Module, schedule: DDPMSchedule) -> None:
        cfg.check_ddpm_steps(schedule)
        self.cfg, self.unet, self.schedule = cfg, unet, schedule
        self.device = dev = cfg.device
        self.cuda_graph = cfg.graphs
        self._add_noise, self._step, self.update_impl = _update_fns(dev, cfg.compile)
        self._coef = schedule.coefficients(dev)
        self._net = compile_static(unet, mode=cfg.compile_mode) if cfg.compile else unet
        self._seed = torch.tensor(cfg.seed, dtype=torch.int64, device=dev)
        steps = cfg.ddpm_steps
        # reverse step i runs at t = steps - i; draw 0 is the forward noise
        self._t = torch.arange(steps, -1, -1, dtype=torch.int64, device=dev)  # [steps, ..., 0]
        self._graphs = LoopGraphs(dev, steps + 1, self._loop, self._warmup, units=steps)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (tests check there is no re-capture)."""
        return self._graphs.captures

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with precision_context(self.cfg.precision, self.device):
            out = self._net(x, t)
        return out if isinstance(out, torch.Tensor) else out[0]

    def _kw(self, ids: torch.Tensor, stream: int) -> dict:
        return {"seed": self._seed, "sample_ids": ids, "stream": stream, "coefficients": self._coef}

    def _loop(self, x: torch.Tensor, ids: torch.Tensor, stream: int, draws: torch.Tensor,
              progress: Callable[[int], object] | None = None) -> None:  # fmt: skip
        """Forward noise with draw 0, then reverse step i at t = steps - i with draw i;
        ``progress`` told of each reverse step (host side, between the compiled UNet calls)."""
        kw = self._kw(ids, stream)
        self._add_noise(x, self._t[0], step=draws[0], **kw)
        for i in range(1, self.cfg.ddpm_steps + 1):
            t = self._t[i]
            self._step(x, self._eps(x, t), t, step=draws[i], **kw)
            if progress is not None:
                progress(1)

    def _warmup(self, x: torch.Tensor, ids: torch.Tensor, stream: int, draws: torch.Tensor) -> None:
        kw = self._kw(ids, stream)
        for _ in range(2):
            self._add_noise(x, self._t[0], step=draws[0], **kw)
            self._step(x, self._eps(x, self._t[1]), self._t[1], step=draws[1], **kw)

    @torch.no_grad()
    def run(
        self, x: torch.Tensor, ids: torch.Tensor, stream: int, pad_to: int | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x float32 (B, C, H, W) and int64 ids on the device; returns a new tensor.
        ``pad_to``: the largest batch to expect, where sizes vary (`LoopGraphs`); ``progress``:
        told of the reverse steps done (each step, or a whole CUDA graph replay)."""
        return self._graphs.run(x, ids, stream, 0, pad_to, graph=self.cuda_graph,
                                progress=progress)  # fmt: skip
