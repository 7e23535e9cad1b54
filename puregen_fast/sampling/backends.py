"""The `Sampler` protocol and its two implementations, and the single-stage samplers built on them.

A `Sampler` runs the two stages of purification on x in [-1, 1] (float32, (B, C, H, W)) with
noise keyed by the images' global ids (DESIGN 2.2): ``ebm`` (``cfg.ebm_steps`` Langevin steps)
and ``ddpm`` (forward noise to ``cfg.ddpm_steps``, reverse to 0).

* `ReferenceSampler`: eager PyTorch, `puregen_fast.reference` on the keyed stream. The only
  reference path: the `Purifier`, `LangevinSampler(backend="reference")` and
  `DDPMSampler(backend="reference")` all run it.
* `FastSampler`: compiled models, fused kernels, CUDA graphs (`langevin.FastLangevin`,
  `ddpm.FastDDPM`); on CPU the compiled models with the kernels' eager twins (DESIGN 6, 8). Same
  keyed noise, so the two agree trajectory by trajectory (DESIGN 2.3).

`make_sampler` picks one: ``fast`` where it runs (else an error), ``reference``, or ``auto`` (fast
where it runs, else reference); ``reason`` says why. Both are built from a frozen
`SamplerConfig`, never from the object that holds them.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from puregen_fast import noise as pgnoise
from puregen_fast import paper, reference
from puregen_fast.kernels.availability import triton_available
from puregen_fast.models.schedule import DDPMSchedule
from puregen_fast.runtime import BACKENDS, cpu_bf16, precision_context
from puregen_fast.sampling.config import SamplerConfig
from puregen_fast.sampling.ddpm import FastDDPM
from puregen_fast.sampling.langevin import FastLangevin

__all__ = [
    "Sampler",
    "ReferenceSampler",
    "FastSampler",
    "fast_available",
    "make_sampler",
    "LangevinSampler",
    "DDPMSampler",
]


def _inputs(
    x: torch.Tensor, ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, torch.float32)
    ids = torch.as_tensor(ids, dtype=torch.int64, device=device).reshape(-1)
    if ids.numel() != x.shape[0]:
        raise ValueError(f"{ids.numel()} sample ids for {x.shape[0]} images")
    return x, ids


def _model(m: Any, what: str) -> Any:
    if m is None:
        raise ValueError(f"this sampler was built without {what}")
    return m


class Sampler(abc.ABC):
    """Runs the two stages on x float32 (B, C, H, W) in [-1, 1] with noise keyed by the images'
    global ids; returns new tensors. ``pad_to``: the largest batch to expect where batch sizes
    vary (a capture hint for the fast backend, `LoopGraphs`)."""

    name: str  # "reference" or "fast"

    def __init__(
        self,
        cfg: SamplerConfig,
        ebm: nn.Module | None = None,
        ddpm: nn.Module | None = None,
        schedule: DDPMSchedule | None = None,
        reason: str = "requested",
    ) -> None:
        self.cfg, self.reason = cfg, reason  # reason: why this backend runs here
        self.schedule = schedule or DDPMSchedule()
        if ddpm is not None:
            cfg.check_ddpm_steps(self.schedule)
        self._build(ebm, ddpm)

    @abc.abstractmethod
    def _build(self, ebm: nn.Module | None, ddpm: nn.Module | None) -> None: ...

    @abc.abstractmethod
    def _ebm(self, x, ids, stream: int, step_offset: int, pad_to: int | None,
             progress: reference.Progress | None = None) -> torch.Tensor: ...  # fmt: skip

    @abc.abstractmethod
    def _ddpm(self, x, ids, stream: int, pad_to: int | None,
              progress: reference.Progress | None = None) -> torch.Tensor: ...  # fmt: skip

    update_impl: str  # what performs the per-step updates

    @property
    @abc.abstractmethod
    def conv_impl(self) -> str | None:
        """What computes the EBM's convolutions ("torch", "triton", "auto" until measured at
        the first batch, "reference" on the reference backend); None without an EBM."""

    @property
    @abc.abstractmethod
    def conv_impl_reason(self) -> str | None:
        """Why `conv_impl` runs here (with ``auto`` on CUDA: both measured times); None without
        an EBM. Worked out once, by the backend that runs the convolutions; the stage samplers
        and the engine pass it on as it is."""

    def ebm(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        stream: int = pgnoise.STREAM_EBM,
        step_offset: int = 0,
        pad_to: int | None = None,
        progress: reference.Progress | None = None,
    ) -> torch.Tensor:
        """``cfg.ebm_steps`` Langevin steps, noise steps ``step_offset + i`` of ``stream``.
        ``progress(k)``: told of k more steps done, as the host issues them (each step; a CUDA
        graph's replay at once); it never reads the device, and the outputs do not change."""
        x, ids = _inputs(x, ids, self.cfg.device)
        return self._ebm(x, ids, stream, step_offset, pad_to, progress)

    def ddpm(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        stream: int = pgnoise.STREAM_DDPM,
        pad_to: int | None = None,
        progress: reference.Progress | None = None,
    ) -> torch.Tensor:
        """Forward noise to ``cfg.ddpm_steps``, then the reverse steps to 0; ``progress`` as
        for `ebm`, told of the ``cfg.ddpm_steps`` reverse steps."""
        x, ids = _inputs(x, ids, self.cfg.device)
        return self._ddpm(x, ids, stream, pad_to, progress)


class ReferenceSampler(Sampler):
    """The eager reference on the keyed noise stream (``pad_to`` has nothing to do here)."""

    name = "reference"
    update_impl = "eager reference"

    def _build(self, ebm: nn.Module | None, ddpm: nn.Module | None) -> None:
        self._ebm_model, self._ddpm_model = ebm, ddpm

    @property
    def conv_impl(self) -> str | None:
        return None if self._ebm_model is None else "reference"

    @property
    def conv_impl_reason(self) -> str | None:
        return None if self._ebm_model is None else "reference backend: eager torch convolutions"

    def _ebm(self, x, ids, stream, step_offset, pad_to, progress=None):  # noqa: D102
        cfg = self.cfg
        z = pgnoise.keyed(cfg.seed, stream, ids, x.shape[1:], step_offset)
        with precision_context(cfg.precision, cfg.device):
            return reference.ebm_purify(
                _model(self._ebm_model, "an EBM"), x, cfg.ebm_steps, cfg.ebm_eps, cfg.ebm_temp,
                noise=z, check_range=False, progress=progress,
            )  # fmt: skip

    def _ddpm(self, x, ids, stream, pad_to, progress=None):
        cfg = self.cfg
        z = pgnoise.keyed(cfg.seed, stream, ids, x.shape[1:])
        with precision_context(cfg.precision, cfg.device):
            out = reference.ddpm_purify(
                _model(self._ddpm_model, "a DDPM"), self.schedule, x, cfg.ddpm_steps, noise=z,
                check_range=False, progress=progress,
            )  # fmt: skip
        return out.float()


class FastSampler(Sampler):
    """Compiled models, fused kernels and CUDA graphs (see the module doc)."""

    name = "fast"

    def _build(self, ebm: nn.Module | None, ddpm: nn.Module | None) -> None:
        cfg = self.cfg
        self.langevin = FastLangevin(cfg, ebm) if ebm is not None else None
        self.diffusion = FastDDPM(cfg, ddpm, self.schedule) if ddpm is not None else None
        loops = [s for s in (self.langevin, self.diffusion) if s is not None]
        self.update_impl = ", ".join(s.update_impl for s in loops)

    @property
    def conv_impl(self) -> str | None:
        return None if self.langevin is None else self.langevin.conv_impl

    @property
    def conv_impl_reason(self) -> str | None:  # `FastLangevin` works it out (and measures auto)
        return None if self.langevin is None else self.langevin.conv_impl_reason

    def _ebm(self, x, ids, stream, step_offset, pad_to, progress=None):
        lang = _model(self.langevin, "an EBM")
        return lang.run(x, ids, stream, step_offset, pad_to, progress=progress)

    def _ddpm(self, x, ids, stream, pad_to, progress=None):
        return _model(self.diffusion, "a DDPM").run(x, ids, stream, pad_to, progress=progress)

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (tests check there is no re-capture)."""
        return sum(s.captures for s in (self.langevin, self.diffusion) if s is not None)


def fast_available(device: torch.device, precision: str) -> tuple[bool, str]:
    """Whether the fast path runs on ``device`` in ``precision``, and why (or why not)."""
    if device.type == "cuda":
        ok, why = triton_available()
        impl = "Triton kernels" if ok else f"eager update twins ({why})"
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return False, "this GPU has no bf16 support"
        return True, f"CUDA: torch.compile + CUDA graphs + {impl}"
    if device.type == "cpu":
        what = "CPU: torch.compile'd models with the update twins compiled in (no CUDA graphs)"
        if precision == "bf16":
            ok, why = cpu_bf16()  # AMX or AVX512-BF16; emulated bf16 would be slower than fp32
            if not ok:
                return False, f"bf16 needs bf16 matrix units on a CPU: {why}; use fp32"
            return True, f"{what}; bf16 on {why}"
        return True, what
    return False, f"no fast path for device type {device.type!r}"


# backend "auto" on a CPU: below this much work (images x steps) the eager reference finishes
# first, as compiling the fast path (20-80 s cold, 2-5 s from the compile cache on a 2-core
# CPU) costs more than it saves; the measurement behind it is in the README ("The CPU path")
AUTO_CPU_MIN_IMAGE_STEPS = 20_000


def make_sampler(
    backend: str,
    cfg: SamplerConfig,
    ebm: nn.Module | None = None,
    ddpm: nn.Module | None = None,
    schedule: DDPMSchedule | None = None,
    image_steps: int | None = None,
) -> ReferenceSampler | FastSampler:
    """The sampler ``backend`` names (see the module doc); ValueError for an unknown backend or
    for ``fast`` where it cannot run. ``image_steps``: the work ahead (images x steps) where
    known; ``auto`` on a CPU takes the reference below `AUTO_CPU_MIN_IMAGE_STEPS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "reference":
        return ReferenceSampler(cfg, ebm, ddpm, schedule, reason="requested")
    ok, why = fast_available(cfg.device, cfg.precision)
    small = image_steps is not None and image_steps < AUTO_CPU_MIN_IMAGE_STEPS
    if ok and backend == "auto" and cfg.device.type == "cpu" and small:
        return ReferenceSampler(cfg, ebm, ddpm, schedule, reason=(
            f"auto on CPU: {image_steps} image-steps < {AUTO_CPU_MIN_IMAGE_STEPS}, too little work "
            "to repay compiling the fast path"))  # fmt: skip
    if ok:
        return FastSampler(cfg, ebm, ddpm, schedule, reason=why)
    if backend == "fast":
        raise ValueError(f"backend 'fast' cannot run here: {why}; use backend 'reference'")
    return ReferenceSampler(cfg, ebm, ddpm, schedule, reason=f"fast path unavailable: {why}")


class _Stage:
    """A sampler reduced to one stage (what training and benchmarks drive)."""

    sampler: ReferenceSampler | FastSampler

    @property
    def config(self) -> SamplerConfig:
        return self.sampler.cfg

    @property
    def backend(self) -> str:
        return self.sampler.name

    @property
    def backend_reason(self) -> str:
        return self.sampler.reason

    @property
    def update_impl(self) -> str:
        return self.sampler.update_impl

    @property
    def captures(self) -> int:
        return getattr(self.sampler, "captures", 0)


class LangevinSampler(_Stage):
    """``LangevinSampler(ebm, steps, eps, temp, seed, ...)(x, sample_ids, stream, step_offset)``:
    ``steps`` Langevin steps on x (float32 (B, C, H, W) in [-1, 1]) with keyed noise; returns a
    new tensor. ``backend``: "fast" (compiled gradient, fused update, CUDA graph on CUDA),
    "reference" (`reference.ebm_purify` on the same noise) or "auto" (fast where it runs).
    ``cuda_graph=None`` captures on CUDA only; ``compile=False`` keeps the gradient eager;
    ``compile_mode`` is one of `runtime.COMPILE_MODES`. ``conv_impl``: "torch", "triton" (the
    fused conv-block kernels; an `EBMSNGAN32` only) or "auto" (see `conv_impl_reason`).
    ``fast`` is the `FastLangevin` (None on the reference backend)."""

    def __init__(
        self,
        ebm: nn.Module,
        steps: int = paper.LANGEVIN_STEPS,
        eps: float = paper.LANGEVIN_EPS,
        temp: float = paper.LANGEVIN_TEMP,
        seed: int = 0,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        backend: str = "fast",
        compile: bool = True,
        cuda_graph: bool | None = None,
        compile_mode: str = "default",
        conv_impl: str = "auto",
    ) -> None:
        cfg = SamplerConfig(
            ebm_steps=steps, ebm_eps=eps, ebm_temp=temp, seed=seed, device=torch.device(device),
            precision=precision, compile=compile, cuda_graph=cuda_graph,
            compile_mode=compile_mode, conv_impl=conv_impl,
        )  # fmt: skip
        self.sampler = make_sampler(backend, cfg, ebm=ebm)
        self.fast = getattr(self.sampler, "langevin", None)

    def __call__(
        self,
        x: torch.Tensor,
        sample_ids: torch.Tensor,
        stream: int = pgnoise.STREAM_EBM,
        step_offset: int = 0,
        pad_to: int | None = None,
        progress: reference.Progress | None = None,
    ) -> torch.Tensor:
        """``pad_to``: the largest batch to expect, where sizes vary (`LoopGraphs`);
        ``progress``: told of the steps done (`Sampler.ebm`)."""
        return self.sampler.ebm(x, sample_ids, stream, step_offset, pad_to, progress)

    @property
    def conv_impl(self) -> str:
        """What computes the EBM's convolutions: "torch", "triton", "auto" until measured (at the
        first batch), or "reference" on the reference backend (`Sampler.conv_impl`)."""
        return self.sampler.conv_impl

    @property
    def conv_impl_reason(self) -> str:
        """Why `conv_impl` runs here (`Sampler.conv_impl_reason`)."""
        return self.sampler.conv_impl_reason


class DDPMSampler(_Stage):
    """``DDPMSampler(unet, schedule, steps, seed, ...)(x, sample_ids, stream)``: DDPM purification
    (forward noise to t = steps, reverse steps-1..0) with keyed noise; options as
    `LangevinSampler`. ``fast`` is the `FastDDPM` (None on the reference backend)."""

    def __init__(
        self,
        unet: nn.Module,
        schedule: DDPMSchedule,
        steps: int = paper.DDPM_STEPS,
        seed: int = 0,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        backend: str = "fast",
        compile: bool = True,
        cuda_graph: bool | None = None,
        compile_mode: str = "default",
    ) -> None:
        cfg = SamplerConfig(
            ddpm_steps=steps, seed=seed, device=torch.device(device), precision=precision,
            compile=compile, cuda_graph=cuda_graph, compile_mode=compile_mode,
        )  # fmt: skip
        self.sampler = make_sampler(backend, cfg, ddpm=unet, schedule=schedule)
        self.fast = getattr(self.sampler, "diffusion", None)

    def __call__(
        self,
        x: torch.Tensor,
        sample_ids: torch.Tensor,
        stream: int = pgnoise.STREAM_DDPM,
        pad_to: int | None = None,
        progress: reference.Progress | None = None,
    ) -> torch.Tensor:
        """``pad_to``: the largest batch to expect, where sizes vary (`LoopGraphs`);
        ``progress``: told of the reverse steps done (`Sampler.ddpm`)."""
        return self.sampler.ddpm(x, sample_ids, stream, pad_to, progress)
