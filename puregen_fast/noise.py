"""Keyed Gaussian noise: one stream per image, whatever the batching (DESIGN 2.2).

Every value is a pure function of ``(seed, stream, step, sample_id, element)``:

* Philox4x32-10 (Random123; the rounds of triton's ``tl.philox``) keyed by the 64-bit seed
  (``k0 = seed & 0xFFFFFFFF``, ``k1 = seed >> 32``, as ``tl.philox`` splits it), on the counter

      c0 = element // 4
      c1 = step
      c2 = sample_id & 0xFFFFFFFF
      c3 = (stream << 16) | (sample_id >> 32)

  so sample ids up to 2**48, steps up to 2**32 and 2**34 elements per image never wrap
  (50M images x 150 steps x 3072 values is far inside that).
* The four 32-bit words become uniforms and then normals exactly as ``tl.randn4x`` computes them
  (``uint_to_uniform_float`` then Box-Muller): element ``e`` takes lane ``e % 4``, lanes 0 and 1
  from the first pair of words, lanes 2 and 3 from the second.

A Triton kernel reproduces this stream with ``tl.philox`` on the same counter, so results do not
depend on which kernel, block size or batch produced them. This module imports nothing of ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "STREAM_EBM",
    "STREAM_DDPM",
    "STREAM_TRAIN_EBM",
    "STREAM_TRAIN_DDPM",
    "MAX_SAMPLE_ID",
    "MAX_SEED",
    "stream_id",
    "philox4x32",
    "uint_to_uniform",
    "box_muller",
    "randn",
    "keyed",
]

STREAM_EBM = 1  # purification: EBM Langevin
STREAM_DDPM = 2  # purification: DDPM forward noise and posterior steps
STREAM_TRAIN_EBM = 3  # training: the EBM's persistent MCMC chains
STREAM_TRAIN_DDPM = 4  # training: the DDPM's epsilon targets
MAX_SAMPLE_ID = 1 << 48
MAX_STREAM = 1 << 16
MAX_SEED = (1 << 63) - 1  # the key is 64 bits; a seed fits a signed int64 (a tensor on device)

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_UNIFORM_SCALE = 4.6566127342e-10  # triton's uint_to_uniform_float scale for 32-bit ints
_TWO_PI = 6.283185307179586


def stream_id(kind: int, rep: int = 0) -> int:
    """The stream of sampler ``kind`` (STREAM_EBM/STREAM_DDPM) in repetition ``rep``."""
    s = kind | (rep << 4)
    if not 0 <= s < MAX_STREAM:
        raise ValueError(f"stream {s} (kind {kind}, rep {rep}) outside [0, 2**16)")
    return s


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for 32-bit ``a`` and a tensor ``b`` of 32-bit values in
    int64, without overflowing int64 (split ``a`` in 16-bit halves)."""
    p_lo = b * (a & 0xFFFF)  # < 2**48
    p_hi = b * (a >> 16)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int | torch.Tensor,
    k1: int | torch.Tensor,
    rounds: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (broadcasting)."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in [0, 1), as triton's ``uint_to_uniform_float``: reinterpret
    as int32, fold negatives with ``~x``, scale."""
    folded = torch.where(x >= (1 << 31), x ^ _MASK, x)
    return folded.to(torch.float32) * _UNIFORM_SCALE


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """triton's ``pair_uniform_to_normal`` in float32."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = u2 * _TWO_PI
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _as_ids(sample_ids: Sequence[int] | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=device).reshape(-1)
    # on GPU or inside a compiled graph this check would sync or break the graph; there the
    # caller (the Purifier, the samplers) has validated the ids
    if ids.numel() and not ids.is_cuda and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= MAX_SAMPLE_ID:
            raise ValueError(f"sample ids must lie in [0, 2**48); got range [{lo}, {hi}]")
    return ids


def randn(
    seed: int | torch.Tensor,
    stream: int,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    shape: Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normals of shape ``(len(sample_ids), *shape)``, float32; row ``i`` is the stream of
    sample ``sample_ids[i]`` at ``step`` and does not depend on the other rows.

    ``seed`` and ``step`` may be Python ints or 0-d int64 tensors (for graph capture).
    """
    if device is None and isinstance(sample_ids, torch.Tensor):
        device = sample_ids.device
    ids = _as_ids(sample_ids, device)
    device = ids.device
    if not 0 <= stream < MAX_STREAM:
        raise ValueError(f"stream must lie in [0, 2**16); got {stream}")
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2**63); got {seed}")
    if isinstance(step, int) and not 0 <= step <= _MASK:
        raise ValueError(f"step must lie in [0, 2**32); got {step}")
    numel = math.prod(shape)
    n_ctr = (numel + 3) // 4

    c0 = torch.arange(n_ctr, dtype=torch.int64, device=device).unsqueeze(0)
    c1 = torch.as_tensor(step, dtype=torch.int64, device=device).reshape(1, 1)
    c2 = (ids & _MASK).unsqueeze(1)
    c3 = ((ids >> 32) | (stream << 16)).unsqueeze(1)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1)
    n0, n1 = box_muller(uint_to_uniform(r0), uint_to_uniform(r1))
    n2, n3 = box_muller(uint_to_uniform(r2), uint_to_uniform(r3))
    out = torch.stack((n0, n1, n2, n3), dim=-1).reshape(ids.numel(), n_ctr * 4)[:, :numel]
    return out.reshape(ids.numel(), *shape)


def keyed(
    seed: int,
    stream: int,
    sample_ids: torch.Tensor,
    shape: Sequence[int],
    step_offset: int = 0,
) -> Callable[[int], torch.Tensor]:
    """``i -> randn(seed, stream, step_offset + i, sample_ids, shape)``: the keyed stream as the
    reference's ``noise`` callable."""

    def draw(i: int) -> torch.Tensor:
        return randn(seed, stream, step_offset + i, sample_ids, shape)

    return draw
