"""Fused Langevin update (DESIGN 2.1, 6): gradient step plus keyed noise in one pass.

    x <- x - grad_scale * grad + noise_scale * z,   z = noise.randn(seed, stream, step, ids, S)

For the EBM sampler ``grad_scale = eps**2 / 2`` (with grad = d(sum E / temp)/dx) and
``noise_scale = eps``. ``x`` is float32 (B, *S), updated in place; ``grad`` is float32 or bf16
(upcast in the kernel). Memory traffic per element: read x (4 B) + read grad (4 B, or 2 B in bf16)
+ write x (4 B) = 12 B (10 B with a bf16 grad); the noise is generated in registers, one Philox
call per 4 elements.

``seed`` and ``step`` may be Python ints or int64 device tensors (0-d or one element): a tensor is
read in the kernel, so a CUDA graph replay sees its current value. ``sample_ids`` is an int64
(B,) tensor (in a graph: a static buffer refreshed before replay).
"""

from collections.abc import Sequence

import torch

from puregen_fast.noise import STREAM_EBM, randn

from ._launch import (
    check_launchable,
    check_operand,
    check_state,
    device_guard,
    ids_arg,
    load_scalar,
    pick_block,
    seed_step_args,
    stream_arg,
    tl,
    triton,
)
from ._noise import lanes4, randn4, row_tile

__all__ = ["langevin_step_", "langevin_step_eager"]


@triton.jit(do_not_specialize=["seed", "step", "stream", "grad_scale", "noise_scale"])
def _langevin_kernel(
    x_ptr,
    g_ptr,
    ids_ptr,
    seed,
    step,
    stream,
    grad_scale,
    noise_scale,
    n_per_row,
    n_chunks,
    SEED_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row, ctr, offs, mask = row_tile(n_chunks, n_per_row, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    seed_v = load_scalar(seed, SEED_PTR)
    step_v = load_scalar(step, STEP_PTR)
    sid = tl.load(ids_ptr + row)
    n0, n1, n2, n3 = randn4(seed_v, stream, step_v, sid, ctr)
    z = lanes4(n0, n1, n2, n3)
    tl.store(x_ptr + offs, x - grad_scale * g + noise_scale * z, mask=mask)


def _check(x: torch.Tensor, grad: torch.Tensor) -> None:
    check_state(x, "x")
    check_operand(x, "x", grad, "grad")


def langevin_step_(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    grad_scale: float,
    noise_scale: float,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    stream: int = STREAM_EBM,
    block: int | None = None,
) -> torch.Tensor:
    """In place: ``x <- x - grad_scale * grad + noise_scale * noise.randn(seed, stream, step,
    sample_ids, x.shape[1:])``, one fused Triton pass (12 B per element moved, 10 B with a bf16
    grad). ``x`` must be contiguous float32; a non-contiguous ``grad`` is copied first.
    ``block`` (elements per program, a power of two) is for tests; by default it is chosen from
    the row size. Returns ``x``."""
    _check(x, grad)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is updated in place)")
    check_launchable(x.device)
    grad = grad.contiguous()
    b = x.shape[0]
    n = x[0].numel() if b else 0
    ids = ids_arg(sample_ids, b, x.device)
    stream = stream_arg(stream)
    s, s_ptr, k, k_ptr = seed_step_args(seed, step, x.device)
    if b == 0 or n == 0:
        return x
    if n >= 1 << 31:
        raise ValueError(f"{n} elements per image: the kernel indexes rows with int32")
    blk, warps = pick_block(n, block)
    n_chunks = triton.cdiv(triton.cdiv(n, 4), blk // 4)
    with device_guard(x.device):
        _langevin_kernel[(b * n_chunks,)](
            x, grad, ids, s, k, stream, float(grad_scale), float(noise_scale), n, n_chunks,
            SEED_PTR=s_ptr, STEP_PTR=k_ptr, BLOCK_C=blk // 4, num_warps=warps,
        )  # fmt: skip
    return x


def langevin_step_eager(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    grad_scale: float,
    noise_scale: float,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    stream: int = STREAM_EBM,
    block: int | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager twin of `langevin_step_` in plain torch (any device, autograd-free): same
    signature, same formula and noise, and it also updates ``x`` in place and returns it.
    ``noise`` replaces the keyed draw (tests, injected-noise comparisons); ``block`` is
    accepted and ignored so the two are interchangeable."""
    _check(x, grad)
    if noise is None:
        noise = randn(seed, stream, step, sample_ids, x.shape[1:], device=x.device)
    # same association as the kernel: (x - a*g) + b*z, all in fp32
    new = x - grad_scale * grad.float() + noise_scale * noise
    return x.copy_(new)
