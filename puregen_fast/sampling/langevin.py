"""The fast EBM Langevin loop (the sampler; the fused update kernel it launches is
`puregen_fast.kernels.langevin`): compiled energy gradient, fused update, one CUDA graph.

``x <- x - (eps^2 / 2) * grad_x(sum E(x) / temp) + eps * z`` for ``steps`` steps, z from the keyed
stream (`pg.noise`, step ``step_offset + i``), exactly the reference's algorithm:

* the EBM runs with average pooling folded into the preceding convolutions (`FoldedEBM`,
  about 1.6x fewer FLOPs, the same function);
* the gradient is ``torch.func.grad`` of the summed energy (plain ``torch.autograd.grad`` breaks a
  fullgraph compile), compiled once per input shape with ``torch.compile(fullgraph=True)``; it
  differentiates w.r.t. x only, so a model being trained can be sampled from;
* the update is the fused Triton kernel ``langevin_step_`` on CUDA (one pass: gradient step plus
  fresh noise), its eager twin elsewhere;
* on CUDA the whole K-step loop is captured once per (shape, stream) in a CUDA graph over static
  buffers; seed, step numbers and sample ids live in device memory and are refreshed before each
  replay, so every replay draws fresh noise. A smaller batch is padded to the captured shape.

The state x is float32 in every precision; ``precision`` sets the model math (fp32, tf32, bf16).
Built from a `SamplerConfig`; `backends.FastSampler` and `backends.LangevinSampler` drive it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from puregen_fast.config import SamplerConfig
from puregen_fast.kernels import langevin as klangevin
from puregen_fast.kernels.availability import triton_available
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.models.ebm_folded import FoldedEBM
from puregen_fast.runtime import compile_static, precision_context
from puregen_fast.sampling.cuda_graphs import LoopGraphs

__all__ = ["FastLangevin"]


def _update_fn(device: torch.device, compile: bool) -> tuple[Callable, str]:
    """The fused kernel where Triton runs on this device, else the eager twin."""
    if device.type == "cuda":
        ok, why = triton_available()
        if ok:
            return klangevin.langevin_step_, "triton kernel"
        return klangevin.langevin_step_eager, f"eager twin ({why})"
    if not compile:
        return klangevin.langevin_step_eager, "eager twin (CPU)"
    # compiled, the twin's counter-based noise is one fused loop (about 300x faster on CPU)
    return compile_static(
        klangevin.langevin_step_eager, fullgraph=False
    ), "compiled eager twin (CPU)"


class FastLangevin:
    """``FastLangevin(cfg, ebm).run(x, ids, stream, step_offset, pad_to)``: ``cfg.ebm_steps``
    Langevin steps; see the module doc."""

    def __init__(self, cfg: SamplerConfig, ebm: nn.Module) -> None:
        self.cfg, self.ebm = cfg, ebm
        self.device = cfg.device
        self.cuda_graph = cfg.graphs
        self._update, self.update_impl = _update_fn(self.device, cfg.compile)
        self._grad = self._make_grad()
        self._seed = torch.tensor(cfg.seed, dtype=torch.int64, device=self.device)
        self._graphs = LoopGraphs(self.device, cfg.ebm_steps, self._loop, self._warmup)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (tests check there is no re-capture)."""
        return self._graphs.captures

    def _make_grad(self) -> Callable[[torch.Tensor], torch.Tensor]:
        ebm, temp = self.ebm, self.cfg.ebm_temp
        if isinstance(ebm, EBMSNGAN32):
            ebm = FoldedEBM(ebm)  # pooling folded into the convs: 1.6x fewer FLOPs

        def energy_sum(x: torch.Tensor) -> torch.Tensor:
            return ebm(x).float().sum() / temp

        g = torch.func.grad(energy_sum)
        return compile_static(g, mode=self.cfg.compile_mode) if self.cfg.compile else g

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), precision_context(self.cfg.precision, self.device):
            return self._grad(x)

    def _step(self, x: torch.Tensor, ids: torch.Tensor, stream: int, step) -> None:
        eps = self.cfg.ebm_eps
        self._update(  # in place, kernel and eager twin alike
            x,
            self.grad(x),
            grad_scale=eps**2 / 2,
            noise_scale=eps,
            seed=self._seed,
            step=step,
            sample_ids=ids,
            stream=stream,
        )

    def _loop(self, x: torch.Tensor, ids: torch.Tensor, stream: int, steps: torch.Tensor) -> None:
        for i in range(self.cfg.ebm_steps):
            self._step(x, ids, stream, steps[i])

    def _warmup(self, x: torch.Tensor, ids: torch.Tensor, stream: int, steps: torch.Tensor) -> None:
        for _ in range(2):
            self._step(x, ids, stream, steps[0])

    @torch.no_grad()
    def run(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        stream: int,
        step_offset: int = 0,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """x float32 (B, C, H, W) and int64 ids on the device; returns a new tensor.
        ``pad_to``: the largest batch to expect, where sizes vary (`LoopGraphs`)."""
        return self._graphs.run(x, ids, stream, step_offset, pad_to, graph=self.cuda_graph)
