"""Fused DDPM forward noising and posterior step (DESIGN 2.1, 6), one pass each.

Semantics of diffusers' ``DDPMScheduler(num_train_timesteps=1000)`` as PureGen runs it: linear
betas 1e-4..0.02, ``variance_type="fixed_small"``, ``clip_sample=True`` (range 1), epsilon
prediction, ``abar_{-1} = 1`` (``alpha_prod_t_prev = ... if prev_t >= 0 else self.one``).

* `ddpm_add_noise_`: ``x <- sqrt(abar_t) x + sqrt(1 - abar_t) z`` (8 B per element: read and
  write x).
* `ddpm_step_`: ``x0 = clamp((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)``,
  ``x_{t-1} = c0_t x0 + c1_t x_t + std_t z`` with ``c0_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)``,
  ``c1_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)``,
  ``std_t = sqrt(max(beta_t (1 - abar_{t-1}) / (1 - abar_t), 1e-20))`` for t > 0 and no noise
  (std 0) at t = 0 (12 B per element, 10 B with a bf16 eps: read x_t and eps, write x).

The per-t coefficients come from the float32 device table that `models.schedule` derives
(`DDPMSchedule.coefficients`, cached per device)
indexed by ``t`` in the kernel, so ``t`` may be a Python int or an int64 device tensor (read in
the kernel: graph-safe). The table reproduces diffusers' float32 arithmetic operation for
operation (`reference.ddpm_step` does the same), so the coefficients are bit-identical to
diffusers'. Computing them in float64 instead would move c0_t by up to 2e-4 relative at small t
(diffusers' float32 ``1 - abar_t / abar_{t-1}`` cancels), which is visible against the 1e-4
fast-vs-reference contract; ``precision="float64"`` gives that exact-math table on request.
"""

from collections.abc import Sequence

import torch

from puregen_fast.models.schedule import (
    COL_C0,
    COL_C1,
    COL_SQRT_ABAR,
    COL_SQRT_ONE_MINUS_ABAR,
    COL_STD,
    N_COLS,
    ddpm_coefficients,
)
from puregen_fast.noise import STREAM_DDPM, randn

from ._launch import (
    check_launchable,
    check_operand,
    check_state,
    device_guard,
    ids_arg,
    load_scalar,
    pick_block,
    scalar_arg,
    seed_step_args,
    stream_arg,
    tl,
    triton,
)
from ._noise import lanes4, randn4, row_tile

__all__ = [
    "ddpm_add_noise_",
    "ddpm_step_",
    "ddpm_add_noise_eager",
    "ddpm_step_eager",
]

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "step", "stream", "t"])
def _ddpm_kernel(
    x_ptr,
    eps_ptr,
    coef_ptr,
    ids_ptr,
    t,
    seed,
    step,
    stream,
    n_t,
    n_per_row,
    n_chunks,
    T_PTR: tl.constexpr,
    SEED_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr,
    POSTERIOR: tl.constexpr,
    NCOL: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row, ctr, offs, mask = row_tile(n_chunks, n_per_row, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask)
    # t is clamped into the table so a bad device value cannot read out of bounds
    t_v = load_scalar(t, T_PTR).to(tl.int64)
    t_v = tl.minimum(tl.maximum(t_v, 0), n_t - 1)
    coef = coef_ptr + t_v * NCOL
    sqrt_abar = tl.load(coef + 0)
    sqrt_1m_abar = tl.load(coef + 1)
    seed_v = load_scalar(seed, SEED_PTR)
    step_v = load_scalar(step, STEP_PTR)
    sid = tl.load(ids_ptr + row)
    n0, n1, n2, n3 = randn4(seed_v, stream, step_v, sid, ctr)
    z = lanes4(n0, n1, n2, n3)
    if POSTERIOR:
        c0 = tl.load(coef + 2)
        c1 = tl.load(coef + 3)
        std = tl.load(coef + 4)
        e = tl.load(eps_ptr + offs, mask=mask).to(tl.float32)
        x0 = tl.div_rn(x - sqrt_1m_abar * e, sqrt_abar)  # IEEE, as torch ("/" is approximate)
        # clamp via where so a NaN stays NaN, as torch.clamp does
        x0 = tl.where(x0 < -1.0, -1.0, x0)
        x0 = tl.where(x0 > 1.0, 1.0, x0)
        out = (c0 * x0 + c1 * x) + std * z
    else:
        out = sqrt_abar * x + sqrt_1m_abar * z
    tl.store(x_ptr + offs, out, mask=mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _coef_for(x: torch.Tensor, coefficients: torch.Tensor | None) -> torch.Tensor:
    if coefficients is None:
        return ddpm_coefficients(device=x.device)
    if coefficients.dim() != 2 or coefficients.shape[1] != N_COLS:
        raise ValueError(f"coefficients must be (T, {N_COLS}), got {tuple(coefficients.shape)}")
    if coefficients.dtype != torch.float32 or coefficients.device != x.device:
        raise ValueError("coefficients must be float32 on the data's device")
    return coefficients.contiguous()


def _t_arg(
    t: int | torch.Tensor, n_t: int, device: torch.device
) -> tuple[int | torch.Tensor, bool]:
    return scalar_arg(t, "t", device, 0, n_t)


def _launch(x, eps, t, seed, step, sample_ids, stream, coefficients, block, posterior) -> None:
    check_launchable(x.device)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is updated in place)")
    coef = _coef_for(x, coefficients)
    b = x.shape[0]
    n = x[0].numel() if b else 0
    ids = ids_arg(sample_ids, b, x.device)
    stream = stream_arg(stream)
    t_v, t_ptr = _t_arg(t, coef.shape[0], x.device)
    s, s_ptr, k, k_ptr = seed_step_args(seed, step, x.device)
    if b == 0 or n == 0:
        return
    if n >= 1 << 31:
        raise ValueError(f"{n} elements per image: the kernel indexes rows with int32")
    blk, warps = pick_block(n, block)
    n_chunks = triton.cdiv(triton.cdiv(n, 4), blk // 4)
    eps = eps.contiguous() if eps is not None else x  # unused by the forward kernel
    with device_guard(x.device):
        _ddpm_kernel[(b * n_chunks,)](
            x, eps, coef, ids, t_v, s, k, stream, coef.shape[0], n, n_chunks,
            T_PTR=t_ptr, SEED_PTR=s_ptr, STEP_PTR=k_ptr, POSTERIOR=posterior, NCOL=N_COLS,
            BLOCK_C=blk // 4, num_warps=warps,
        )  # fmt: skip


def ddpm_add_noise_(
    x: torch.Tensor,
    t: int | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    step: int | torch.Tensor = 0,
    stream: int = STREAM_DDPM,
    coefficients: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """In place forward noising ``x <- sqrt(abar_t) x + sqrt(1 - abar_t) z`` with
    ``z = noise.randn(seed, stream, step, sample_ids, x.shape[1:])``; one Triton pass, 8 B per
    element. ``x``: contiguous float32 (B, *S). ``coefficients``: a `ddpm_coefficients` table
    (default: the standard schedule on x's device). Returns ``x``."""
    check_state(x, "x")
    _launch(x, None, t, seed, step, sample_ids, stream, coefficients, block, posterior=False)
    return x


def ddpm_step_(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    t: int | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    stream: int = STREAM_DDPM,
    coefficients: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """In place DDPM posterior step ``x_t <- x_{t-1}`` (clip, combine, noise; module doc) with
    ``z = noise.randn(seed, stream, step, sample_ids, x_t.shape[1:])`` (ignored at t = 0); one
    Triton pass, 12 B per element (10 B with a bf16 ``eps_pred``). Returns ``x_t``."""
    check_state(x_t, "x_t")
    check_operand(x_t, "x_t", eps_pred, "eps_pred")
    _launch(x_t, eps_pred, t, seed, step, sample_ids, stream, coefficients, block, posterior=True)
    return x_t


def _row(coef: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        # clamped like the kernel; a gather, so it stays graph-safe
        return coef[t.reshape(()).to(torch.int64).clamp(0, coef.shape[0] - 1)]
    t = int(t)
    if not 0 <= t < coef.shape[0]:
        raise ValueError(f"t must lie in [0, {coef.shape[0]}); got {t}")
    return coef[t]


def ddpm_add_noise_eager(
    x: torch.Tensor,
    t: int | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    step: int | torch.Tensor = 0,
    stream: int = STREAM_DDPM,
    coefficients: torch.Tensor | None = None,
    block: int | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager twin of `ddpm_add_noise_` (plain torch, any device; same table and noise); updates
    ``x`` in place and returns it. ``noise`` replaces the keyed draw; ``block`` is ignored."""
    check_state(x, "x")
    row = _row(_coef_for(x, coefficients), t)
    if noise is None:
        noise = randn(seed, stream, step, sample_ids, x.shape[1:], device=x.device)
    return x.copy_(row[COL_SQRT_ABAR] * x + row[COL_SQRT_ONE_MINUS_ABAR] * noise)


def ddpm_step_eager(
    x_t: torch.Tensor,
    eps_pred: torch.Tensor,
    t: int | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    stream: int = STREAM_DDPM,
    coefficients: torch.Tensor | None = None,
    block: int | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager twin of `ddpm_step_` (plain torch, any device; the same operations in the same order
    as diffusers' ``DDPMScheduler.step``); updates ``x_t`` in place and returns it. The noise is
    drawn (and multiplied by std 0) at t = 0 too, so a tensor ``t`` never needs a host sync.
    ``noise`` replaces the keyed draw; ``block`` is ignored."""
    check_state(x_t, "x_t")
    check_operand(x_t, "x_t", eps_pred, "eps_pred")
    row = _row(_coef_for(x_t, coefficients), t)
    if noise is None:
        noise = randn(seed, stream, step, sample_ids, x_t.shape[1:], device=x_t.device)
    eps = eps_pred.float()
    x0 = ((x_t - row[COL_SQRT_ONE_MINUS_ABAR] * eps) / row[COL_SQRT_ABAR]).clamp(-1.0, 1.0)
    mean = row[COL_C0] * x0 + row[COL_C1] * x_t
    return x_t.copy_(mean + row[COL_STD] * noise)
