"""argparse value types shared by the subcommands: a bad value exits 2 naming the flag. They are
the configuration's own checks (`config.int_in`, `positive`, `fraction`) made argparse types."""

from __future__ import annotations

from collections.abc import Callable

from puregen_fast import config

__all__ = ["int_at_least", "positive_float", "fraction"]


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    return config.arg_type(config.int_in(lo, hi))


positive_float = config.arg_type(config.positive)
fraction = config.arg_type(config.fraction)
