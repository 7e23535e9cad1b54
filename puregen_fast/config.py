"""Every purify option, defined once: type, default, help and check per field.

* `EngineConfig`: what the `Purifier` computes with (method, step counts and sizes, seed, device,
  backend, precision). `describe()` and the manifest's record of the engine come from it.
* `PurifyConfig`: an `EngineConfig` plus the data and run options of ``puregen-fast purify``.
  `add_arguments` makes the command's flags from its fields (``ebm_steps`` -> ``--ebm-steps``),
  so a flag, its default, its help and its check cannot drift from the engine's.

A sampler is built from `puregen_fast.sampling.config.SamplerConfig`, which the engine makes from
an `EngineConfig`; it lives with the samplers, so the sampling layer never imports this module
(and, through it, the data set readers).

A value that fails its check is a ValueError naming the field and its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puregen_fast import methods, paper
from puregen_fast.data.datasets import DATASETS, SPLITS
from puregen_fast.data.preview import MAX_PREVIEW, PREVIEW
from puregen_fast.models.checkpoints import DEFAULT_DDPM, DEFAULT_EBM
from puregen_fast.noise import MAX_SEED
from puregen_fast.runtime import BACKENDS, CONV_IMPLS, PRECISIONS

__all__ = [
    "BACKENDS",
    "CONV_IMPLS",
    "FORMATS",
    "METHODS",
    "PURIFY_DATASETS",
    "EngineConfig",
    "PurifyConfig",
    "add_arguments",
    "flag",
    "needs_models",
]

# the method names, read live from the table of `puregen_fast.methods` (one row per method)
METHODS = methods.METHOD_NAMES
# BACKENDS and CONV_IMPLS (`puregen_fast.runtime`) and MAX_SEED (`puregen_fast.noise`) are
# defined below the sampling layer, which checks them too; named here as the flags' choices
# how purified values in [0, 1] become bytes: round to the nearest level, or truncate as the
# authors' ToPILImage does (mul(255).byte()); out-of-range values are clamped first, never wrapped
QUANTIZE = ("round", "trunc")
FORMATS = ("npy", "png", "webdataset")
# the readers of data/datasets.py, and WebDataset tar shards streamed in (data/webdataset.py)
PURIFY_DATASETS = (*DATASETS, "webdataset")
DEFAULT_BATCH_SIZE = 256
DEFAULT_SHARD_SIZE = 10_000
# the upper ends of the flags' ranges (README "Flag ranges"): far past any real run, low enough
# that a typo cannot ask for a chain that never ends or an allocation the size of a disk
MAX_LANGEVIN_STEPS = 10_000  # far past the paper's chains (paper.LANGEVIN_STEPS)
MAX_REPS = 100
MAX_BATCH = 65_536  # images in one batch: 0.8 GB of fp32 state alone at 32x32
MAX_IMAGES = 10**12  # --limit, --shard-size: more images than any data set holds
MAX_PIXELS = 1 << 32  # --max-image-pixels: a 65536 x 65536 image
MIN_MARGIN, MAX_MARGIN = 0.01, 1e6
# healthy chains stay near [-1, 1] (an untrained EBM pushes states to about 2.2); a diverged one
# runs to 1e5 and beyond, or to NaN
DEFAULT_DIVERGENCE_MARGIN = 4.0
PAPER_LANGEVIN = {"ebm_eps": paper.LANGEVIN_EPS, "ebm_temp": paper.LANGEVIN_TEMP}  # DESIGN 2.1
PAPER_CHAIN = {"ebm_steps": paper.LANGEVIN_STEPS, **PAPER_LANGEVIN}  # as resolve_sampling fills it
_FROM_MODEL = "default: the EBM's sampling.json, else the paper's {}"

Check = Callable[[Any], None]  # raises ValueError(reason) for a bad value


def flag(name: str) -> str:
    """The command-line flag of field ``name``."""
    return "--" + name.replace("_", "-")


def needs_models(method: str, ddpm_given: bool = False,
                 ebm_given: bool = False) -> tuple[bool, bool]:  # fmt: skip
    """Whether ``method`` uses an EBM and a DDPM (its row of `puregen_fast.methods`; a model the
    method takes optionally, as filt its DDPM, only when one is given)."""
    row = methods.get(method)
    return row.uses("ebm", ebm_given), row.uses("ddpm", ddpm_given)


# ----------------------------------------------------------------------------- checks


def fmt_bound(v: float) -> str:
    """A range bound as the help and the errors print it: 10**9, 2**63 - 1, 1e30, 0.5."""
    if isinstance(v, int) and v >= 10**4:
        if v == 10 ** (len(str(v)) - 1):
            return f"10**{len(str(v)) - 1}"
        if (v + 1) & v == 0:
            return f"2**{v.bit_length()} - 1"
        if v & (v - 1) == 0:
            return f"2**{v.bit_length() - 1}"
    if isinstance(v, float):
        m, _, e = f"{v:g}".partition("e")
        return f"{m}e{int(e)}" if e else m
    return str(v)


def int_in(lo: int, hi: int | None = None) -> Check:
    rng = f">= {fmt_bound(lo)}" if hi is None else f"in [{fmt_bound(lo)}, {fmt_bound(hi)}]"

    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer {rng}, got {v!r}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"must be {rng}, got {v}")

    check.kind = int  # type: ignore[attr-defined]
    check.range = rng  # type: ignore[attr-defined]
    check.bounds = (lo, hi, False, False)  # type: ignore[attr-defined]
    return check


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in [lo, hi]; an open end leaves its bound out. NaN and inf never pass."""
    rng = f"in {'(' if lo_open else '['}{fmt_bound(lo)}, {fmt_bound(hi)}{')' if hi_open else ']'}"

    def check(v: Any) -> None:
        x = _number(v)
        above = x > lo if lo_open else x >= lo
        below = x < hi if hi_open else x <= hi
        if not (math.isfinite(x) and above and below):
            raise ValueError(f"must be a number {rng}, got {v}")

    check.kind = float  # type: ignore[attr-defined]
    check.range = rng  # type: ignore[attr-defined]
    check.bounds = (lo, hi, lo_open, hi_open)  # type: ignore[attr-defined]
    return check


# a step size, temperature or learning rate: positive, finite, and a normal float (a subnormal
# such as 1e-320 loses its precision, and its reciprocal overflows to inf)
MIN_POSITIVE = 1e-30
MAX_POSITIVE = 1e30
positive = float_in(MIN_POSITIVE, MAX_POSITIVE)
fraction = float_in(0.0, 1.0, lo_open=True)


def arg_type(check: Check) -> Callable[[str], Any]:
    """An argparse ``type`` from a check: parse as the check's kind, then check; a bad value
    is argparse's error (exit 2, naming the flag and the range). The type carries the check's
    ``range`` text, which the help of every flag shows (`cli.argtypes.document_ranges`)."""
    kind = getattr(check, "kind", str)
    rng = getattr(check, "range", None)

    def parse(s: str) -> Any:
        try:
            v = kind(s)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            shown = s if len(s) <= 40 else s[:40] + "..."
            raise argparse.ArgumentTypeError(
                f"expected {what}{' ' + rng if rng else ''}, got {shown!r}"
            ) from None
        try:
            check(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return v

    parse.__name__ = kind.__name__
    parse.kind = kind  # type: ignore[attr-defined]
    parse.range = rng  # type: ignore[attr-defined]
    parse.bounds = getattr(check, "bounds", None)  # type: ignore[attr-defined]
    return parse


def _opt(
    default: Any,
    help: str,
    *,
    group: str,
    check: Check | None = None,
    choices: tuple[str, ...] | None = None,
    cli_choices: tuple[str, ...] | None = None,
    required: bool = False,
    metavar: str | None = None,
) -> Any:
    """A field: ``choices`` bind everywhere; ``cli_choices`` only the flag (the API takes more,
    e.g. ``device="cuda:1"``); ``required`` only on the command line."""
    md = {"help": help, "group": group, "check": check, "choices": choices,
          "cli_choices": cli_choices, "required": required, "metavar": metavar}  # fmt: skip
    return field(default=default, metadata=md)


def _check_field(f: dataclasses.Field, value: Any) -> None:
    md = f.metadata
    if value is None and f.default is None:
        return
    if md.get("choices") and value not in md["choices"]:
        raise ValueError(
            f"{f.name} must be one of {', '.join(md['choices'])}; got {value!r} ({flag(f.name)})"
        )
    if md.get("check") is not None:
        try:
            md["check"](value)
        except ValueError as e:
            raise ValueError(f"{f.name} ({flag(f.name)}): {e}") from None


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class EngineConfig:
    """What the `Purifier` computes with (DESIGN 2.1 defaults)."""

    method: str = _opt(
        "ebm", "purification method", group="method", choices=METHODS, required=True
    )
    # None: the EBM's own chain (its sampling.json), else the paper's (`resolve_sampling`)
    ebm_steps: int | None = _opt(
        None, f"Langevin steps ({_FROM_MODEL.format(PAPER_CHAIN['ebm_steps'])})",
        group="method", check=int_in(1, MAX_LANGEVIN_STEPS),
    )  # fmt: skip
    ebm_eps: float | None = _opt(
        None, f"Langevin step size ({_FROM_MODEL.format(PAPER_LANGEVIN['ebm_eps'])})",
        group="method", check=positive,
    )  # fmt: skip
    ebm_temp: float | None = _opt(
        None, f"Langevin temperature ({_FROM_MODEL.format(PAPER_LANGEVIN['ebm_temp'])})",
        group="method", check=positive,
    )  # fmt: skip
    ddpm_steps: int = _opt(
        paper.DDPM_STEPS, "DDPM noising timestep", group="method", check=int_in(1, 999)
    )
    reps: int = _opt(
        1, "reps: rounds of EBM then DDPM", group="method", check=int_in(1, MAX_REPS)
    )
    filter_frac: float = _opt(
        0.5,
        "filt: the fraction of highest-energy images purified",
        group="method",
        check=fraction,
    )
    jpeg_quality: int = _opt(
        paper.JPEG_QUALITY, "jpeg: quality", group="method", check=int_in(1, 95)
    )
    seed: int = _opt(0, "keys the noise", group="method", check=int_in(0, MAX_SEED))
    quantize: str = _opt(
        "round",
        "how purified images become bytes: round (to the nearest level) or trunc (toward zero, as "
        "the authors' ToPILImage: their bytes exactly for values in [0, 1], about half a level "
        "darker on average); values outside [0, 1] are clamped first, never wrapped",
        group="method",
        choices=QUANTIZE,
    )
    divergence_margin: float = _opt(
        DEFAULT_DIVERGENCE_MARGIN,
        "a purified state that is non-finite or leaves [-1 - m, 1 + m] is a divergence: the run "
        "stops, naming the images, and nothing of their batch is written; below 0.01 the last "
        "noise step of a healthy chain would count",
        group="method",
        check=float_in(MIN_MARGIN, MAX_MARGIN),
    )
    device: str = _opt(
        "auto", "auto, cpu, cuda (or cuda:N)", group="run", cli_choices=("auto", "cpu", "cuda")
    )
    backend: str = _opt(
        "auto",
        "fast (compiled, fused kernels, CUDA graphs), reference (eager), or auto (fast where it "
        "runs)",
        group="run",
        choices=BACKENDS,
    )
    precision: str = _opt(
        "fp32", "model math: fp32, tf32, bf16 (state always fp32), or auto (fp32 or bf16, "
        "whichever runs a step faster here: timed once per machine and model, kept in the "
        "project cache; the default stays fp32 so that every machine writes the same bytes)",
        group="run", choices=(*PRECISIONS, "auto"),
    )  # fmt: skip
    conv_impl: str = _opt(
        "auto",
        "the fast EBM's convolutions: torch (compiled, cuDNN), triton (the fused conv-block "
        "kernels), or auto (on CUDA the faster of the two, timed once at the batch shape; torch "
        "on CPU)",
        group="run",
        choices=CONV_IMPLS,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.reps > 1 and not methods.get(self.method).repeats:
            rep = " or ".join(repr(m.name) for m in methods.methods() if m.repeats)
            raise ValueError(f"reps must be 1 unless method is {rep} (--reps {self.reps})")

    @property
    def uses(self) -> tuple[bool, bool]:
        """(EBM, DDPM) this method needs; filt's optional DDPM is the engine's to add."""
        return needs_models(self.method)

    def engine_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}

    def resolve_sampling(self, sampling: dict[str, Any] | None = None
                         ) -> tuple[EngineConfig, dict[str, str]]:  # fmt: skip
        """This config with every unset Langevin setting (None) taken from ``sampling`` (an
        EBM's sampling.json, `models.checkpoints.read_sampling`), else the paper's
        (`PAPER_CHAIN`); and where each value came from."""
        vals: dict[str, Any] = {}
        where: dict[str, str] = {}
        for k, default in PAPER_CHAIN.items():
            v = getattr(self, k)
            if v is not None:
                vals[k], where[k] = v, "given"
            elif sampling and k in sampling:
                src = sampling.get("path", "sampling.json")
                vals[k], where[k] = sampling[k], f"the EBM's {src}"
            else:
                vals[k], where[k] = default, "the paper's default"
        return dataclasses.replace(self, **vals), where


@dataclass(frozen=True)
class PurifyConfig(EngineConfig):
    """`EngineConfig` plus the data and run options of ``puregen-fast purify`` (DESIGN 4)."""

    dataset: str | None = _opt(
        None, "data set to purify", group="data", choices=PURIFY_DATASETS, required=True
    )
    data_dir: str | None = _opt(
        None,
        "where the data set is, extracted or as its official archive; never downloaded into "
        "(default: the cache, $PUREGEN_FAST_CACHE or ~/.cache/puregen-fast, where it is "
        "downloaded once); imagefolder: the root folder; npz: the .npz file; webdataset: the tar "
        "shards, e.g. 'shards/train-{000..099}.tar' (quoted: expanded here, in order)",
        group="data",
        metavar="DIR",
    )
    split: str = _opt(
        "train",
        "cifar10: train|test; cinic10(-imagenet): train|valid|test; tinyimagenet: train|val; "
        "imagefolder: ROOT/<split> when it exists",
        group="data",
    )
    limit: int | None = _opt(
        None,
        "purify only the first N images",
        group="data",
        check=int_in(1, MAX_IMAGES),
        metavar="N",
    )
    max_image_pixels: int | None = _opt(
        None,
        "refuse images with more pixels than N, checked from the file header before decoding "
        "(default 16777216 = 4096x4096)",
        group="data",
        check=int_in(1, MAX_PIXELS),
        metavar="N",
    )
    ebm: str | None = _opt(
        None, f"EBM checkpoint (default {DEFAULT_EBM})", group="method", metavar="SRC"
    )
    ddpm: str | None = _opt(
        None,
        f"DDPM checkpoint (default {DEFAULT_DDPM}; for filt only when given)",
        group="method",
        metavar="SRC",
    )
    batch_size: int = _opt(
        DEFAULT_BATCH_SIZE,
        "images per batch; results are bit-identical only for the same batch size",
        group="run",
        check=int_in(1, MAX_BATCH),
    )
    shard_size: int = _opt(
        DEFAULT_SHARD_SIZE,
        "images per output shard (webdataset input: one output shard per input shard)",
        group="run",
        check=int_in(1, MAX_IMAGES),
    )
    format: str = _opt("npy", "output format", group="run", choices=FORMATS)
    out: str | None = _opt(None, "output folder", group="run", required=True, metavar="DIR")
    resume: bool = _opt(
        False, "verify finished shards (sha256), redo missing or damaged ones", group="run"
    )
    overwrite: bool = _opt(
        False,
        "replace earlier output in --out (with --resume: only if its configuration differs)",
        group="run",
    )
    quiet: bool = _opt(False, "no progress bars or summary", group="run")
    preview: int | None = _opt(
        None,
        f"write {PREVIEW} into --out when the run finishes: N images evenly spaced over the "
        "selection, the originals above their purified versions, each image's change (RMS in "
        "levels, 0-255) under it",
        group="run",
        check=int_in(1, MAX_PREVIEW),
        metavar="N",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset in SPLITS and self.split not in SPLITS[self.dataset]:
            raise ValueError(
                f"split (--split) {self.split!r} is not a split of {self.dataset}; choose one of "
                f"{', '.join(SPLITS[self.dataset])}"
            )
        if self.dataset in ("imagefolder", "npz", "webdataset") and not self.data_dir:
            raise ValueError(f"--dataset {self.dataset} needs --data-dir")

    @property
    def uses(self) -> tuple[bool, bool]:
        return needs_models(self.method, self.ddpm is not None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PurifyConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- flags


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type = PurifyConfig,
    *,
    skip: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    group: argparse._ArgumentGroup | None = None,
    unset: bool = False,
    dest_prefix: str = "",
) -> None:
    """One flag per field of ``cls`` (but ``skip``), in argument groups (or all in ``group``);
    default, help and check from the field. For a command that passes engine settings on
    (``eval experiment``): ``rename`` maps a field to the command's flag where the command's
    own flag has the field's name (``seed`` -> ``--purify-seed``); ``unset`` makes every flag
    default to None (not given: the engine's default, which the help names), so only the
    values given are passed on and recorded; ``dest_prefix`` keeps their values apart from the
    command's own (``args.<dest_prefix><field>``)."""
    groups: dict[str, Any] = {}
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        md = f.metadata
        g = group or groups.get(md["group"]) or groups.setdefault(
            md["group"], parser.add_argument_group(md["group"])
        )
        help_ = md["help"]
        kw: dict[str, Any] = {"dest": dest_prefix + f.name}
        if f.type in ("bool", bool):
            kw["action"] = "store_true"
        else:
            kw["type"] = arg_type(md["check"]) if md.get("check") else str
            choices = md.get("cli_choices") or md.get("choices")
            if choices:
                kw["choices"] = choices
                kw.pop("type")
            if md.get("metavar") or (dest_prefix and not choices):  # not ENGINE_EBM_STEPS
                kw["metavar"] = md.get("metavar") or f.name.upper()
            if f.default is not None:
                help_ += f" (default {f.default})" if unset else " (default %(default)s)"
        if md.get("required") and not unset:
            kw["required"] = True
        else:
            kw["default"] = None if unset else f.default
        g.add_argument(rename.get(f.name, flag(f.name)), help=help_, **kw)

