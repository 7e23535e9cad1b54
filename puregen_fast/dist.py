"""The torchrun process group, one for ``purify`` and ``train``, and its single-process stand-in.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) `Dist.from_env` joins the
group (NCCL on CUDA, gloo on CPU) and pins rank r to ``cuda:LOCAL_RANK``; alone it is a no-op
with the same interface, so callers never branch on the world size.

* objects: `gather`, `broadcast`, `check` (a failure on any rank raises on every rank, so none
  waits forever at the next collective), `staged` (rank 0 first: downloads, cache fills),
  `on_rank0`;
* tensors (training): `shard` (this rank's slice of a global batch), `all_gather_cat`,
  `all_reduce_mean`, `all_reduce_max`, `barrier`.

Training draws the *global* batch's random numbers on every rank and keeps its own slice, so a
run's numbers do not depend on the number of ranks (up to the order of the gradient all-reduce).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from puregen_fast.errors import UsageError
from puregen_fast.runtime import resolve_device

__all__ = ["Dist"]

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @classmethod
    def from_env(cls, device: str | torch.device = "auto") -> Dist:
        """Join the torchrun group when WORLD_SIZE > 1; ``device`` as `--device` gives it
        (UsageError when it is not a device or not here)."""
        try:
            dev = resolve_device(device)
        except ValueError as e:
            raise UsageError(f"--device: {e}") from None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=dev)
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        owns = False
        if not tdist.is_initialized():
            tdist.init_process_group(
                "nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60)
            )
            owns = True
        return cls(rank, world, local, dev, owns)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- objects ------------------------------------------------------------------------------
    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.gather(obj if self.is_main else None)[0]

    def check(self, err: BaseException | None) -> None:
        """Collective: raise on every rank when any rank failed (so none waits forever)."""
        msg = None if err is None else (isinstance(err, UsageError), str(err))
        msgs = self.gather(msg)
        if err is not None:
            raise err
        for r, m in enumerate(msgs):
            if m is not None:
                cls = UsageError if m[0] else RuntimeError
                raise cls(f"rank {r}: {m[1]}")

    def _turn(self, mine: bool, fn: Callable[[], T]) -> T | None:
        """``fn()`` where ``mine``; then, collectively, any rank's failure raised everywhere."""
        err, res = None, None
        if mine:
            try:
                res = fn()
            except Exception as e:
                err = e
        self.check(err)
        return res

    def staged(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 first (downloads, cache fills), then on the other ranks."""
        first = self._turn(self.is_main, fn)
        rest = self._turn(not self.is_main, fn)
        return first if self.is_main else rest  # type: ignore[return-value]

    def on_rank0(self, fn: Callable[[], T]) -> T | None:
        return self._turn(self.is_main, fn)

    # -- tensors ------------------------------------------------------------------------------
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

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
        self.owns_group = False
