"""The fast DDPM purification sampler: compiled UNet, fused noising and posterior kernels, one
CUDA graph for the whole reverse loop.

Same algorithm and noise as `reference.ddpm_purify`: forward-noise to ``t = steps`` with keyed
draw 0, then reverse ``t = steps-1 .. 0`` with keyed draw ``i`` at reverse step ``i`` (none at
t = 0). The UNet is compiled once (``fullgraph=True``) with the timestep as a 0-d device tensor,
so changing t never recompiles; on CUDA the forward noising and every reverse step are captured
in one graph over static buffers, with seed, timesteps, step numbers and sample ids read from
device memory. The state x is float32; ``precision`` sets the UNet math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from puregen_fast import noise as pgnoise
from puregen_fast import reference
from puregen_fast.compiled import check_mode, compile_static
from puregen_fast.cuda_graphs import LoopGraphs
from puregen_fast.langevin import model_context
from puregen_fast.schedule import DDPMSchedule

__all__ = ["DDPMSampler"]


def _update_fns(device: torch.device, compile: bool) -> tuple[Callable, Callable, str]:
    from puregen_fast.kernels import ddpm as kddpm

    if device.type == "cuda":
        from puregen_fast.kernels.availability import triton_available

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


class DDPMSampler:
    """``DDPMSampler(unet, schedule, steps, seed, ...)(x, sample_ids, stream)``; see module doc.
    ``compile_mode`` is one of `compiled.COMPILE_MODES`."""

    def __init__(
        self,
        unet: nn.Module,
        schedule: DDPMSchedule,
        steps: int = 75,
        seed: int = 0,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        backend: str = "auto",
        compile: bool = True,
        cuda_graph: bool | None = None,
        compile_mode: str = "default",
    ) -> None:
        if not 1 <= steps < schedule.num_train_timesteps:
            raise ValueError(f"steps must lie in [1, {schedule.num_train_timesteps}); got {steps}")
        check_mode(compile_mode)
        self.unet, self.schedule, self.steps, self.seed = unet, schedule, steps, seed
        self.device = torch.device(device)
        self.precision = precision
        self.backend = "reference" if backend == "reference" else "fast"
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        self._add_noise, self._step, self.update_impl = _update_fns(
            self.device, compile and self.backend == "fast"
        )
        self._coef = self._coefficients()
        net = unet
        if compile and self.backend == "fast":
            net = compile_static(unet, mode=compile_mode)
        self._net = net
        dev = self.device
        self._seed = torch.tensor(seed, dtype=torch.int64, device=dev)
        # reverse step i runs at t = steps - i; draw 0 is the forward noise
        self._t = torch.arange(steps, -1, -1, dtype=torch.int64, device=dev)  # [steps, ..., 0]
        self._graphs = LoopGraphs(dev, steps + 1, self._loop, self._warmup)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (tests check there is no re-capture)."""
        return self._graphs.captures

    def _coefficients(self) -> torch.Tensor:
        from puregen_fast.kernels.ddpm import ddpm_coefficients

        s = self.schedule
        return ddpm_coefficients(
            s.num_train_timesteps, s.beta_start, s.beta_end, device=self.device
        )

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with model_context(self.precision, self.device):
            out = self._net(x, t)
        return out if isinstance(out, torch.Tensor) else out[0]

    def _loop(self, x: torch.Tensor, ids: torch.Tensor, stream: int, draws: torch.Tensor) -> None:
        """Forward noise with draw 0, then reverse step i at t = steps - i with draw i."""
        kw = {"seed": self._seed, "sample_ids": ids, "stream": stream, "coefficients": self._coef}
        self._add_noise(x, self._t[0], step=draws[0], **kw)
        for i in range(1, self.steps + 1):
            t = self._t[i]
            self._step(x, self._eps(x, t), t, step=draws[i], **kw)

    def _warmup(self, x: torch.Tensor, ids: torch.Tensor, stream: int, draws: torch.Tensor) -> None:
        kw = {"seed": self._seed, "sample_ids": ids, "stream": stream, "coefficients": self._coef}
        for _ in range(2):
            self._add_noise(x, self._t[0], step=draws[0], **kw)
            self._step(x, self._eps(x, self._t[1]), self._t[1], step=draws[1], **kw)

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        sample_ids: torch.Tensor,
        stream: int = pgnoise.STREAM_DDPM,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """Purify x (float32, (B, C, H, W)); ``pad_to``: the largest batch to expect, where sizes
        vary (`LoopGraphs`)."""
        x = x.to(self.device, torch.float32)
        ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=self.device).reshape(-1)
        if ids.numel() != x.shape[0]:
            raise ValueError(f"{ids.numel()} sample ids for {x.shape[0]} images")
        if self.backend == "reference":
            seed = self.seed

            def z(i: int) -> torch.Tensor:
                return pgnoise.randn(seed, stream, i, ids, x.shape[1:])

            with model_context(self.precision, self.device):
                out = reference.ddpm_purify(
                    self.unet, self.schedule, x, self.steps, noise=z, check_range=False
                )
            return out.float()
        return self._graphs.run(x, ids, stream, 0, pad_to, graph=self.cuda_graph)
