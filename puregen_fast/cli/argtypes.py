"""argparse value types shared by the subcommands: a bad value exits 2 naming the flag and its
range. They are the configuration's own checks (`config.int_in`, `float_in`, `positive`,
`fraction`) made argparse types; each carries its ``range`` text, and `document_ranges` puts it
in the help of every flag that uses it, so a range is written once, where the flag is defined.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puregen_fast import config
from puregen_fast.data.preview import MAX_PREVIEW

__all__ = [
    "MAX_COUNT",
    "MAX_STEPS",
    "document_ranges",
    "count_or_all",
    "float_in",
    "fraction",
    "int_at_least",
    "int_list",
    "learning_rate",
    "out_file",
    "positive_float",
    "preview",
    "seed",
    "seed_list",
    "steps",
]

# upper ends shared by several commands (README "Flag ranges")
# optimiser steps, rounds, iterations: 12x the paper's ResNet-18 recipe (200 epochs, 78,000)
MAX_STEPS = 10**6
MAX_COUNT = 10**9  # images counted or kept: more than any data set holds


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer ``>= lo`` (and ``<= hi``)."""
    return config.arg_type(config.int_in(lo, hi))


def float_in(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """A finite number in [lo, hi] (an open end leaves its bound out)."""
    return config.arg_type(config.float_in(lo, hi, lo_open=lo_open, hi_open=hi_open))


positive_float = config.arg_type(config.positive)
fraction = config.arg_type(config.fraction)
# every --seed: what torch.Generator.manual_seed and the keyed noise take
seed = int_at_least(0, config.MAX_SEED)
# a classifier's or an attack's learning rate: below 1e-12 nothing moves, and airbench divides
# its weight decay by the rate (1e-320 was a ZeroDivisionError)
learning_rate = float_in(1e-12, 1e6)
epochs = float_in(1e-6, 1e6)  # fractions of an epoch are allowed
batch_size = int_at_least(1, config.MAX_BATCH)
count = int_at_least(1, MAX_COUNT)
class_index = int_at_least(0, MAX_COUNT)
steps = int_at_least(1, MAX_STEPS)
preview = int_at_least(1, MAX_PREVIEW)  # the images of a preview.png (`data.preview`)


def int_list(lo: int, hi: int | None = None, max_len: int = 64) -> Callable[[str], tuple[int, ...]]:
    """``"0,1,2"`` (or ``"32x64x64"``) -> (0, 1, 2), each in [lo, hi], at most ``max_len``."""
    one = config.int_in(lo, hi)
    rng = f"{max_len} or fewer comma-separated integers {one.range}"  # type: ignore[attr-defined]

    def parse(s: str) -> tuple[int, ...]:
        shown = s if len(s) <= 40 else s[:40] + "..."
        parts = [x for x in s.replace("x", ",").split(",") if x.strip()]
        if not parts or len(parts) > max_len:
            raise argparse.ArgumentTypeError(f"expected {rng}, got {shown!r}")
        try:
            v = tuple(int(x) for x in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rng}, got {shown!r}") from None
        try:
            for x in v:
                one(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rng}, got {shown!r}") from None
        return v

    parse.kind = "list"  # type: ignore[attr-defined]
    parse.range = rng  # type: ignore[attr-defined]
    parse.bounds = one.bounds  # type: ignore[attr-defined]
    return parse


seed_list = int_list(0, config.MAX_SEED)


def out_file(s: str) -> Path:
    """A file the command will write: not empty, not a folder, and no file where a folder of its
    path must be; checked before any work, so a long run does not fail at its last step."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if "\x00" in s:  # no file system takes it; pathlib's checks answer False, open() raises
        raise argparse.ArgumentTypeError(f"{s[:60]!r}: not a path (a NUL byte)")
    shown = s if len(s) <= 60 else s[:60] + "..."
    try:
        p = Path(s).expanduser()
    except RuntimeError:  # ~name of a user this system does not have
        raise argparse.ArgumentTypeError(f"{shown!r}: no such user's home folder") from None
    try:
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{shown!r} is a folder; give a file name")
        for parent in p.absolute().parents:
            if os.path.lexists(parent):
                if not parent.is_dir():
                    raise argparse.ArgumentTypeError(f"{shown!r}: a file where a folder must be")
                break
    except OSError as e:  # a name too long for the file system, a loop of links
        raise argparse.ArgumentTypeError(f"{shown!r}: {e.strerror}") from None
    return p


out_file.kind = "path"  # type: ignore[attr-defined]
out_file.range = "a file path, not a folder"  # type: ignore[attr-defined]


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in dict.fromkeys(a.choices.values()):  # aliases share a parser
                out += _subparsers(p)
    return out


def ranged_actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action, Any]]:
    """(prog, action, type) of every flag whose type carries a range, in ``parser`` and all its
    subcommands."""
    return [
        (p.prog, a, a.type)
        for p in _subparsers(parser)
        for a in p._actions
        if getattr(a.type, "range", None)
    ]


def document_ranges(parser: argparse.ArgumentParser) -> None:
    """Append each ranged flag's range to its help (once): the help, the error and the check
    then say the same thing."""
    for _prog, a, typ in ranged_actions(parser):
        if a.help == argparse.SUPPRESS:
            continue
        text = f"range: {typ.range}"
        if text not in (a.help or ""):
            a.help = f"{a.help}; {text}" if a.help else text


def count_or_all(s: str) -> int | None:
    """``--count``: a number of images >= 1, or ``all`` (None: every image of the class)."""
    if s.strip().lower() == "all":
        return None
    return int_at_least(1, MAX_COUNT)(s)


count_or_all.kind = int  # type: ignore[attr-defined]
count_or_all.range = "in [1, 10**9], or all"  # type: ignore[attr-defined]
count_or_all.bounds = (1, MAX_COUNT, False, False)  # type: ignore[attr-defined]
