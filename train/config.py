"""Training configurations: one dataclass per recipe, every hyper-parameter a field whose default
is the paper's value, and the command-line flags generated from the fields.

A field's metadata says whether it belongs to the *recipe* (it changes the numbers a run
computes, so ``--resume`` refuses a checkpoint written with another value) or to *run control*
(where to write, how long to run, how often to log, which device: free to change on resume).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from puregen_fast import paper
from puregen_fast.config import (
    CONV_IMPLS,
    DEFAULT_DIVERGENCE_MARGIN,
    MAX_BATCH,
    MAX_IMAGES,
    MAX_LANGEVIN_STEPS,
    MAX_MARGIN,
    MAX_POSITIVE,
    MAX_SEED,
    Check,
    arg_type,
    float_in,
    int_in,
    positive,
)
from puregen_fast.errors import UsageError
from puregen_fast.models.unet import UNET_PRESETS

__all__ = [
    "OBJECTIVES",
    "EBMConfig",
    "DDPMConfig",
    "EBM_RECIPES",
    "ebm_recipe",
    "recipe_flags",
    "add_config_arguments",
    "check_config",
    "config_from_args",
    "recipe_of",
    "UNET_PRESETS",
]


OBJECTIVES = ("pcd", "dsm")
# recipe fields added after runs were written: a checkpoint without one ran with this value
RECIPE_DEFAULTS = {"objective": "pcd", "dsm_sigma_min": 1e-2, "dsm_sigma_max": 0.2}


# the upper ends of the ranges (README "Flag ranges"): far past the paper's runs (about 170,000
# optimiser steps, nf 128, a bank of 10,000), low enough that a typo cannot ask for an
# allocation the size of a disk or a run that never ends
MAX_TRAIN_STEPS = 10**9
MAX_EPOCHS = 10**6
MAX_NF = 1024  # 8x the paper's width; nf 65536 asks for 154 GB
MAX_PATCH = 64
MAX_BANK = 100_000  # 1.2 GB of fp32 chains at 32x32; 10x the paper's
MAX_WINDOW = 100_000  # the watch takes medians over its windows every step
MAX_TIMESTEPS = 100_000
ANY_STEPS = int_in(0, MAX_TRAIN_STEPS)
EVERY = int_in(1, MAX_TRAIN_STEPS)
NON_NEGATIVE = float_in(0.0, MAX_POSITIVE)
BETA = float_in(0.0, 1.0, hi_open=True)  # Adam's betas and the EMA decay: 1 never forgets


def _f(
    default: Any, help: str, *, run: bool = False, check: Check | None = None, **argparse_kw: Any
) -> Any:
    """A field: ``check`` is the flag's type and range (`config.int_in`, `float_in`, ...), also
    applied to a config built in Python (`check_config`)."""
    md = {"help": help, "run": run, "check": check, **argparse_kw}
    return field(default=default, metadata=md)


@dataclass
class _Common:
    # -- data (recipe) ---------------------------------------------------------------------
    dataset: str = _f(
        "cinic10-imagenet",
        "training set: cifar10, cinic10, cinic10-imagenet (the paper's, for the CIFAR-10 "
        "models), tinyimagenet, imagefolder, npz",
    )
    data_dir: str | None = _f(None, "where the data set lies (default: download into the cache)")
    split: str = _f("train", "which split to train on")
    limit: int | None = _f(
        None, "use only the first N images (quick runs)", check=int_in(1, MAX_IMAGES)
    )
    classes: str | None = _f(None, "comma-separated class names or indices to train on")
    hflip: bool = _f(False, "random horizontal flips (off in the paper)")
    seed: int = _f(
        0, "seed of the data order, the bank and every noise draw", check=int_in(0, MAX_SEED)
    )
    precision: str = _f(
        "fp32", "model math: fp32, tf32, or bf16 autocast", choices=("fp32", "tf32", "bf16")
    )
    # -- run control -----------------------------------------------------------------------
    out: str = _f("", "output directory (weights, checkpoints, metrics, plots)", run=True)
    resume: str | None = _f(
        None,
        "continue the run in --out (or from this run/checkpoint directory) exactly",
        run=True,
        nargs="?",
        const="",
    )
    force_resume: bool = _f(
        False,
        "with --resume: accept changed recipe flags (e.g. a stabiliser after a rollback)",
        run=True,
    )
    steps: int | None = _f(
        None, "stop after this many optimiser steps in total", run=True, check=ANY_STEPS
    )
    device: str = _f("auto", "auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)", run=True)
    log_every: int = _f(10, "append to metrics.jsonl every N steps", run=True, check=EVERY)
    ckpt_every: int = _f(500, "checkpoint every N steps (and at the end)", run=True, check=EVERY)
    keep_ckpts: int = _f(3, "keep the newest N checkpoints", run=True, check=int_in(1, 10**6))
    sample_every: int = _f(
        5, "write a PNG sample grid and loss curve every N epochs", run=True, check=EVERY
    )
    progress: bool = _f(True, "show a progress bar", run=True)
    watch: bool = _f(True, "divergence watch: stop and roll back when training blows up", run=True)
    watch_factor: float = _f(
        100.0,
        "watch: fire when a metric exceeds this multiple of its recent median",
        run=True,
        check=float_in(1.0, MAX_POSITIVE, lo_open=True),
    )
    watch_patience: int = _f(
        5,
        "watch: consecutive steps over the limit before firing",
        run=True,
        check=int_in(1, MAX_WINDOW),
    )
    watch_window: int = _f(
        500, "watch: steps in the running median", run=True, check=int_in(1, MAX_WINDOW)
    )
    watch_warmup: int = _f(
        50,
        "watch: steps before the relative test starts",
        run=True,
        check=int_in(0, MAX_TRAIN_STEPS),
    )
    watch_max_energy: float | None = _f(
        None, "watch: absolute limit on |E| (EBM)", run=True, check=positive
    )
    watch_max_grad_norm: float | None = _f(
        None, "watch: absolute limit on the grad norm", run=True, check=positive
    )
    watch_trend_window: int = _f(
        200,
        "watch, slow blow-up: fire when the grad norm (DDPM: also the loss) grew more than "
        "--watch-trend-factor times within this many steps (medians over a quarter of it; 0: off)",
        run=True,
        check=int_in(0, MAX_WINDOW),
    )
    watch_trend_factor: float = _f(
        6.0,
        "watch: the growth the trend rule fires at",
        run=True,
        check=float_in(1.0, MAX_POSITIVE, lo_open=True),
    )
    watch_sample_margin: float = _f(
        DEFAULT_DIVERGENCE_MARGIN,
        "watch: training samples that are non-finite or leave [-1 - m, 1 + m] are a divergence "
        "(as purify's --divergence-margin); the sample grids are refused then too",
        run=True,
        check=float_in(0.0, MAX_MARGIN),
    )


@dataclass
class EBMConfig(_Common):
    """The paper's EBM recipe (persistent contrastive divergence), as its authors ran it."""

    objective: str = _f(
        "pcd",
        "pcd: the paper's persistent contrastive divergence; dsm: denoising score matching "
        "(no chains: fast and stable on a CPU, see the module docstring of train.ebm)",
        choices=OBJECTIVES,
    )
    dsm_sigma_min: float = _f(
        1e-2,
        "dsm: smallest noise std, in the [-1, 1] space",
        check=float_in(0.0, 100.0, lo_open=True),
    )
    dsm_sigma_max: float = _f(
        0.2,
        "dsm: largest noise std (drawn log-uniformly in between)",
        check=float_in(0.0, 100.0, lo_open=True),
    )
    nf: int = _f(128, "EBM width (EBMSNGAN32 nf)", check=int_in(1, MAX_NF))
    patch_size: int = _f(1, "EBM pixel-unshuffle patch size", check=int_in(1, MAX_PATCH))
    bank_size: int = _f(
        10000, "persistent MCMC bank size, in total over all ranks", check=int_in(1, MAX_BANK)
    )
    bank_init: str = _f(
        "data", "bank states start as noised data or uniform noise", choices=("data", "uniform")
    )
    rejuvenation: float = _f(
        0.05,
        "probability a chain restarts from a fresh noised data image",
        check=float_in(0.0, 1.0),
    )
    mcmc_steps: int = _f(100, "Langevin steps per update", check=int_in(1, MAX_LANGEVIN_STEPS))
    # the paper trains with the chain it purifies with (its sampling.json says so)
    mcmc_eps: float = _f(paper.LANGEVIN_EPS, "Langevin step size eps", check=positive)
    mcmc_temp: float = _f(
        paper.LANGEVIN_TEMP, "Langevin temperature (the loss is divided by it too)", check=positive
    )
    data_noise: float = _f(
        1.5e-2, "std of the Gaussian noise added to data images", check=float_in(0.0, 10.0)
    )
    lr: float = _f(1e-4, "Adam learning rate", check=positive)
    adam_beta1: float = _f(0.9, "Adam beta1", check=BETA)
    adam_beta2: float = _f(0.999, "Adam beta2", check=BETA)
    weight_decay: float = _f(0.0, "Adam weight decay", check=NON_NEGATIVE)
    batch_size: int = _f(
        128, "images per update, in total over all ranks", check=int_in(1, MAX_BATCH)
    )
    epochs: int = _f(120, "epochs", check=int_in(1, MAX_EPOCHS))
    lr_milestones: str = _f(
        "40,75,100", "epochs at which the learning rate is multiplied by --lr-gamma"
    )
    lr_gamma: float = _f(0.1, "learning-rate factor at each milestone", check=positive)
    # stabilisers, off by default so the paper's recipe stays the default
    grad_clip: float = _f(0.0, "clip the gradient norm to this (0: off)", check=NON_NEGATIVE)
    energy_reg: float = _f(
        0.0, "alpha of the penalty alpha * (E(data)^2 + E(samples)^2) (0: off)", check=NON_NEGATIVE
    )
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps (0: off)", check=ANY_STEPS)
    backend: str = _f(
        "auto",
        "Langevin sampler: auto (fast where it runs), fast, reference",
        run=True,
        choices=("auto", "fast", "reference"),
    )
    conv_impl: str = _f(
        "auto",
        "the fast sampler's EBM convolutions: torch (compiled), triton (the conv-block kernels), "
        "auto (on CUDA the faster, timed at the batch shape; torch on CPU)",
        run=True,
        choices=CONV_IMPLS,
    )


@dataclass
class DDPMConfig(_Common):
    """The paper's purification-specialised DDPM: diffusers' train_unconditional recipe with
    training timesteps drawn only from [0, --max-timestep)."""

    unet: str = _f(
        "paper",
        "UNet preset: paper (113.7M), small (6.5M), tiny (0.18M)",
        choices=tuple(UNET_PRESETS),
    )
    unet_config: str | None = _f(None, "a diffusers UNet2DModel config.json instead of --unet")
    num_train_timesteps: int = _f(1000, "DDPM schedule length", check=int_in(2, MAX_TIMESTEPS))
    beta_start: float = _f(
        1e-4, "linear schedule: first beta", check=float_in(0.0, 1.0, lo_open=True, hi_open=True)
    )
    beta_end: float = _f(
        0.02, "linear schedule: last beta", check=float_in(0.0, 1.0, lo_open=True, hi_open=True)
    )
    max_timestep: int = _f(
        250, "training timesteps are drawn from [0, N)", check=int_in(1, MAX_TIMESTEPS)
    )
    lr: float = _f(1e-4, "AdamW learning rate", check=positive)
    adam_beta1: float = _f(0.95, "AdamW beta1 (diffusers' train_unconditional)", check=BETA)
    adam_beta2: float = _f(0.999, "AdamW beta2", check=BETA)
    weight_decay: float = _f(1e-6, "AdamW weight decay", check=NON_NEGATIVE)
    adam_eps: float = _f(1e-8, "AdamW epsilon", check=positive)
    warmup_steps: int = _f(500, "linear warm-up steps of the cosine schedule", check=ANY_STEPS)
    batch_size: int = _f(
        256, "images per step, in total over all ranks", check=int_in(1, MAX_BATCH)
    )
    epochs: int = _f(150, "epochs", check=int_in(1, MAX_EPOCHS))
    grad_clip: float = _f(
        1.0, "clip the gradient norm (train_unconditional clips to 1.0; 0: off)", check=NON_NEGATIVE
    )
    ema: bool = _f(True, "keep an EMA of the weights")
    ema_max_decay: float = _f(0.9999, "EMA: maximum decay", check=BETA)
    ema_inv_gamma: float = _f(1.0, "EMA warm-up: inv_gamma", check=positive)
    ema_power: float = _f(0.75, "EMA warm-up: power", check=positive)
    save_weights: str = _f(
        "ema",
        "which weights --out holds at top level (the other go in a subdirectory)",
        run=True,
        choices=("ema", "raw"),
    )
    purify_steps: int = _f(
        paper.DDPM_STEPS,
        "DDPM steps of the purification demo in the sample grids",
        run=True,
        check=int_in(1, MAX_TIMESTEPS),
    )


# Named recipes for `train ebm --recipe NAME`: field values the project chose and measured,
# filled in under the flags given (a flag always wins, whatever its place on the line). Each
# value must pass its field's check (tests/test_quickstart.py holds it, and the README's text).
EBM_RECIPES: dict[str, dict[str, Any]] = {
    # README "Quick start": the recipe of README "A real-image experiment on a CPU" (PCD, not
    # DSM: there the DSM-trained EBM left most of a backdoor in place where PCD-trained ones
    # removed much of it; the reference sampler on the CPU, as it ran), stopped after 200 of its
    # updates so it trains in minutes on 2 CPU cores. The bank of 641 is the experiment's (its
    # held-apart set's size); --resume with a larger --steps goes on along the same recipe.
    "cpu-small": {
        "objective": "pcd",
        "nf": 16,
        "mcmc_steps": 15,
        "bank_size": 641,
        "batch_size": 64,
        "lr": 2e-4,
        "epochs": 70,
        "lr_milestones": "60,65",
        "steps": 200,
        "device": "cpu",
        "backend": "reference",
    },
}


def recipe_flags(values: dict[str, Any]) -> str:
    """A named recipe's values as the flags they stand for (its help and the README say this)."""
    return " ".join(f"{_flag(k)} {v}" for k, v in values.items())


def ebm_recipe(name: str, **overrides: Any) -> EBMConfig:
    """The `EBMConfig` of the named recipe (`EBM_RECIPES`), ``overrides`` winning, as
    ``train ebm --recipe NAME`` with flags builds it."""
    if name not in EBM_RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose from {', '.join(EBM_RECIPES)}")
    return EBMConfig(**{**EBM_RECIPES[name], **overrides})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``, default and help from the field."""
    for f in dataclasses.fields(cls):
        md = dict(f.metadata)
        help_ = md.pop("help", "")
        md.pop("run", None)
        check = md.pop("check", None)
        kw: dict[str, Any] = {"dest": f.name, "default": f.default}
        if f.default is not None and f.default != "" and not isinstance(f.default, bool):
            help_ += f" (default: {f.default})"
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            # numbers through their checked type: the range is in the help and the error
            kw["type"] = arg_type(check) if check is not None else str
        if f.name == "out":
            kw["required"] = True
            kw.pop("default")
        parser.add_argument(_flag(f.name), help=help_, **kw, **md)


def check_config(cfg: Any) -> None:
    """Each field's check, for a config built in Python (the command line checked them while
    parsing): `UsageError` naming the flag and its range, before any work or output."""
    for f in dataclasses.fields(cfg):
        check, value = f.metadata.get("check"), getattr(cfg, f.name)
        if check is None or value is None:
            continue
        try:
            check(value)
        except ValueError as e:
            raise UsageError(f"{_flag(f.name)}: {e}") from None


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def recipe_of(cfg: Any) -> dict[str, Any]:
    """The hyper-parameters that change what a run computes (what ``--resume`` must match)."""
    return {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("run")
    }
