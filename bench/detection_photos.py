"""How well the EBM energy finds Narcissus poisons on real photographs, beside trivial scores.

For each trigger strength (the trigger times M) and each seed (which images of the target class
are poisoned, drawn at random), the training set is poisoned, every image is scored, and each
score's ROC AUC (over the whole set, and within the target class: the poisons against the clean
images of their own class, which a per-class score difference cannot explain) and the share of
the poisons among the top 5% and 10% are measured (`puregen_fast.eval.detection`). Scores: the
EBM energy (`puregen-fast scan`'s, through the engine), the energy drop along a short Langevin
chain (``--chain-steps``, its noise keyed by image id), a random ranking, the RMS distance to the
class mean, the RMS JPEG re-encoding error.
The table prints the mean and the spread (min-max) over the seeds.

    python bench/detection_photos.py --train photos/train.npz --ebm ebm-pcd \\
        --trigger poisoned.npz --target-class 0 --count 50 --scales 0.5,1,2 --seeds 0,1,2

``--trigger``: an .npy trigger (1, 3, H, W) or an ``eval poison`` / ``eval experiment`` .npz
holding one. Runtime: seconds on a CPU for a thousand 32x32 images and a small EBM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from puregen_fast.eval.detection import BASELINES, roc_auc, top_share
from puregen_fast.eval.poison import load_trigger, poison_dataset
from puregen_fast.models.checkpoints import load_ebm
from puregen_fast.runtime import describe_device
from puregen_fast.scan import batch_energies, energy_purifier, energy_table

TOPS = (0.05, 0.10)


def _trigger(path: str, size: tuple[int, int]) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["trigger"], np.float32)
    return load_trigger(path, size)


def _row(name: str, scale: float, recs: list[dict]) -> str:
    def cell(key: str) -> str:
        v = np.array([r[key] for r in recs], float)
        return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})"

    return (f"| {scale:g} | {name} | {cell('auc')} | {cell('auc_class')} | "
            + " | ".join(cell(f"top{f:g}") for f in TOPS) + " |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--train", required=True, help="the training set (.npz with x, y)")
    a.add_argument("--ebm", required=True, help="the EBM (a folder, as for purify --ebm)")
    a.add_argument("--trigger", required=True, help=".npy trigger, or an .npz holding one")
    a.add_argument("--target-class", type=int, default=0)
    a.add_argument("--count", type=int, default=50, help="images of the target class poisoned")
    a.add_argument("--scales", default="0.5,1,2", help="trigger multipliers (attack strength)")
    a.add_argument("--seeds", default="0,1,2", help="seeds of the random poison selection")
    a.add_argument("--chain-steps", type=int, default=10,
                   help="also score by the energy drop along this many Langevin steps (0: not)")
    a.add_argument("--out", type=Path, default=None, help="also write the table here (.md)")
    args = a.parse_args(argv)
    with np.load(args.train, allow_pickle=False) as z:
        x, y = np.asarray(z["x"]), np.asarray(z["y"], np.int64)
    trigger = _trigger(args.trigger, tuple(x.shape[1:3]))
    ebm = load_ebm(args.ebm)
    scorer = energy_purifier(ebm, "cpu")
    chain = (energy_purifier(ebm, "cpu", ebm_steps=args.chain_steps)  # its noise keyed by id
             if args.chain_steps else None)
    scales = [float(s) for s in args.scales.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    rows = []
    for m in scales:
        recs: dict[str, list[dict]] = {}
        for seed in seeds:
            ps = poison_dataset(x, y, trigger * np.float32(m), args.target_class, args.count,
                                last_n=False, seed=seed)  # fmt: skip
            mask = np.zeros(len(x), bool)
            mask[ps.poison_idx] = True
            ids = np.arange(len(x))
            # with a chain: how far it lowers the energy (`scan --chain-steps`)
            e = batch_energies(scorer, chain, ps.images, ids)
            scores = {"EBM energy": e[0]}
            if args.chain_steps:
                scores[f"energy drop, {args.chain_steps} steps"] = e[0] - e[1]
            for name in list(scores):  # ranked as scan.csv's z_class column: within its class
                scores[f"{name}, z in its class"] = energy_table(scores[name], ps.labels,
                                                                 0.5).z_class  # fmt: skip
            for name, fn in BASELINES.items():
                kw = {"seed": seed} if name == "random" else {}
                scores[name] = fn(ps.images, ps.labels, **kw)
            same = ps.labels == args.target_class  # poisons against clean images of their class
            for name, s in scores.items():
                rec = {"auc": roc_auc(s, mask), "auc_class": roc_auc(s[same], mask[same])}
                rec.update({f"top{f:g}": top_share(s, mask, f)["recall"] for f in TOPS})
                recs.setdefault(name, []).append(rec)
        rows += [_row(name, m, r) for name, r in recs.items()]
    dev = describe_device(torch.device("cpu"))
    head = (
        f"Detection of Narcissus poisons by score: {args.train} ({len(x)} images), "
        f"{args.count} poisons of class {args.target_class} drawn at random per seed "
        f"(seeds {args.seeds}), EBM {args.ebm}; mean (min-max) over the seeds; "
        f"{dev['name']}, torch {dev['torch']}, {time.perf_counter() - t0:.0f} s\n\n"
        "| trigger x | score | ROC AUC | AUC within the target class | "
        + " | ".join(f"poisons in top {100 * f:g}% (recall)" for f in TOPS)
        + " |\n|---|---|---|---|" + "---|" * len(TOPS)
    )
    table = head + "\n" + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
