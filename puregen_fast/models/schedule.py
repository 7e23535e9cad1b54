"""The DDPM noise schedule, with diffusers' `DDPMScheduler(num_train_timesteps=1000)` semantics
(linear betas, "fixed_small" variance, x0 clipped to [-1, 1], epsilon prediction).

Tables are computed in float32 the way diffusers computes them, so the reference step agrees
with `DDPMScheduler.step` to float rounding. This is the one place the schedule's numbers are
derived: the reference step and the fused kernels read the same per-timestep coefficient table
(`ddpm_coefficients`, columns ``COL_*``).

The table reproduces diffusers' float32 arithmetic operation for operation, so the coefficients
are bit-identical to diffusers'. Computing them in float64 instead would move c0_t by up to 2e-4
relative at small t (diffusers' float32 ``1 - abar_t / abar_{t-1}`` cancels), which is visible
against the 1e-4 fast-vs-reference contract; ``precision="float64"`` gives that exact-math table
on request.
"""

from __future__ import annotations

import torch

__all__ = [
    "DDPMSchedule",
    "ddpm_coefficients",
    "COL_SQRT_ABAR",
    "COL_SQRT_ONE_MINUS_ABAR",
    "COL_C0",
    "COL_C1",
    "COL_STD",
    "N_COLS",
]

# columns of the coefficient table
COL_SQRT_ABAR = 0  # sqrt(abar_t)
COL_SQRT_ONE_MINUS_ABAR = 1  # sqrt(1 - abar_t)
COL_C0 = 2  # posterior mean coefficient of the clipped x0
COL_C1 = 3  # posterior mean coefficient of x_t
COL_STD = 4  # posterior std (fixed_small); 0 at t = 0 (no noise there)
N_COLS = 5

_TABLES: dict[tuple, torch.Tensor] = {}


def _betas(t_count: int, beta_start: float, beta_end: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, t_count, dtype=dtype)


def _table_f32(t_count: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """diffusers' float32 expressions, vectorised over t (elementwise IEEE ops: same bits)."""
    betas = _betas(t_count, beta_start, beta_end, torch.float32)
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float32), abar[:-1]])
    beta_prod = 1 - abar
    beta_prod_prev = 1 - abar_prev
    alpha_t = abar / abar_prev
    beta_t = 1 - alpha_t
    c0 = (abar_prev**0.5 * beta_t) / beta_prod
    c1 = alpha_t**0.5 * beta_prod_prev / beta_prod
    var = torch.clamp((1 - abar_prev) / (1 - abar) * beta_t, min=1e-20)
    std = var**0.5
    std[0] = 0.0  # diffusers adds no noise at t = 0
    return torch.stack([abar**0.5, beta_prod**0.5, c0, c1, std], dim=1)


def _table_f64(t_count: int, beta_start: float, beta_end: float) -> torch.Tensor:
    betas = _betas(t_count, beta_start, beta_end, torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    c0 = abar_prev.sqrt() * betas / (1 - abar)
    c1 = (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar)
    std = ((1 - abar_prev) / (1 - abar) * betas).clamp_min(1e-20).sqrt()
    std[0] = 0.0
    return torch.stack([abar.sqrt(), (1 - abar).sqrt(), c0, c1, std], dim=1).float()


def ddpm_coefficients(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    device: torch.device | str | None = None,
    precision: str = "diffusers",
) -> torch.Tensor:
    """The per-timestep coefficient table, float32 ``(num_train_timesteps, 5)`` on ``device``
    (columns `COL_SQRT_ABAR`, `COL_SQRT_ONE_MINUS_ABAR`, `COL_C0`, `COL_C1`, `COL_STD`). Built
    once per (schedule, device) and cached; treat it as read-only. ``precision="diffusers"``
    (default) reproduces diffusers' float32 values bit for bit; ``"float64"`` evaluates the
    exact formulas in float64 and rounds once."""
    if num_train_timesteps < 1 or not 0 < beta_start <= beta_end < 1:
        raise ValueError(
            "need num_train_timesteps >= 1 and 0 < beta_start <= beta_end < 1; got "
            f"{num_train_timesteps}, {beta_start}, {beta_end}"
        )
    if precision not in ("diffusers", "float64"):
        raise ValueError(f"precision must be 'diffusers' or 'float64', got {precision!r}")
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (int(num_train_timesteps), float(beta_start), float(beta_end), precision, str(dev))
    table = _TABLES.get(key)
    if table is None:
        build = _table_f32 if precision == "diffusers" else _table_f64
        # built on CPU, so the values do not depend on the device's cumprod
        table = build(int(num_train_timesteps), float(beta_start), float(beta_end)).to(dev)
        _TABLES[key] = table.contiguous()
        table = _TABLES[key]
    return table


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
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, torch.float32)
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

    def coefficients(
        self, device: torch.device | str | None = None, precision: str = "diffusers"
    ) -> torch.Tensor:
        """This schedule's coefficient table (`ddpm_coefficients`) on ``device``."""
        return ddpm_coefficients(
            self.num_train_timesteps, self.beta_start, self.beta_end, device, precision
        )

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
