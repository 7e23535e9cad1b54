"""The negative-sample source of EBM training: the engine's `LangevinSampler` (fast path where it
runs: compiled energy gradient, fused update, CUDA graph), not a second copy of the loop.

It computes ``x <- x - eps^2/2 grad_x(sum E(x) / temp) + eps z`` with
``z = pg.noise.randn(seed, stream, step_offset + i, ids, x.shape[1:])`` and differentiates w.r.t.
x only, so the model being trained is sampled from without touching its parameter gradients.
With ``backend="auto"``, a fast path that fails on its first use (no compiler on this machine,
say) is replaced by the engine's reference backend, with a message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from puregen_fast.sampling.backends import LangevinSampler

__all__ = ["TrainSampler"]


class TrainSampler:
    """``TrainSampler(ebm, ...)(x, ids, stream, step_offset) -> x_new``; ``.impl`` says which
    sampler runs."""

    def __init__(
        self,
        ebm: nn.Module,
        steps: int,
        eps: float,
        temp: float,
        seed: int,
        device: torch.device,
        precision: str = "fp32",
        backend: str = "auto",
        conv_impl: str = "auto",
    ) -> None:
        kw = dict(steps=steps, eps=eps, temp=temp, seed=seed, device=device, precision=precision)
        self._kw, self._ebm, self.backend = kw, ebm, backend
        self._engine = LangevinSampler(ebm, backend=backend, conv_impl=conv_impl, **kw)
        self._used = False
        self.impl = self._describe()

    def _describe(self) -> str:
        e = self._engine
        return (
            f"LangevinSampler(backend={e.backend}, update: {e.update_impl}, convolutions: "
            f"{e.conv_impl_reason})"
        )

    def __call__(
        self, x: torch.Tensor, ids: torch.Tensor, stream: int, step_offset: int,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``progress``: told of each chain step as it is issued (`LangevinSampler`)."""
        kw = {} if progress is None else {"progress": progress}
        try:
            out = self._engine(x, ids, stream=stream, step_offset=step_offset, **kw)
        except Exception as e:
            if self.backend != "auto" or self._used or self._engine.backend == "reference":
                raise
            print(
                f"train ebm: the fast sampler failed on first use ({type(e).__name__}: {e}); "
                "using the engine's reference backend",
                file=sys.stderr,
            )
            self._engine = LangevinSampler(self._ebm, backend="reference", **self._kw)
            self.impl = self._describe() + f" (fast path failed: {type(e).__name__})"
            out = self._engine(x, ids, stream=stream, step_offset=step_offset, **kw)
        self._used = True
        return out
