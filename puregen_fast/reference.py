"""Eager reference: the PureGen authors' algorithms, step for step, in plain PyTorch.

Everything here works on x in [-1, 1], shape (B, 3, H, W), float32. It is what the fast path and
the kernels are checked against, so it imports neither. Each stochastic function takes its noise
three ways: ``None`` (fresh ``torch.randn``, as the authors run it), a tensor holding every draw,
or a callable ``step -> Tensor`` (how the `Purifier` feeds the keyed stream of `pg.noise`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from puregen_fast import noise as pgnoise
from puregen_fast import paper
from puregen_fast.models.schedule import (
    COL_C0,
    COL_C1,
    COL_SQRT_ABAR,
    COL_SQRT_ONE_MINUS_ABAR,
    COL_STD,
    DDPMSchedule,
)

__all__ = [
    "ebm_purify",
    "ddpm_step",
    "ddpm_purify",
    "combo_purify",
    "energy",
    "filter_mask",
    "jpeg",
    "Progress",
]

Noise = torch.Tensor | Callable[[int], torch.Tensor] | None
# keyed noise for combinations: (stream, step) -> Tensor
StreamNoise = Callable[[int, int], torch.Tensor] | None
# told how many steps just finished (each over the whole batch): progress that moves within a
# batch, counted on the host (no device value read, so no sync on a GPU)
Progress = Callable[[int], None]


def _check_noise(noise: Noise, n: int, x: torch.Tensor, what: str) -> None:
    if isinstance(noise, torch.Tensor) and tuple(noise.shape) != (n, *x.shape):
        raise ValueError(f"{what}: noise must have shape {(n, *x.shape)}; got {tuple(noise.shape)}")


def check_x(x: torch.Tensor, what: str, check_range: bool = True) -> None:
    """x must be float (B, C, H, W), finite, and (for inputs) in [-1, 1]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: x must be a float tensor (B, C, H, W); got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: x holds non-finite values")
    if check_range and x.numel() and (x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6):
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(
            f"{what}: x must lie in [-1, 1] (x = 2*u - 1 for u in [0, 1]); got [{lo:.4g}, {hi:.4g}]"
        )


def _draw(noise: Noise, i: int, like: torch.Tensor) -> torch.Tensor:
    if noise is None:
        return torch.randn_like(like)
    if callable(noise):
        return noise(i)
    return noise[i]


def ebm_purify(
    ebm: nn.Module,
    x: torch.Tensor,
    steps: int = paper.LANGEVIN_STEPS,
    eps: float = paper.LANGEVIN_EPS,
    temp: float = paper.LANGEVIN_TEMP,
    noise: Noise = None,
    *,
    check_range: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Langevin dynamics on the EBM, ``steps`` times (the paper: 150, 1.25e-2, 1e-4, no initial
    noise): ``x <- x - (eps^2 / 2) * grad_x(sum E(x) / temp) + eps * z``.

    ``noise``: optional tensor (steps, B, 3, H, W) used in place of ``torch.randn``.
    ``check_range``: refuse x outside [-1, 1] (off where x comes from an earlier stage).
    ``progress``: called with 1 after each step (host side: it reads no device value).
    """
    check_x(x, "ebm_purify", check_range)
    _check_noise(noise, steps, x, "ebm_purify")
    x = x.detach().clone()
    for i in range(steps):
        with torch.enable_grad():
            xg = x.requires_grad_(True)
            e = ebm(xg).sum() / temp
            (grad,) = torch.autograd.grad(e, [xg])
        x = x.detach() - (eps**2 / 2) * grad
        x = x + eps * _draw(noise, i, x)
        if progress is not None:
            progress(1)
    return x.detach()


def ddpm_step(
    sched: DDPMSchedule,
    eps_pred: torch.Tensor,
    t: int,
    x_t: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One DDPM posterior step x_t -> x_{t-1}, exactly as diffusers' `DDPMScheduler.step` with
    fixed_small variance, clip_sample (range 1) and epsilon prediction; no noise at t = 0."""
    t = sched.check_t(t)
    row = sched.coefficients(x_t.device)[t]
    x0 = (x_t - row[COL_SQRT_ONE_MINUS_ABAR] * eps_pred) / row[COL_SQRT_ABAR]
    x0 = x0.clamp(-1.0, 1.0)
    prev = row[COL_C0] * x0 + row[COL_C1] * x_t
    if t > 0:
        if noise is None:
            raise ValueError("ddpm_step: noise is required for t > 0")
        prev = prev + row[COL_STD] * noise
    return prev


def _eps(unet: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """Epsilon prediction from our `UNet2D` (returns a tensor) or a diffusers `UNet2DModel`."""
    out = unet(x, torch.tensor(t, device=x.device))
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


@torch.no_grad()
def ddpm_purify(
    unet: nn.Module,
    sched: DDPMSchedule,
    x: torch.Tensor,
    steps: int = paper.DDPM_STEPS,
    noise: Noise = None,
    *,
    check_range: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """DDPM purification as the authors run it: forward-noise to timestep ``t = steps``, then
    reverse over ``t = steps-1, ..., 0``. Yes: noised at 75 and denoised from 74 (the authors
    use ``scheduler.timesteps[-steps:]`` after ``add_noise(..., timesteps=steps)``); we keep it.

    ``noise``: optional tensor (steps + 1, B, 3, H, W): [0] forward noise, [i] reverse step i
    (at t = steps - i; the last entry, t = 0, is unused). ``progress``: called with 1 after
    each reverse step (``steps`` calls in all).
    """
    if not 1 <= steps < sched.num_train_timesteps:
        raise ValueError(f"ddpm steps must lie in [1, {sched.num_train_timesteps}); got {steps}")
    check_x(x, "ddpm_purify", check_range)
    _check_noise(noise, steps + 1, x, "ddpm_purify")
    x_t = sched.add_noise(x, _draw(noise, 0, x), steps)
    for i in range(1, steps + 1):
        t = steps - i
        z = _draw(noise, i, x_t) if t > 0 else None
        x_t = ddpm_step(sched, _eps(unet, x_t, t), t, x_t, z)
        if progress is not None:
            progress(1)
    return x_t


def combo_purify(
    x: torch.Tensor,
    *,
    ebm: nn.Module | None,
    unet: nn.Module | None,
    sched: DDPMSchedule | None,
    ebm_steps: int = paper.LANGEVIN_STEPS,
    ddpm_steps: int = paper.DDPM_STEPS,
    reps: int = 1,
    eps: float = paper.LANGEVIN_EPS,
    temp: float = paper.LANGEVIN_TEMP,
    noise: StreamNoise = None,
) -> torch.Tensor:
    """``reps`` rounds of (EBM Langevin, then DDPM): ``ebm+ddpm`` is one round ("Naive"), ``reps``
    alternates smaller runs. Either model may be None to skip its half. Round r draws from streams
    ``stream_id(STREAM_EBM, r)`` and ``stream_id(STREAM_DDPM, r)`` of ``noise(stream, step)``."""

    def keyed(kind: int, r: int) -> Noise:
        if noise is None:
            return None
        s = pgnoise.stream_id(kind, r)
        return lambda i: noise(s, i)

    check_x(x, "combo_purify")
    for r in range(reps):
        if ebm is not None and ebm_steps > 0:
            x = ebm_purify(
                ebm, x, ebm_steps, eps, temp, keyed(pgnoise.STREAM_EBM, r), check_range=False
            )
        if unet is not None and ddpm_steps > 0:
            if sched is None:
                raise ValueError("combo_purify: a DDPM needs its schedule")
            x = ddpm_purify(
                unet, sched, x, ddpm_steps, keyed(pgnoise.STREAM_DDPM, r), check_range=False
            )
    return x


@torch.no_grad()
def energy(ebm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E(x) per image, shape (B,)."""
    return ebm(x).reshape(x.shape[0])


def filter_mask(
    energies: torch.Tensor, frac: float, threshold: float | None = None
) -> torch.Tensor:
    """Which images `filt` purifies: energy >= threshold, or, without a threshold, the
    ceil(frac * B) highest energies of this batch (ties broken by position)."""
    if threshold is not None:
        return energies >= threshold
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"filter fraction must lie in (0, 1]; got {frac}")
    k = math.ceil(frac * energies.numel())
    mask = torch.zeros_like(energies, dtype=torch.bool)
    mask[torch.argsort(energies, descending=True, stable=True)[:k]] = True
    return mask


def jpeg(images: np.ndarray, quality: int = paper.JPEG_QUALITY) -> np.ndarray:
    """JPEG re-encode (Pillow, 4:2:0 as Pillow defaults) of uint8 NHWC images: the paper's
    baseline."""
    from PIL import Image

    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must lie in [1, 95]; got {quality}")
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out
