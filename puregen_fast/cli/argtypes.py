"""argparse value types shared by the subcommands: a bad value exits 2 naming the flag. They are
the configuration's own checks (`config.int_in`, `positive`, `fraction`) made argparse types."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from puregen_fast import config

__all__ = ["int_at_least", "int_list", "positive_float", "fraction"]


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    return config.arg_type(config.int_in(lo, hi))


positive_float = config.arg_type(config.positive)
fraction = config.arg_type(config.fraction)


def int_list(lo: int) -> Callable[[str], tuple[int, ...]]:
    """``"0,1,2"`` (or ``"32x64x64"``) -> (0, 1, 2), each at least ``lo``."""

    def parse(s: str) -> tuple[int, ...]:
        try:
            v = tuple(int(x) for x in s.replace("x", ",").split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {s!r}"
            ) from None
        if not v or min(v) < lo:
            raise argparse.ArgumentTypeError(f"expected integers >= {lo}, got {s!r}")
        return v

    return parse
