"""The `puregen-fast` command line (DESIGN 4). Each subcommand lives in its own module, which
provides `add_arguments(parser)` and `run(args) -> int`; this file only wires them up and maps
errors to exit codes (0 success, 2 bad usage or input, 1 internal failure or a diverged run, 2
when a flag caused the divergence, 130 interrupted)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from puregen_fast.cli.argtypes import document_ranges, int_at_least
from puregen_fast.errors import DivergenceError, UsageError
from puregen_fast.runtime import MAX_THREADS, THREADS_ENV, set_threads
from puregen_fast.version import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "purify": ("puregen_fast.cli.purify", "purify a data set into --out DIR"),
    "scan": ("puregen_fast.cli.scan", "rank every image by EBM energy: a table and pictures"),
    "bench": ("puregen_fast.cli.bench", "throughput: reference vs fast on one device, one run"),
    "train": ("puregen_fast.cli.train", "train the EBM or the DDPM"),
    "eval": ("puregen_fast.cli.eval", "poison success and natural accuracy, the paper's table"),
    "info": ("puregen_fast.cli.info", "versions, devices, NVML readings, which kernels run here"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its wording
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python before 3.12 reads `--flag=--` as an empty list for a one-value flag, which
        # then reaches the command as its value
        if action.option_strings and action.nargs is None and list(arg_strings) == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)


_threads = int_at_least(1, MAX_THREADS)
THREADS_HELP = (
    "CPU threads for torch's intra-op pool and OpenMP (default: $" + THREADS_ENV + ", else "
    "$OMP_NUM_THREADS, else the cores this process may use); on a machine other jobs share, "
    "fewer threads is often faster"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="puregen-fast", description="PureGen data purification at GPU speed.")
    parser.add_argument("--version", action="version", version=f"puregen-fast {__version__}")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N", help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # also after the subcommand; SUPPRESS keeps a value given before it
        p.add_argument("--threads", type=_threads, default=argparse.SUPPRESS, metavar="N",
                       help=THREADS_HELP)  # fmt: skip
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a subcommand not built in this install
            if e.name is None or not e.name.startswith("puregen_fast"):
                raise
            p.set_defaults(_unavailable=f"'{name}' is not available in this build ({e.name})")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    document_ranges(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"puregen-fast: error: {args._unavailable}", file=sys.stderr)
        return 1
    # restored on return, so a caller in the same process (a notebook, a test) keeps its own
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        set_threads(args.threads)  # before any work: the pools size themselves at first use
    except ValueError as e:
        print(f"puregen-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"puregen-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DivergenceError as e:
        print(f"puregen-fast {args.command}: error: {e}", file=sys.stderr)
        return 2 if e.flag_cause else 1
