"""`puregen-fast train {ebm,ddpm}`: flags from the recipe dataclasses (every hyper-parameter a
flag, the paper's value its default). Multi-GPU: ``torchrun --nproc-per-node 8 -m
puregen_fast.cli train ebm ...`` (each rank joins the process group; rank 0 writes)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from puregen_fast.train.config import DDPMConfig, EBMConfig, add_config_arguments, config_from_args

if TYPE_CHECKING:
    from puregen_fast.train.loop import TrainResult

__all__ = ["add_arguments", "run"]

_RECIPES = {
    "ebm": (EBMConfig, "train the paper's EBM (persistent contrastive divergence)"),
    "ddpm": (DDPMConfig, "train the paper's purification DDPM (timesteps in [0, 250))"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", metavar="{ebm,ddpm}")
    for name, (cls, help_) in _RECIPES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_config_arguments(p, cls)


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "train_command", None)
    if name is None:
        print(
            "puregen-fast train: choose a recipe: `train ebm ...` or `train ddpm ...` (see --help)",
            file=sys.stderr,
        )
        return 2
    cfg = config_from_args(_RECIPES[name][0], args)
    if name == "ebm":
        from puregen_fast.train.ebm import train_ebm as train
    else:
        from puregen_fast.train.ddpm import train_ddpm as train
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is closed by now
        print(_last_line(name, result), file=sys.stderr)
    # interrupted: what was done is saved, but `train && purify` must not go on (DESIGN 4)
    return 130 if result.stopped == "interrupted" else 0


def _last_line(name: str, result: TrainResult) -> str:
    """Where things stand and what to do next."""
    out, loader = str(result.out_dir), "pg.load_ebm" if name == "ebm" else "pg.load_ddpm"
    done = f"{result.step} of {result.total_steps} steps"
    if result.stopped == "done":
        return (
            f"train {name}: finished, {done}; weights in {out!r}: purify with "
            f"`puregen-fast purify --{name} {out} ...` or load with {loader}({out!r})"
        )
    why = "an interrupt" if result.stopped == "interrupted" else "--steps"
    return (
        f"train {name}: stopped after {done} ({why}); checkpoint {result.checkpoint}, its "
        f"weights in {out!r} ({loader}); continue with the same command and --resume"
    )
