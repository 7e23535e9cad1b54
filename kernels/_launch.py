"""What every kernel launcher of `puregen_fast.kernels` shares (DESIGN 6): triton, or a stand-in
where it is not installed (the modules still import and the eager twins run), and the launch
helpers: whether the kernels run here (`check_launchable`, `kernels_interpreted`), the per-call
arguments as the kernels take them (`scalar_arg` and its device side `load_scalar`, `ids_arg`,
`stream_arg`, `seed_step_args`), the checks of the state and its operands, the block size
(`pick_block`) and the device guard. The keyed noise inside the kernels is `_noise`'s.
"""

import contextlib
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
    "triton",
    "tl",
    "load_scalar",
    "kernels_interpreted",
    "check_launchable",
    "scalar_arg",
    "check_state",
    "check_operand",
    "ids_arg",
    "stream_arg",
    "seed_step_args",
    "pick_block",
    "device_guard",
]


# --------------------------------------------------------------------------------------------
# device side
# --------------------------------------------------------------------------------------------
@triton.jit
def load_scalar(arg, IS_PTR: tl.constexpr):
    """``tl.load(arg)`` when the host passed a device tensor (graph-safe), else ``arg`` itself."""
    if IS_PTR:
        v = tl.load(arg)
    else:
        v = arg
    return v



# --------------------------------------------------------------------------------------------
# host helpers shared by the launchers
# --------------------------------------------------------------------------------------------
def kernels_interpreted() -> bool:
    """Whether the kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` was set
    when `puregen_fast.kernels` was first imported)."""
    return HAS_TRITON and type(load_scalar).__name__ == "InterpretedFunction"


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
    return contextlib.nullcontext()
