"""The DDPM noise schedule, with diffusers' `DDPMScheduler(num_train_timesteps=1000)` semantics
(linear betas, "fixed_small" variance, x0 clipped to [-1, 1], epsilon prediction).

Tables are computed in float32 the way diffusers computes them, so the reference step agrees
with `DDPMScheduler.step` to float rounding.
"""

from __future__ import annotations

import torch

__all__ = ["DDPMSchedule"]


class DDPMSchedule:
    def __init__(
        self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> None:
        if num_train_timesteps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                "need num_train_timesteps >= 1 and 0 < beta_start <= beta_end < 1; got "
                f"{num_train_timesteps}, {beta_start}, {beta_end}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def config(self) -> dict[str, float | int]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": "linear",
            "variance_type": "fixed_small",
            "clip_sample": True,
            "clip_sample_range": 1.0,
            "prediction_type": "epsilon",
        }

    def check_t(self, t: int) -> int:
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_train_timesteps})")
        return t

    def alpha_prod(self, t: int) -> torch.Tensor:
        """abar_t as a 0-d float32 tensor; abar_{-1} = 1 (diffusers' `one`)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) z."""
        ab = self.alphas_cumprod[self.check_t(t)]
        return (ab**0.5).to(x.device) * x + ((1 - ab) ** 0.5).to(x.device) * noise
