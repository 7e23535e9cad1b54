"""`puregen-fast train {ebm,ddpm}`: flags from the recipe dataclasses (every hyper-parameter a
flag, the paper's value its default). Multi-GPU: ``torchrun --nproc-per-node 8 -m
puregen_fast.cli train ebm ...`` (each rank joins the process group; rank 0 writes)."""

from __future__ import annotations

import argparse
import os
import sys

from puregen_fast.train.config import DDPMConfig, EBMConfig, add_config_arguments, config_from_args

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
        loader = "pg.load_ebm" if name == "ebm" else "pg.load_ddpm"
        what = {"done": "all epochs", "steps": "--steps", "interrupted": "an interrupt"}[
            result.stopped
        ]
        print(
            f"train {name}: stopped after {result.step} of {result.total_steps} steps ({what}); "
            f"weights in {str(result.out_dir)!r} ({loader}); checkpoint {result.checkpoint}; "
            f"continue with --resume",
            file=sys.stderr,
        )
    return 0
