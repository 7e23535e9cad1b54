"""The fast EBM Langevin loop (the sampler; the fused update kernel it launches is
`puregen_fast.kernels.langevin`): compiled energy gradient, fused update, one CUDA graph.

``x <- x - (eps^2 / 2) * grad_x(sum E(x) / temp) + eps * z`` for ``steps`` steps, z from the keyed
stream (`pg.noise`, step ``step_offset + i``), exactly the reference's algorithm:

* the EBM runs with average pooling folded into the preceding convolutions (`FoldedEBM`,
  about 1.6x fewer FLOPs, the same function);
* the gradient is ``torch.func.grad`` of the summed energy (plain ``torch.autograd.grad`` breaks a
  fullgraph compile), compiled once per input shape with ``torch.compile(fullgraph=True)``; it
  differentiates w.r.t. x only, so a model being trained can be sampled from;
* ``conv_impl``: the gradient above ("torch"), or `conv_grad.ConvEnergyGrad`, the fused Triton
  conv-block kernels ("triton", not compiled: the kernels are the graph); "auto" takes Triton on
  CUDA only where it measured faster, timed once at the first batch shape before any capture
  (``conv_impl_reason`` has both times), and torch on CPU;
* the update is the fused Triton kernel ``langevin_step_`` on CUDA (one pass: gradient step plus
  fresh noise), its eager twin elsewhere; on CPU the twin is compiled into the gradient's graph
  (inductor fuses noise and update into one loop), with the model on channels-last tensors for
  oneDNN and the step number a 0-d tensor, so one graph serves every step;
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

from puregen_fast.kernels import langevin as klangevin
from puregen_fast.kernels.availability import triton_available
from puregen_fast.models.ebm import EBMSNGAN32
from puregen_fast.models.ebm_folded import FoldedEBM
from puregen_fast.runtime import compile_static, precision_context
from puregen_fast.sampling.config import SamplerConfig
from puregen_fast.sampling.conv_grad import ConvEnergyGrad, conv_kernels_usable
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
        # conv_impl: "torch" (the compiled gradient above), "triton" (`ConvEnergyGrad`), or
        # "auto" until `_measure_conv` has timed both at the first batch shape
        self._conv_grad: ConvEnergyGrad | None = None
        self.conv_impl, self.conv_impl_reason = self._pick_conv_impl()
        self._seed = torch.tensor(cfg.seed, dtype=torch.int64, device=self.device)
        self._graphs = LoopGraphs(self.device, cfg.ebm_steps, self._loop, self._warmup)
        self._fused = None
        if self.device.type == "cpu" and cfg.compile and self.conv_impl == "torch":
            self._fused = self._make_fused()
            self.update_impl = "keyed noise and update compiled into the gradient's graph (CPU)"

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (tests check there is no re-capture)."""
        return self._graphs.captures

    def _make_grad(self) -> Callable[[torch.Tensor], torch.Tensor]:
        ebm, temp = self.ebm, self.cfg.ebm_temp
        if isinstance(ebm, EBMSNGAN32):
            ebm = FoldedEBM(ebm)  # pooling folded into the convs: 1.6x fewer FLOPs

        cpu = self.device.type == "cpu"

        def energy_sum(x: torch.Tensor) -> torch.Tensor:
            if cpu:  # oneDNN's convolutions run faster on channels-last (1.2-1.4x here)
                x = x.contiguous(memory_format=torch.channels_last)
            return ebm(x).float().sum() / temp

        g = self._energy_grad = torch.func.grad(energy_sum)
        return compile_static(g, mode=self.cfg.compile_mode) if self.cfg.compile else g

    def _make_fused(self) -> Callable[..., torch.Tensor]:
        """CPU: the gradient, the keyed noise and the update as one compiled graph, so inductor
        fuses noise and update into the gradient's last kernel. The step number comes in as a
        0-d tensor (never a Python int), so every step and batch of a shape shares one graph."""
        g, eps = self._energy_grad, self.cfg.ebm_eps

        def step(x: torch.Tensor, ids: torch.Tensor, seed: torch.Tensor, k: torch.Tensor,
                 stream: int) -> torch.Tensor:  # fmt: skip
            return klangevin.langevin_step_eager(
                x, g(x), grad_scale=eps**2 / 2, noise_scale=eps, seed=seed, step=k,
                sample_ids=ids, stream=stream,
            )  # fmt: skip

        return compile_static(step, mode=self.cfg.compile_mode)

    def _pick_conv_impl(self) -> tuple[str, str]:
        want, dev, prec = self.cfg.conv_impl, self.device, self.cfg.precision
        tconv = "compiled torch convolutions" if self.cfg.compile else "eager torch convolutions"
        if want == "torch":
            return "torch", f"requested: {tconv}"
        ok, why = conv_kernels_usable(self.ebm, dev, prec)
        if want == "triton":
            if not ok:
                raise ValueError(
                    f"conv_impl 'triton' cannot run here: {why}; use 'torch' or 'auto'"
                )
            self._conv_grad = ConvEnergyGrad(self.ebm, self.cfg.ebm_temp, prec)
            return "triton", f"requested: Triton conv-block kernels ({why})"
        if dev.type != "cuda":
            return "torch", f"auto on CPU: {tconv} (the Triton interpreter is for tests)"
        if not ok:
            return "torch", f"auto: {tconv} (conv-block kernels: {why})"
        self._conv_grad = ConvEnergyGrad(self.ebm, self.cfg.ebm_temp, prec)
        return "auto", "auto: both timed at the first batch shape"

    def _measure_conv(self, x: torch.Tensor, reps: int = 5) -> None:
        """``auto`` on CUDA: time the compiled torch gradient and the Triton one at ``x``'s shape
        (CUDA events, after two warm-up calls each: compile, JIT) and keep the faster. Runs in
        the warm-up before any capture, never inside one."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("conv_impl 'auto' must be measured before a CUDA graph capture")
        assert self._conv_grad is not None
        ms: dict[str, float] = {}
        for name, fn in (("torch", self._grad), ("triton", self._conv_grad)):
            for _ in range(2):
                fn(x)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn(x)
            end.record()
            end.synchronize()
            ms[name] = start.elapsed_time(end) / reps
        self.conv_impl = min(ms, key=ms.__getitem__)
        self.conv_impl_times_ms = ms
        self.conv_impl_reason = (
            f"auto at batch shape {tuple(x.shape)} ({self.cfg.precision}): triton "
            f"{ms['triton']:.3f} ms, torch {ms['torch']:.3f} ms per gradient (CUDA events); "
            f"{self.conv_impl} is faster"
        )

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), precision_context(self.cfg.precision, self.device):
            if self.conv_impl == "auto":
                self._measure_conv(x)
            if self.conv_impl == "triton":
                return self._conv_grad(x)
            return self._grad(x)

    def _step(self, x: torch.Tensor, ids: torch.Tensor, stream: int, step) -> None:
        if self._fused is not None:
            with torch.no_grad(), precision_context(self.cfg.precision, self.device):
                self._fused(x, ids, self._seed, step, stream)  # in place
            return
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

    def _loop(self, x: torch.Tensor, ids: torch.Tensor, stream: int, steps: torch.Tensor,
              progress: Callable[[int], object] | None = None) -> None:  # fmt: skip
        for i in range(self.cfg.ebm_steps):
            self._step(x, ids, stream, steps[i])
            if progress is not None:  # host side, between compiled calls: no sync, no break
                progress(1)

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
        progress: Callable[[int], object] | None = None,
    ) -> torch.Tensor:
        """x float32 (B, C, H, W) and int64 ids on the device; returns a new tensor.
        ``pad_to``: the largest batch to expect, where sizes vary (`LoopGraphs`); ``progress``:
        told of the steps done (each step, or a whole CUDA graph replay)."""
        return self._graphs.run(x, ids, stream, step_offset, pad_to, graph=self.cuda_graph,
                                progress=progress)  # fmt: skip
