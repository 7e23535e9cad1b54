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
words (for tests and tools), and the argument helpers shared by the update kernels live here.
"""

import math
import operator
import types
from collections.abc import Sequence

import torch

from puregen_fast import noise as _pgnoise

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton wheel (macOS, Windows): the eager twins must still import

    class _MissingKernel:
        """Stands in for a ``@triton.jit`` function when triton is not installed."""

        def __init__(self, fn):
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.__name__}: triton is not installed; use the eager twin")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__}: triton is not installed; use the eager twin")

    def _missing_jit(fn=None, **kwargs):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    triton = types.SimpleNamespace(jit=_missing_jit, __version__=None)
    tl = types.SimpleNamespace(constexpr=object)
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "philox_words",
    "randn4",
    "lanes4",
    "randn_at",
    "row_tile",
    "load_scalar",
    "randn_triton",
    "philox_triton",
    "kernels_interpreted",
    "check_state",
    "check_operand",
]

_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def load_scalar(arg, IS_PTR: tl.constexpr):
    """``tl.load(arg)`` when the host passed a device tensor (graph-safe), else ``arg`` itself."""
    if IS_PTR:
        v = tl.load(arg)
    else:
        v = arg
    return v


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


# --------------------------------------------------------------------------------------------
# host helpers shared by the launchers
# --------------------------------------------------------------------------------------------
def kernels_interpreted() -> bool:
    """Whether this module's kernels were built for the CPU interpreter (``TRITON_INTERPRET=1``
    was set when `puregen_fast.kernels` was first imported)."""
    return HAS_TRITON and type(_noise_kernel).__name__ == "InterpretedFunction"


def check_launchable(device: torch.device) -> None:
    """Raise a clear error where a Triton launch on ``device`` cannot work."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the eager twin")
    if device.type != "cuda" and not kernels_interpreted():
        raise RuntimeError(
            f"Triton kernels need a CUDA tensor (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing puregen_fast.kernels, or use the eager twin"
        )


def scalar_arg(
    v: int | torch.Tensor, name: str, device: torch.device, lo: int, hi: int
) -> tuple[int | torch.Tensor, bool]:
    """A per-call integer argument as the kernel takes it: ``(value, is_pointer)``.

    A tensor (0-d or one element, integer, on ``device``) is passed by pointer and read in the
    kernel, so a CUDA graph replay sees its current value; its range is not checked (that would
    sync). A Python int is range-checked against ``[lo, hi)`` and passed by value.
    """
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(
                f"{name}: expected a 0-d or one-element tensor, got shape {tuple(v.shape)}"
            )
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but the data is on {device}")
        if v.dtype != torch.int64:
            v = v.to(torch.int64)  # a captured cast, so still read fresh at each replay
        return v, True
    v = operator.index(v)
    if not lo <= v < hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}); got {v}")
    return v, False


def check_state(x: torch.Tensor, name: str) -> None:
    """The updated state: float32 (the state is always fp32) with a batch dimension."""
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (the state is always fp32), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension")


def check_operand(x: torch.Tensor, name_x: str, y: torch.Tensor, name_y: str) -> None:
    """A per-element input read beside the state (grad, eps): its shape and device, fp32 or
    bf16."""
    if y.shape != x.shape:
        raise ValueError(f"{name_y} shape {tuple(y.shape)} != {name_x} shape {tuple(x.shape)}")
    if y.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{name_y} must be float32 or bfloat16, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"{name_y} is on {y.device} but {name_x} is on {x.device}")


def ids_arg(
    sample_ids: Sequence[int] | torch.Tensor, batch: int, device: torch.device
) -> torch.Tensor:
    """Sample ids as a contiguous int64 (B,) tensor on ``device`` (range checked off-GPU only)."""
    if isinstance(sample_ids, torch.Tensor):
        if sample_ids.device != device:
            raise ValueError(f"sample_ids are on {sample_ids.device} but the data is on {device}")
        if sample_ids.dtype != torch.int64:
            raise TypeError(f"sample_ids must be int64, got {sample_ids.dtype}")
        ids = sample_ids.reshape(-1).contiguous()
    else:
        ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=device).reshape(-1)
    if ids.numel() != batch:
        raise ValueError(f"{ids.numel()} sample ids for a batch of {batch}")
    if ids.numel() and ids.device.type == "cpu":  # on GPU this check would sync
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= _pgnoise.MAX_SAMPLE_ID:
            raise ValueError(f"sample ids must lie in [0, 2**48); got range [{lo}, {hi}]")
    return ids


def stream_arg(stream: int) -> int:
    stream = operator.index(stream)
    if not 0 <= stream < _pgnoise.MAX_STREAM:
        raise ValueError(f"stream must lie in [0, 2**16); got {stream}")
    return stream


def seed_step_args(
    seed: int | torch.Tensor, step: int | torch.Tensor, device: torch.device
) -> tuple[int | torch.Tensor, bool, int | torch.Tensor, bool]:
    s, s_ptr = scalar_arg(seed, "seed", device, 0, 1 << 63)
    k, k_ptr = scalar_arg(step, "step", device, 0, 1 << 32)
    return s, s_ptr, k, k_ptr


def pick_block(n_per_row: int, block: int | None) -> tuple[int, int]:
    """(elements per program, num_warps). Big blocks in the interpreter (few, slow programs).
    On GPU 512..2048 elements per program, picking the size that wastes the fewest masked lanes
    of a row (masked lanes still pay for Philox), e.g. 1024 for a 3x32x32 image; 8 elements
    (2 Philox counters, two 16-byte accesses per tensor) per thread."""
    if block is not None:
        if block < 4 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 4; got {block}")
    elif kernels_interpreted():
        block = max(16, min(16384, 1 << max(0, (n_per_row - 1).bit_length())))
    elif n_per_row <= 512:
        block = max(16, 1 << max(0, (n_per_row - 1).bit_length()))
    else:  # min over padded row length; ties go to the larger block
        block = min((2048, 1024, 512), key=lambda b: -(-n_per_row // b) * b)
    num_warps = max(1, min(8, block // 256))
    return block, num_warps


def device_guard(device: torch.device):
    """Launch on the tensors' GPU even when another one is current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


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
