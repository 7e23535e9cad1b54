"""``puregen-fast scan``: every image's EBM energy, ranked, with z-scores per class and overall,
into ``--out DIR`` (`puregen_fast.scan`; DESIGN 4, 9). The data flags, ``--ebm``, ``--device``,
the batch and shard sizes and the run flags are purify's own (made from `PurifyConfig`'s fields,
so their checks and ranges are the same); the models, the data set and ``--out`` are found as
purify finds them (`puregen_fast.cli.purify`), every problem reported in one message."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from puregen_fast import config
from puregen_fast.cli.argtypes import int_at_least
from puregen_fast.cli.purify import _config, _Inputs, load_dataset
from puregen_fast.dist import Dist
from puregen_fast.errors import UsageError
from puregen_fast.eval.scan_charts import scan_pictures
from puregen_fast.models.checkpoints import DEFAULT_EBM
from puregen_fast.purifier import chain_line, load_models
from puregen_fast.scan import check_out, energy_purifier, scan_dataset

__all__ = ["add_arguments", "run", "FLAGS"]

# the PurifyConfig fields scan offers as flags; the others (the purification method and its
# chain) do not change an energy
FLAGS = ("dataset", "data_dir", "split", "limit", "max_image_pixels", "ebm", "filter_frac",
         "device", "batch_size", "shard_size", "out", "resume", "overwrite", "quiet")  # fmt: skip
# the purify wording that does not fit scan
_HELP = {
    "dataset": "data set to scan",
    "limit": "scan only the first N images",
    "filter_frac": "the cut drawn and counted: where purify --method filt with this fraction "
    "would cut (the images at or above it are that highest-energy fraction)",
    "batch_size": "images per batch; energies are bit-identical only for the same batch size",
    "shard_size": "images per resumable piece of the scan (webdataset input: one per input "
    "shard)",
    "resume": "keep the finished pieces of an earlier scan with the same settings, compute the "
    "rest, and write the table again",
    "overwrite": "replace earlier output in --out (with --resume: only if its settings differ)",
    "quiet": "no progress bar or summary",
}
MAX_TOP = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    others = tuple(f.name for f in dataclasses.fields(config.PurifyConfig) if f.name not in FLAGS)
    config.add_arguments(p, config.PurifyConfig, skip=others)
    for a in p._actions:
        if a.dest in _HELP:
            a.help = _HELP[a.dest] + (" (default %(default)s)" if a.default not in
                                      (None, False) else "")  # fmt: skip
    p.add_argument("--top", type=int_at_least(1, MAX_TOP), default=8, metavar="K",
                   help="images per class in the picture of the highest energies "
                        "(default %(default)s)")  # fmt: skip
    p.add_argument("--chain-steps", type=int_at_least(0, config.MAX_LANGEVIN_STEPS), default=0,
                   metavar="K",
                   help="rank by the energy drop along K Langevin steps of the EBM's own chain "
                        "(its noise keyed by image id) instead of the energy; 0: the energy "
                        "(default %(default)s; README 'Scanning a data set' says when a chain "
                        "separates better)")  # fmt: skip
    # the fields not offered keep purify's defaults, so the flags make a checked PurifyConfig
    defaults = {f.name: f.default for f in dataclasses.fields(config.PurifyConfig)
                if f.name in others}  # fmt: skip
    p.set_defaults(**{**defaults, "method": "ebm", "backend": "reference"})


def run(args: argparse.Namespace) -> int:
    """The ``scan`` subcommand."""
    cfg = _config(args)  # purify's checks: split, --data-dir, --device cuda here
    dist = Dist.from_env(cfg.device)
    try:
        out = Path(cfg.out).expanduser()
        dist.on_rank0(lambda: check_out(out, resume=cfg.resume, overwrite=cfg.overwrite))
        inputs = _Inputs(dist)
        ebm = load_models("ebm", cfg.ebm, attempt=inputs.attempt).ebm
        dataset = load_dataset(cfg, inputs)
        inputs.check()
        try:
            purifier = energy_purifier(ebm, dist.device)
            chain = (energy_purifier(ebm, dist.device, ebm_steps=args.chain_steps)
                     if args.chain_steps else None)  # fmt: skip
        except ValueError as e:
            raise UsageError(f"--ebm: {e}") from e
        if dist.is_main and not cfg.quiet:
            print(f"scan: {len(dataset)} images of {dataset.name}/{dataset.split}, EBM "
                  f"{cfg.ebm or DEFAULT_EBM} on {purifier.device}", file=sys.stderr)  # fmt: skip
            if chain is not None:
                line = chain_line(chain).replace("(--ebm-steps)", "(--chain-steps)")
                print(f"scan: ranked by the energy drop along a {line}", file=sys.stderr)
        command = {**{k: getattr(cfg, k) for k in FLAGS}, "top": args.top,
                   "chain_steps": args.chain_steps, "out": str(out.absolute())}
        scan_dataset(
            dataset,
            purifier,
            out,
            filter_frac=cfg.filter_frac,
            batch_size=cfg.batch_size,
            shard_size=cfg.shard_size,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            quiet=cfg.quiet,
            limit=cfg.limit,
            dist=dist,
            pictures=scan_pictures(args.top),
            extra={"command": dict(sorted(command.items()))},
            chain=chain,
        )
    finally:
        dist.close()
    return 0
