"""``puregen-fast purify``: the flags (from `PurifyConfig`), the models and the data set, then
`pipeline.purify_dataset` (DESIGN 4). Under torchrun rank 0 loads models and data first (the
others then read the caches) and checks ``--out``; WebDataset shards are counted once, on rank 0,
and the count sent to the other ranks."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from puregen_fast import methods
from puregen_fast.config import PurifyConfig, add_arguments
from puregen_fast.data.datasets import Dataset, open_dataset
from puregen_fast.data.webdataset import index_webdataset, open_webdataset
from puregen_fast.data.writer import check_out_dir
from puregen_fast.dist import Dist
from puregen_fast.errors import UsageError
from puregen_fast.pipeline import purify_dataset
from puregen_fast.purifier import Purifier, chain_line, load_models
from puregen_fast.runtime import resolve_device
from puregen_fast.sampling.backends import fast_available

__all__ = ["add_arguments", "run"]

T = TypeVar("T")


def _config(args: argparse.Namespace) -> PurifyConfig:
    """The flags as a checked `PurifyConfig` (checks argparse cannot do alone)."""
    try:
        cfg = PurifyConfig.from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    model_free = methods.get(cfg.method).model_free
    if cfg.precision != "fp32" and cfg.backend != "reference" and not model_free:
        # never fall back silently to another precision's numbers: say so, exit 2
        ok, why = fast_available(resolve_device(cfg.device), cfg.precision)
        if not ok:
            raise UsageError(
                f"--precision {cfg.precision}: the fast path cannot run it here ({why}); use "
                "--precision fp32, or --backend reference to run the eager reference in "
                f"{cfg.precision}"
            )
    return cfg


class _Inputs:
    """The run's models and data, each loaded (rank 0 first) on its own, so that every problem
    (a missing checkpoint, a missing data set, offline) is found in one go and reported in one
    message, not one per attempt."""

    def __init__(self, dist: Dist) -> None:
        self.dist, self.problems = dist, []

    def load(self, fn: Callable[[], T]) -> T | None:
        try:
            return self.dist.staged(fn)
        except UsageError as e:
            self.problems.append(str(e))
            return None

    def attempt(self, flag: str, fn: Callable[[], T]) -> T | None:
        """`load` as `puregen_fast.purifier.load_models` calls it (the flag is in the message)."""
        return self.load(fn)

    def load_once(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only, its result sent to every rank."""
        try:
            return self.dist.broadcast(self.dist.on_rank0(fn))
        except UsageError as e:
            self.problems.append(str(e))
            return None

    def check(self) -> None:
        if len(self.problems) == 1:
            raise UsageError(self.problems[0])
        if self.problems:
            listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
            raise UsageError(f"{len(self.problems)} problems, fix them all before rerunning:\n"
                             f"{listed}")  # fmt: skip


def load_dataset(cfg: PurifyConfig, inputs: _Inputs) -> Dataset | None:
    """The data set the flags name (None, with the problem noted in ``inputs``, when it cannot
    be read). WebDataset shards are counted once, on rank 0, and the count sent to the others."""
    if cfg.dataset == "webdataset":
        index = inputs.load_once(
            lambda: index_webdataset(cfg.data_dir, limit=cfg.limit,
                                     max_pixels=cfg.max_image_pixels)  # fmt: skip
        )
        return index and open_webdataset(cfg.data_dir, cfg.split, index=index,
                                         max_pixels=cfg.max_image_pixels)  # fmt: skip
    return inputs.load(
        lambda: open_dataset(cfg.dataset, cfg.data_dir, cfg.split, quiet=cfg.quiet,
                             limit=cfg.limit, max_pixels=cfg.max_image_pixels)  # fmt: skip
    )


def _purifier(cfg: PurifyConfig, device: torch.device, ebm, ddpm) -> Purifier:
    try:
        return Purifier.from_config(cfg, ebm, ddpm, device=device)
    except ValueError as e:
        msg = str(e)
        flag = "--backend" if "backend" in msg else "--device" if "device" in msg else None
        flag = "--conv-impl" if "conv_impl" in msg else flag
        raise UsageError(f"{flag + ': ' if flag else ''}{msg}") from e


def run(args: argparse.Namespace) -> int:
    """The ``purify`` subcommand."""
    cfg = _config(args)
    if cfg.precision == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # each rank would time for itself, and might choose otherwise
        raise UsageError("--precision auto under torchrun: every rank must compute alike; give "
                         "fp32 or bf16 (a single-process run with auto says which is faster)")
    dist = Dist.from_env(cfg.device)
    try:
        out = Path(cfg.out).expanduser()
        dist.on_rank0(lambda: check_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite))
        t0 = time.perf_counter()
        inputs = _Inputs(dist)
        ebm, ddpm = load_models(cfg.method, cfg.ebm, cfg.ddpm, attempt=inputs.attempt)
        t_models = time.perf_counter() - t0
        dataset = load_dataset(cfg, inputs)
        inputs.check()
        purifier = _purifier(cfg, dist.device, ebm, ddpm)
        if purifier.uses_ebm and dist.is_main:
            print(f"purify: {chain_line(purifier)}", file=sys.stderr)
        note = purifier.precision_note() if dist.is_main and not cfg.quiet else None
        if note:
            print(f"purify: {note}", file=sys.stderr)
        if purifier.precision_reason and dist.is_main:
            print(f"purify: precision {purifier.config.precision} ({purifier.precision_reason})",
                  file=sys.stderr)  # fmt: skip
        t_data = time.perf_counter() - t0 - t_models
        command = {**cfg.to_dict(), "out": str(out.absolute())}
        purify_dataset(
            dataset,
            purifier,
            out,
            batch_size=cfg.batch_size,
            shard_size=cfg.shard_size,
            fmt=cfg.format,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            quiet=cfg.quiet,
            limit=cfg.limit,
            dist=dist,
            preview=cfg.preview,
            extra_manifest={
                "command": dict(sorted(command.items())),
                "setup_timings": {"models_s": round(t_models, 4), "data_s": round(t_data, 4)},
            },
        )
    finally:
        dist.close()
    return 0
