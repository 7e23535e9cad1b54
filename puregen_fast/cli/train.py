"""`puregen-fast train {ebm,ddpm}`: flags from the recipe dataclasses (every hyper-parameter a
flag, the paper's value its default). Multi-GPU: ``torchrun --nproc-per-node 8 -m
puregen_fast.cli train ebm ...`` (each rank joins the process group; rank 0 writes)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from puregen_fast.train.config import (
    EBM_RECIPES,
    DDPMConfig,
    EBMConfig,
    add_config_arguments,
    config_from_args,
    recipe_flags,
)

if TYPE_CHECKING:
    from puregen_fast.train.loop import TrainResult

__all__ = ["add_arguments", "run"]

_RECIPES = {
    "ebm": (EBMConfig, "train the paper's EBM (persistent contrastive divergence)"),
    "ddpm": (DDPMConfig, "train the paper's purification DDPM (timesteps in [0, 250))"),
}


# the named recipes of each subcommand (`--recipe NAME`)
_NAMED: dict[str, dict[str, dict[str, Any]]] = {"ebm": EBM_RECIPES}


class _RecipeDefaults:
    """Mixed into train's parsers: the values of ``--recipe NAME`` are in the namespace before
    the flags are read (argparse then leaves them as defaults), so every flag given wins over
    the recipe, before or after ``--recipe`` on the line, a value equal to the paper's default
    included. The parser itself is not changed: its next parse starts from the paper's values."""

    named: dict[str, dict[str, Any]] = {}

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.named:
            # the flag as the parser reads it (an abbreviation too); a malformed line is left to
            # the parser's own error
            pre = argparse.ArgumentParser(
                add_help=False, allow_abbrev=self.allow_abbrev, exit_on_error=False
            )
            pre.add_argument("--recipe")
            try:
                name = pre.parse_known_args(args)[0].recipe
            except argparse.ArgumentError:
                name = None
            if name in self.named:  # an unknown name is refused by the parser's choices
                namespace = namespace if namespace is not None else argparse.Namespace()
                for k, v in self.named[name].items():
                    if not hasattr(namespace, k):
                        setattr(namespace, k, v)
        return super().parse_known_args(args, namespace)  # type: ignore[misc]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the subcommands' parsers are of the caller's class (its error handling), plus recipes
    cls_ = type("TrainParser", (_RecipeDefaults, type(parser)), {})
    sub = parser.add_subparsers(dest="train_command", metavar="{ebm,ddpm}", parser_class=cls_)
    for name, (cls, help_) in _RECIPES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_config_arguments(p, cls)
        named = _NAMED.get(name, {})
        if named:
            p.named = named  # type: ignore[attr-defined]
            p.add_argument(
                "--recipe",
                choices=tuple(named),
                default=None,
                help="start from a named recipe the project chose and measured; the flags given "
                "override it. "
                + "; ".join(f"{k}: {recipe_flags(v)}" for k, v in named.items()),
            )


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "train_command", None)
    if name is None:
        print(
            "puregen-fast train: choose a recipe: `train ebm ...` or `train ddpm ...` (see --help)",
            file=sys.stderr,
        )
        return 2
    cfg = config_from_args(_RECIPES[name][0], args)
    recipe = getattr(args, "recipe", None)
    if recipe is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"train {name}: recipe {recipe}: {recipe_flags(_NAMED[name][recipe])} "
              "(a flag given overrides it)", file=sys.stderr)  # fmt: skip
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
