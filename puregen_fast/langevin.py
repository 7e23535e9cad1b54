"""The fast EBM Langevin sampler: compiled energy gradient, fused update, one CUDA graph.

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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from puregen_fast import noise as pgnoise
from puregen_fast import reference
from puregen_fast.compiled import check_mode, compile_static
from puregen_fast.cuda_graphs import LoopGraphs
from puregen_fast.ebm import EBMSNGAN32
from puregen_fast.ebm_folded import FoldedEBM

__all__ = ["LangevinSampler", "model_context"]


def model_context(precision: str, device: torch.device):
    from puregen_fast.purifier import precision_context

    return precision_context(precision, device)


def _update_fns(device: torch.device, compile: bool) -> tuple[Callable, str]:
    """The fused kernel where Triton runs on this device, else the eager twin."""
    from puregen_fast.kernels import langevin as klangevin

    if device.type == "cuda":
        from puregen_fast.kernels.availability import triton_available

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


class LangevinSampler:
    """``LangevinSampler(ebm, steps, eps, temp, seed, ...)(x, sample_ids, stream, step_offset)``.

    backend: "fast" (compiled gradient + fused update [+ CUDA graph on CUDA]), "reference"
    (`reference.ebm_purify` on the same keyed noise), or "auto" (fast). ``cuda_graph=None``
    captures on CUDA only. ``compile=False`` keeps the gradient eager (tests, debugging);
    ``compile_mode`` is one of `compiled.COMPILE_MODES`.
    """

    def __init__(
        self,
        ebm: nn.Module,
        steps: int = 150,
        eps: float = 1.25e-2,
        temp: float = 1e-4,
        seed: int = 0,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        backend: str = "auto",
        compile: bool = True,
        cuda_graph: bool | None = None,
        compile_mode: str = "default",
    ) -> None:
        if steps < 1 or eps <= 0 or temp <= 0:
            raise ValueError(f"need steps >= 1, eps > 0, temp > 0; got {steps}, {eps}, {temp}")
        self.ebm = ebm
        self.steps, self.eps, self.temp, self.seed = steps, eps, temp, seed
        self.device = torch.device(device)
        self.precision = precision
        self.backend = "reference" if backend == "reference" else "fast"
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph needs a CUDA device")
        self._update, self.update_impl = _update_fns(
            self.device, compile and self.backend == "fast"
        )
        self.compile, self.compile_mode = compile, check_mode(compile_mode)
        self._grad = self._make_grad(self.backend == "fast")
        self._seed = torch.tensor(seed, dtype=torch.int64, device=self.device)
        self._graphs = LoopGraphs(self.device, steps, self._loop, self._warmup)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (tests check there is no re-capture)."""
        return self._graphs.captures

    def _make_grad(self, fast: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        ebm, temp = self.ebm, self.temp
        if fast and isinstance(ebm, EBMSNGAN32):
            ebm = FoldedEBM(ebm)  # pooling folded into the convs: 1.6x fewer FLOPs

        def energy_sum(x: torch.Tensor) -> torch.Tensor:
            return ebm(x).float().sum() / temp

        g = torch.func.grad(energy_sum)
        return compile_static(g, mode=self.compile_mode) if self.compile else g

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), model_context(self.precision, self.device):
            return self._grad(x)

    # -- one step and the loop -----------------------------------------------------------------
    def _step(self, x: torch.Tensor, ids: torch.Tensor, stream: int, step) -> None:
        g = self.grad(x)
        self._update(  # in place, kernel and eager twin alike
            x,
            g,
            grad_scale=self.eps**2 / 2,
            noise_scale=self.eps,
            seed=self._seed,
            step=step,
            sample_ids=ids,
            stream=stream,
        )

    def _loop(self, x: torch.Tensor, ids: torch.Tensor, stream: int, steps: torch.Tensor) -> None:
        for i in range(self.steps):
            self._step(x, ids, stream, steps[i])

    def _warmup(self, x: torch.Tensor, ids: torch.Tensor, stream: int, steps: torch.Tensor) -> None:
        for _ in range(2):
            self._step(x, ids, stream, steps[0])

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        sample_ids: torch.Tensor,
        stream: int = pgnoise.STREAM_EBM,
        step_offset: int = 0,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """``steps`` Langevin steps from x (float32, (B, C, H, W)); returns a new tensor.
        ``pad_to``: the largest batch to expect, where sizes vary (`LoopGraphs`)."""
        x = x.to(self.device, torch.float32)
        ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=self.device).reshape(-1)
        if ids.numel() != x.shape[0]:
            raise ValueError(f"{ids.numel()} sample ids for {x.shape[0]} images")
        if self.backend == "reference":
            seed = self.seed

            def z(i: int) -> torch.Tensor:
                return pgnoise.randn(seed, stream, step_offset + i, ids, x.shape[1:])

            with model_context(self.precision, self.device):
                return reference.ebm_purify(
                    self.ebm, x, self.steps, self.eps, self.temp, noise=z, check_range=False
                )
        return self._graphs.run(x, ids, stream, step_offset, pad_to, graph=self.cuda_graph)
