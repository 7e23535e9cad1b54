"""Process group set-up for multi-GPU training under ``torchrun`` (DDP), and a single-process
stand-in with the same interface.

Every rank draws the *global* batch's random numbers from the same seeded generator and keeps its
own slice, so a run's numbers do not depend on the number of ranks (up to the order of the
gradient all-reduce).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as tdist

from puregen_fast.errors import UsageError

__all__ = ["Dist", "setup_dist"]

T = TypeVar("T")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` (n divisible by world)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t)
            t /= self.world
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 first (a download, a cache build), then on the other ranks."""
        if not self.is_main:
            self.barrier()
        try:
            return fn()
        finally:
            if self.is_main:
                self.barrier()

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


def _resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return dev


def setup_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0, _resolve(device))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local, dev, owns)
