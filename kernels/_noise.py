"""The keyed noise stream of `puregen_fast.noise` inside Triton kernels (DESIGN 2.2).

`puregen_fast.noise.randn` is the contract: Philox4x32-10 keyed by the 64-bit seed, counter
``(element // 4, step, sample_id & 0xFFFFFFFF, (stream << 16) | (sample_id >> 32))``, the four
words turned into four normals the way ``tl.randn4x`` does (uniform, then Box-Muller on the pairs
(w0, w1) and (w2, w3)); element ``e`` takes lane ``e % 4``. The ``@triton.jit`` helpers here
compute exactly that, so a kernel's noise depends only on (seed, stream, step, sample id,
element) and never on its block size, grid or batch.

Kernels should process whole counters: a block of counters ``c`` gives four blocks of normals
(one Philox call per four elements, a quarter of the RNG work of one call per element), which
`lanes4` lays out as a ``[BLOCK_C, 4]`` tile for elements ``4 * c + lane`` (contiguous in memory,
so loads and stores stay vectorised). `randn_at` serves arbitrary element indices at one Philox
call per element.

On CUDA the Box-Muller transcendentals (``tl.log``, ``tl.cos``, ``tl.sin``) may use the GPU's
fast approximations, so GPU normals agree with `puregen_fast.noise.randn` to float tolerance (a
few 1e-7 typically), not bit for bit; the Philox words are bit-exact everywhere. Under
``TRITON_INTERPRET=1`` (numpy) the normals match to ~1e-7.

Host side: `randn_triton` and `philox_triton` launch a kernel that writes the raw normals or
words (for tests and tools). The launch helpers every kernel shares (argument checks, block
sizes, device guard, triton or its stand-in) are `_launch`'s.
"""

import math
from collections.abc import Sequence

import torch

from ._launch import (
    HAS_TRITON,
    check_launchable,
    device_guard,
    ids_arg,
    kernels_interpreted,
    load_scalar,
    pick_block,
    seed_step_args,
    stream_arg,
    tl,
    triton,
)

__all__ = [
    "HAS_TRITON",
    "philox_words",
    "randn4",
    "lanes4",
    "randn_at",
    "row_tile",
    "randn_triton",
    "philox_triton",
    "kernels_interpreted",
]

_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# device helpers: the keyed stream
# --------------------------------------------------------------------------------------------
@triton.jit
def philox_words(seed, stream, step, sample_id, ctr):
    """The four uint32 Philox4x32-10 words of counters ``ctr`` (int block: element // 4) of
    sample(s) ``sample_id`` (int64 scalar or a block broadcastable against ``ctr``)."""
    sid = sample_id.to(tl.int64)
    c0 = ctr.to(tl.uint32)
    c2 = (sid & 0xFFFFFFFF).to(tl.uint32)
    # only the low 32 bits matter: a sign-extended int32 ``stream << 16`` is truncated away
    c3 = ((sid >> 32) | (stream << 16)).to(tl.uint32)
    c0 = c0 + c2 * 0  # broadcast every counter word to the full block shape
    zero = c0 * 0
    c1 = zero + step.to(tl.uint32)
    c2 = zero + c2
    c3 = zero + c3
    return tl.philox(seed.to(tl.int64), c0, c1, c2, c3)


@triton.jit
def randn4(seed, stream, step, sample_id, ctr):
    """The four normals (lanes 0..3, float32 blocks shaped like ``ctr``) of counters ``ctr``:
    elements ``4 * ctr + lane`` of `puregen_fast.noise.randn`."""
    r0, r1, r2, r3 = philox_words(seed, stream, step, sample_id, ctr)
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    u2 = tl.random.uint_to_uniform_float(r2)
    u3 = tl.random.uint_to_uniform_float(r3)
    n0, n1 = tl.random.pair_uniform_to_normal(u0, u1)
    n2, n3 = tl.random.pair_uniform_to_normal(u2, u3)
    return n0, n1, n2, n3


@triton.jit
def lanes4(n0, n1, n2, n3):
    """Four 1-D lane blocks -> one ``[BLOCK_C, 4]`` tile, row c = elements 4c .. 4c+3."""
    lane = tl.arange(0, 4)[None, :]
    return tl.where(
        lane == 0,
        n0[:, None],
        tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])),
    )


@triton.jit
def row_tile(n_chunks, n_per_row, BLOCK_C: tl.constexpr):
    """This program's tile of a (B, n_per_row) tensor: one image row, BLOCK_C Philox counters =
    4 * BLOCK_C contiguous elements. Returns (row, counters, flat offsets, in-bounds mask)."""
    pid = tl.program_id(0)
    row = pid // n_chunks
    ctr = (pid % n_chunks) * BLOCK_C + tl.arange(0, BLOCK_C)
    elem = ctr[:, None] * 4 + tl.arange(0, 4)[None, :]
    return row, ctr, row.to(tl.int64) * n_per_row + elem, elem < n_per_row


@triton.jit
def randn_at(seed, stream, step, sample_id, elem):
    """Normals at arbitrary element indices ``elem`` (one Philox call per element; prefer
    `randn4` + `lanes4` when the layout allows)."""
    n0, n1, n2, n3 = randn4(seed, stream, step, sample_id, elem // 4)
    lane = elem % 4
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit(do_not_specialize=["seed", "step", "stream"])
def _noise_kernel(
    out_ptr,
    ids_ptr,
    seed,
    step,
    stream,
    n_per_row,
    n_ctr,
    n_chunks,
    SEED_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr,
    RAW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program: one sample row, BLOCK_C counters (4 * BLOCK_C elements)
    pid = tl.program_id(0)
    row = pid // n_chunks
    chunk = pid % n_chunks
    ctr = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    seed_v = load_scalar(seed, SEED_PTR)
    step_v = load_scalar(step, STEP_PTR)
    sid = tl.load(ids_ptr + row)
    if RAW:
        # out: int32 (B, n_ctr, 4), word w of counter c at [row, c, w]
        r0, r1, r2, r3 = philox_words(seed_v, stream, step_v, sid, ctr)
        w = lanes4(
            r0.to(tl.int32, bitcast=True),
            r1.to(tl.int32, bitcast=True),
            r2.to(tl.int32, bitcast=True),
            r3.to(tl.int32, bitcast=True),
        )
        offs = ctr[:, None] * 4 + tl.arange(0, 4)[None, :]
        mask = ctr[:, None] < n_ctr
        tl.store(out_ptr + row.to(tl.int64) * (n_ctr * 4) + offs, w, mask=mask)
    else:
        n0, n1, n2, n3 = randn4(seed_v, stream, step_v, sid, ctr)
        z = lanes4(n0, n1, n2, n3)
        elem = ctr[:, None] * 4 + tl.arange(0, 4)[None, :]
        tl.store(out_ptr + row.to(tl.int64) * n_per_row + elem, z, mask=elem < n_per_row)


def _launch_noise(seed, stream, step, sample_ids, shape, device, block, raw) -> torch.Tensor:
    dev = (
        torch.device(device)
        if device is not None
        else (sample_ids.device if isinstance(sample_ids, torch.Tensor) else torch.device("cpu"))
    )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    check_launchable(dev)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if isinstance(sample_ids, torch.Tensor):
        b = sample_ids.numel()
    else:
        sample_ids = list(sample_ids)
        b = len(sample_ids)
    ids = ids_arg(sample_ids, b, dev)
    stream = stream_arg(stream)
    s, s_ptr, k, k_ptr = seed_step_args(seed, step, dev)
    n_ctr = (n + 3) // 4
    if raw:
        out = torch.full((b, n_ctr, 4), -1, dtype=torch.int32, device=dev)
    else:
        out = torch.full((b, *shape), float("nan"), dtype=torch.float32, device=dev)
    if b == 0 or n == 0:
        return out
    blk, warps = pick_block(n, block)
    n_chunks = triton.cdiv(n_ctr, blk // 4)
    with device_guard(dev):
        _noise_kernel[(b * n_chunks,)](
            out, ids, s, k, stream, n, n_ctr, n_chunks,
            SEED_PTR=s_ptr, STEP_PTR=k_ptr, RAW=raw, BLOCK_C=blk // 4, num_warps=warps,
        )  # fmt: skip
    return out


def randn_triton(
    seed: int | torch.Tensor,
    stream: int,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """`puregen_fast.noise.randn` computed by a Triton kernel: float32 ``(B, *shape)``."""
    return _launch_noise(seed, stream, step, sample_ids, shape, device, block, raw=False)


def philox_triton(
    seed: int | torch.Tensor,
    stream: int,
    step: int | torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """The raw Philox words behind `randn_triton`: int64 ``(B, ceil(numel/4), 4)`` holding the
    uint32 values (word w of counter c at ``[:, c, w]``), comparable with
    `puregen_fast.noise.philox4x32` bit for bit."""
    out = _launch_noise(seed, stream, step, sample_ids, shape, device, block, raw=True)
    return out.to(torch.int64) & _MASK32
