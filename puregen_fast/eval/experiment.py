"""``puregen-fast eval``: the paper's evaluation of a defense (natural accuracy and poison success
of a classifier trained on the, possibly purified, training set).

Subcommands::

    puregen-fast eval poison --dataset NAME [--data-dir D] [--split train] --trigger T.npy
        --target-class K [--count 500] [--random-select] [--quantize trunc|round]
        --out POISONED.npz
    puregen-fast eval run (--train DIR | --train-npz F.npz | --train-dataset NAME
        [--train-data-dir D] [--train-split train]) --test-dataset NAME [--test-data-dir D]
        [--test-split test] [--trigger T.npy --target-class K [--trigger-scale 1 ...]]
        [--arch airbench|resnet18] [--epochs E] [--batch-size B] [--lr LR] [--seed S]
        [--device auto|cpu|cuda] [--limit-test N] [--json OUT] [--quiet]
    puregen-fast eval table RESULT.json ...
    puregen-fast eval trigger --size H W --eps E [--kind uniform|checker] --out T.npy

The typical experiment: ``eval poison`` writes a Narcissus-poisoned copy of a training set as
``.npz``; ``puregen-fast purify --dataset npz --data-dir POISONED.npz ...`` purifies it; ``eval
run --train PURIFIED_DIR`` trains a classifier on the result and measures it on the clean test
set. Metrics (as the authors' ``run_test_epoch_narcissus``):

* natural accuracy: accuracy on the clean test set;
* poison success: of the test images whose true class is not the target, triggered (the trigger
  times the test-time scale added as in training, see `puregen_fast.eval.poison`), the fraction
  classified as the target class;
* triggered accuracy: accuracy on those same triggered images.

The authors evaluate test-time scales 1, 2 and 3 and print scale 1; ``--trigger-scale`` takes one
or more scales (default 1). Unlike their per-batch mean of means, fractions here are over images.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puregen_fast.cli.argtypes import int_at_least as _int_at_least
from puregen_fast.cli.argtypes import positive_float as _positive_float
from puregen_fast.data.datasets import DATASETS, SPLITS, open_dataset
from puregen_fast.errors import UsageError
from puregen_fast.eval.poison import QUANTIZE, apply_trigger, load_trigger

__all__ = [
    "add_arguments",
    "run",
    "TrainSet",
    "poison_metrics",
    "evaluate_predictions",
    "format_table",
]


# ----------------------------------------------------------------------------- metrics


def poison_metrics(pred_triggered: np.ndarray, labels: np.ndarray, target: int) -> dict:
    """Poison success and triggered accuracy from predictions on triggered test images.

    Only images whose true class is not ``target`` count (an image of the target class
    classified as the target is no attack success). Returns fractions in [0, 1] and the count.
    """
    pred = np.asarray(pred_triggered).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.size} predictions for {y.size} labels")
    keep = y != target
    n = int(keep.sum())
    if n == 0:
        return {"poison_success": float("nan"), "triggered_acc": float("nan"), "num_images": 0}
    return {
        "poison_success": float((pred[keep] == target).mean()),
        "triggered_acc": float((pred[keep] == y[keep]).mean()),
        "num_images": n,
    }


def evaluate_predictions(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    trigger: np.ndarray | None = None,
    target_class: int | None = None,
    scales: Sequence[float] = (1.0,),
    quantize: str = "trunc",
    batch_size: int = 1000,
) -> dict:
    """Natural accuracy of ``predict`` (uint8 NHWC images -> class indices) on the test set and,
    with a trigger, the poison metrics for each test-time scale (``poison_metrics``). The
    triggered images are made batch by batch, so the test set is never held twice."""
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    preds = np.empty(n, np.int64)
    for s in range(0, n, batch_size):
        preds[s : s + batch_size] = predict(np.asarray(images[s : s + batch_size]))
    res: dict[str, Any] = {
        "natural_acc": float((preds == y).mean()) if n else float("nan"),
        "num_test_images": int(n),
    }
    if trigger is None or target_class is None:
        return res
    others = np.flatnonzero(y != target_class)
    res["poison"] = []
    for m in scales:
        pt = np.empty(others.size, np.int64)
        for s in range(0, others.size, batch_size):
            idx = others[s : s + batch_size]
            xt = apply_trigger(np.asarray(images[idx]), trigger, m, quantize=quantize)
            pt[s : s + batch_size] = predict(xt)
        res["poison"].append({"scale": float(m), **poison_metrics(pt, y[others], target_class)})
    return res


# ----------------------------------------------------------------------------- the table


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def format_table(results: Sequence[dict]) -> str:
    """The paper's table: one row per training set (its name or method), natural accuracy % and
    poison success % (one column per test-time trigger scale), triggered accuracy %."""
    scales: list[float] = []
    for r in results:
        for p in r.get("metrics", {}).get("poison", []):
            if p["scale"] not in scales:
                scales.append(p["scale"])
    head = ["train set", "natural acc %"]
    head += [f"poison success % (x{s:g})" for s in scales]
    head += [f"triggered acc % (x{s:g})" for s in scales]
    rows = [head]
    for r in results:
        m = r.get("metrics", {})
        by = {p["scale"]: p for p in m.get("poison", [])}
        row = [str(r.get("name", "?")), _pct(m.get("natural_acc"))]
        row += [_pct(by[s]["poison_success"]) if s in by else "-" for s in scales]
        row += [_pct(by[s]["triggered_acc"]) if s in by else "-" for s in scales]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data


@dataclass
class TrainSet:
    """A training set for ``eval run``: images uint8 NHWC, labels, class names, a row name for
    the table and what is known about it (source, purification, poison)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str
    info: dict


def _npz_poison_info(path: str | os.PathLike[str]) -> dict | None:
    """``poison_idx`` / ``target_class`` of an ``eval poison`` output, if ``path`` is one."""
    p = Path(path)
    if p.suffix != ".npz" or not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            if "poison_idx" not in z.files:
                return None
            info = {"poison_count": int(z["poison_idx"].size), "poison_file": str(p)}
            if "target_class" in z.files:
                info["poison_target_class"] = int(z["target_class"])
            return info
    except (OSError, ValueError):
        return None


def _method_name(manifest: dict) -> str:
    """A short row name from a purify manifest, e.g. ``ebm-150``, ``ddpm-75``, ``jpeg-q75``."""
    pur = manifest.get("purifier") or {}
    method = pur.get("method") or manifest.get("config", {}).get("method", "?")
    parts = []
    if isinstance(pur.get("ebm"), dict) and method != "jpeg":
        parts.append(f"ebm{pur['ebm'].get('steps')}")
    if isinstance(pur.get("ddpm"), dict):
        parts.append(f"ddpm{pur['ddpm'].get('steps')}")
    detail = "+".join(parts)
    if method == "reps":
        detail += f" x{pur.get('reps')}"
    if method == "filt":
        detail += f" filt{pur.get('filter_frac')}"
    if method == "jpeg":
        detail = f"q{pur.get('jpeg_quality')}"
    return f"{method} ({detail})" if detail and method not in ("none",) else str(method)


def load_train_set(args: argparse.Namespace) -> TrainSet:
    """The training set named by ``--train``, ``--train-npz`` or ``--train-dataset``."""
    from puregen_fast.data.writer import load_purified

    if args.train is not None:
        pur = load_purified(args.train)
        man = pur.manifest
        ds = man.get("dataset", {})
        info: dict[str, Any] = {
            "kind": "purified",
            "path": str(Path(args.train).absolute()),
            "method": man.get("config", {}).get("method"),
            "purifier": man.get("purifier"),
            "source_dataset": ds.get("name"),
            "source": ds.get("source"),
        }
        name = f"purified: {_method_name(man)}"
        if ds.get("name") == "npz" and ds.get("source"):
            pinfo = _npz_poison_info(ds["source"])
            if pinfo:
                info.update(pinfo)
                name += f" of {Path(ds['source']).name}"
        images = np.asarray(pur.images)
        return TrainSet(images, np.asarray(pur.labels), pur.class_names, name, info)
    if args.train_npz is not None:
        p = Path(args.train_npz).expanduser()
        if not p.is_file():
            raise UsageError(f"--train-npz {p}: no such file")
        ds = open_dataset("npz", p, "train", quiet=args.quiet)
        info = {"kind": "npz", "path": str(p.absolute())}
        info.update(_npz_poison_info(p) or {})
        name = p.name + (" (poisoned)" if "poison_count" in info else "")
        return TrainSet(np.asarray(ds.images), ds.labels, ds.class_names, name, info)
    _check_split("--train-split", args.train_dataset, args.train_split)
    if args.train_dataset in ("imagefolder", "npz") and not args.train_data_dir:
        raise UsageError(f"--train-dataset {args.train_dataset} needs --train-data-dir")
    ds = open_dataset(args.train_dataset, args.train_data_dir, args.train_split, quiet=args.quiet)
    info = {"kind": "dataset", "dataset": ds.name, "split": ds.split, "source": ds.source}
    if ds.name == "npz":
        info.update(_npz_poison_info(ds.source) or {})
    name = f"{ds.name}/{ds.split} (no defense)"
    return TrainSet(np.asarray(ds.images), ds.labels, ds.class_names, name, info)


def _check_split(flag: str, name: str, split: str) -> None:
    if name in SPLITS and split not in SPLITS[name]:
        raise UsageError(
            f"{flag} {split!r} is not a split of {name}; choose one of {', '.join(SPLITS[name])}"
        )


# ----------------------------------------------------------------------------- arguments


def _widths(s: str) -> tuple[int, ...]:
    try:
        w = tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not w or min(w) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive integers, got {s!r}")
    return w


def _add_poison_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="the training set")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="as for purify")
    p.add_argument("--split", default="train", help="(default %(default)s)")
    p.add_argument(
        "--trigger",
        metavar="FILE",
        required=True,
        help=".npy trigger, shape (1, 3, h, w) or (3, h, w), in the [-1, 1] image space",
    )
    p.add_argument("--target-class", metavar="K", type=_int_at_least(0), required=True)
    p.add_argument(
        "--count",
        metavar="N",
        type=_int_at_least(1),
        default=500,
        help="images of the target class to poison (default %(default)s, the authors' CIFAR-10 "
        "setting: 1%% of the training set)",
    )
    p.add_argument(
        "--random-select",
        action="store_true",
        help="poison N random images of the class (with --seed) instead of the last N",
    )
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="for --random-select")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="trunc",
        help="float -> uint8: trunc (torchvision ToPILImage, the authors' bytes; default) or round",
    )
    p.add_argument("--out", metavar="FILE.npz", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training set (one of)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", metavar="DIR", help="a `puregen-fast purify` output folder")
    src.add_argument("--train-npz", metavar="FILE", help="an .npz (e.g. from `eval poison`)")
    src.add_argument("--train-dataset", choices=DATASETS, help="a data set as it is (no defense)")
    g.add_argument("--train-data-dir", metavar="DIR", default=None)
    g.add_argument("--train-split", default="train")
    g.add_argument("--limit-train", metavar="N", type=_int_at_least(1), default=None)
    t = p.add_argument_group("test set")
    t.add_argument("--test-dataset", choices=DATASETS, required=True)
    t.add_argument("--test-data-dir", metavar="DIR", default=None)
    t.add_argument(
        "--test-split", default=None, help="default: test (tinyimagenet: val; npz: the file)"
    )
    t.add_argument(
        "--limit-test", metavar="N", type=_int_at_least(1), default=None, help="first N only"
    )
    a = p.add_argument_group("attack (optional: without it only natural accuracy)")
    a.add_argument("--trigger", metavar="FILE", default=None, help="the Narcissus trigger .npy")
    a.add_argument("--target-class", metavar="K", type=_int_at_least(0), default=None)
    a.add_argument(
        "--trigger-scale",
        metavar="M",
        type=_positive_float,
        nargs="+",
        default=[1.0],
        help="test-time trigger multipliers (default 1; the authors also report 2 and 3, the "
        "Narcissus paper uses 3)",
    )
    a.add_argument("--quantize", choices=QUANTIZE, default="trunc", help="as for eval poison")
    c = p.add_argument_group("classifier")
    c.add_argument("--arch", choices=("airbench", "resnet18"), default="airbench")
    c.add_argument(
        "--epochs",
        type=_positive_float,
        default=None,
        help="default: airbench 10, resnet18 200 (the paper's)",
    )
    c.add_argument(
        "--batch-size", type=_int_at_least(1), default=None, help="airbench 1024, resnet18 128"
    )
    c.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="airbench 11.5 (per kilo-step, airbench's units), resnet18 0.1",
    )
    c.add_argument(
        "--widths",
        type=_widths,
        default=None,
        help="airbench: three group widths (default 64,256,256); resnet18: base width (64)",
    )
    c.add_argument(
        "--whiten-eps",
        type=_positive_float,
        default=None,
        help="airbench: eps of the patch-whitening init (default 5e-4, airbench's); raise it "
        "(e.g. 0.05) when training data lacks the test set's high frequencies",
    )
    c.add_argument("--tta", choices=("auto", "none", "flip"), default="auto")
    c.add_argument("--seed", type=_int_at_least(0), default=0)
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    o = p.add_argument_group("output")
    o.add_argument("--name", default=None, help="the row name in the table (default: derived)")
    o.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress bar (the table still prints)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommands: poison, run, table, trigger."""
    sub = parser.add_subparsers(
        dest="eval_command", metavar="{poison,run,table,trigger}", required=True
    )
    p = sub.add_parser(
        "poison",
        help="write a Narcissus-poisoned copy of a training set as .npz",
        description="Add a Narcissus trigger to the last N training images of the target class "
        "(clean label) and write the set as .npz (x, y, classes, poison_idx), readable by "
        "`puregen-fast purify --dataset npz --data-dir FILE`.",
    )
    _add_poison_args(p)
    r = sub.add_parser(
        "run",
        help="train a classifier, report natural accuracy and poison success",
        description="Train a classifier on a training set (purified, poisoned or clean) and "
        "report natural accuracy on the clean test set and the poison success of a trigger.",
    )
    _add_run_args(r)
    t = sub.add_parser("table", help="print the table of several `eval run --json` results")
    t.add_argument("results", nargs="+", metavar="RESULT.json")
    g = sub.add_parser("trigger", help="write a synthetic trigger .npy (for tests and demos)")
    g.add_argument("--size", type=_int_at_least(1), nargs=2, metavar=("H", "W"), default=[32, 32])
    g.add_argument(
        "--eps",
        type=_positive_float,
        default=16 / 255 * 2,
        help="amplitude in the [-1, 1] space (default 2*16/255: 16 pixel levels)",
    )
    g.add_argument("--kind", choices=("uniform", "checker"), default="uniform")
    g.add_argument("--seed", type=_int_at_least(0), default=0)
    g.add_argument("--out", metavar="FILE.npy", required=True)


# ----------------------------------------------------------------------------- commands


def _write_json(path: str, obj: Any) -> None:
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, p)
    except OSError as e:
        raise UsageError(f"--json {p}: cannot write ({e})") from e


def _cmd_poison(args: argparse.Namespace) -> int:
    from puregen_fast.eval.poison import poison_dataset, save_poisoned_npz

    out = Path(args.out).expanduser()
    if out.suffix != ".npz":
        raise UsageError(f"--out {out}: the file name must end in .npz")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    _check_split("--split", args.dataset, args.split)
    if args.dataset in ("imagefolder", "npz") and not args.data_dir:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir")
    ds = open_dataset(args.dataset, args.data_dir, args.split, quiet=args.quiet)
    k = len(ds.class_names)
    if args.target_class >= k:
        raise UsageError(
            f"--target-class {args.target_class}: {ds.name} has {k} classes (0..{k - 1})"
        )
    trig = load_trigger(args.trigger, tuple(ds.images.shape[1:3]))
    ps = poison_dataset(
        ds.images,
        ds.labels,
        trig,
        args.target_class,
        args.count,
        class_names=list(ds.class_names),
        last_n=not args.random_select,
        seed=args.seed,
        quantize=args.quantize,
    )
    save_poisoned_npz(ps, out)
    if not args.quiet:
        which = "random" if args.random_select else "last"
        print(
            f"eval poison: {args.count} {which} images of class {args.target_class} "
            f"({ds.class_names[args.target_class]}) of {len(ds)} poisoned -> {out}",
            file=sys.stderr,
        )
    return 0


def _cmd_trigger(args: argparse.Namespace) -> int:
    from puregen_fast.eval.poison import make_trigger

    out = Path(args.out).expanduser()
    if out.suffix != ".npy":
        raise UsageError(f"--out {out}: the file name must end in .npy")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    np.save(out, make_trigger(args.kind, tuple(args.size), args.eps, args.seed))
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    results = []
    for f in args.results:
        try:
            r = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{f}: not a readable JSON file ({e})") from e
        if not isinstance(r, dict) or "metrics" not in r:
            raise UsageError(f"{f}: not an `eval run --json` result (no 'metrics')")
        results.append(r)
    print(format_table(results))
    return 0


def _validate_run(args: argparse.Namespace) -> None:
    if (args.trigger is None) != (args.target_class is None):
        raise UsageError("--trigger and --target-class go together (give both, or neither)")
    if args.train_dataset is None and (
        args.train_data_dir is not None or args.train_split != "train"
    ):
        raise UsageError("--train-data-dir / --train-split apply only with --train-dataset")
    if args.test_split is None:
        args.test_split = "val" if args.test_dataset == "tinyimagenet" else "test"
    _check_split("--test-split", args.test_dataset, args.test_split)
    if args.test_dataset in ("imagefolder", "npz") and not args.test_data_dir:
        raise UsageError(f"--test-dataset {args.test_dataset} needs --test-data-dir")
    if args.widths is not None:
        if args.arch == "airbench" and len(args.widths) != 3:
            raise UsageError("--widths: airbench takes three group widths, e.g. 64,256,256")
        if args.arch == "resnet18" and len(args.widths) != 1:
            raise UsageError("--widths: resnet18 takes one base width, e.g. 64")
    if args.json is not None and Path(args.json).expanduser().is_dir():
        raise UsageError(f"--json {args.json}: is a folder; give a file name")


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from puregen_fast.eval.classifier import default_config, resolve_device, train_classifier
    from puregen_fast.version import __version__

    _validate_run(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from e
    t0 = time.perf_counter()
    train = load_train_set(args)
    test = open_dataset(args.test_dataset, args.test_data_dir, args.test_split, quiet=args.quiet)
    t_data = time.perf_counter() - t0

    x_train, y_train = train.images, np.asarray(train.labels, np.int64)
    if args.limit_train is not None:
        x_train, y_train = x_train[: args.limit_train], y_train[: args.limit_train]
    n_test = len(test) if args.limit_test is None else min(len(test), args.limit_test)
    x_test, y_test = test.images[:n_test], np.asarray(test.labels[:n_test], np.int64)

    # train and test must describe the same task
    src = "--train" if args.train else "--train-npz" if args.train_npz else "--train-dataset"
    if tuple(x_train.shape[1:]) != tuple(x_test.shape[1:]):
        raise UsageError(
            f"{src} images are {x_train.shape[2]}x{x_train.shape[1]} but --test-dataset "
            f"{args.test_dataset} images are {x_test.shape[2]}x{x_test.shape[1]}: they must match"
        )
    k_train, k_test = len(train.class_names), len(test.class_names)
    if k_train != k_test:
        raise UsageError(
            f"{src} has {k_train} classes but --test-dataset {args.test_dataset} has {k_test}; "
            f"train and test must have the same classes"
        )
    if list(train.class_names) != list(test.class_names) and not args.quiet:
        print(
            "eval run: note: class names differ between the training and the test set "
            "(labels are matched by index)",
            file=sys.stderr,
        )
    trigger = None
    if args.trigger is not None:
        if args.target_class >= k_test:
            raise UsageError(
                f"--target-class {args.target_class}: the data sets have {k_test} classes "
                f"(0..{k_test - 1})"
            )
        trigger = load_trigger(args.trigger, tuple(x_test.shape[1:3]))
        recorded = train.info.get("poison_target_class")
        if recorded is not None and recorded != args.target_class and not args.quiet:
            print(
                f"eval run: note: the training set was poisoned for class {recorded}, "
                f"but --target-class is {args.target_class}",
                file=sys.stderr,
            )

    cfg = default_config(
        args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        widths=args.widths,
        seed=args.seed,
        tta=None if args.tta == "auto" else args.tta,
        whiten_eps=args.whiten_eps,
    )
    clf = train_classifier(x_train, y_train, k_train, cfg, device=device, quiet=args.quiet)
    t1 = time.perf_counter()
    metrics = evaluate_predictions(
        clf.predict,
        x_test,
        y_test,
        trigger=trigger,
        target_class=args.target_class,
        scales=args.trigger_scale,
        quantize=args.quantize,
    )
    t_eval = time.perf_counter() - t1

    dev_info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        dev_info["name"] = torch.cuda.get_device_name(device)
    else:
        dev_info["name"] = platform.processor() or platform.machine()
        dev_info["threads"] = torch.get_num_threads()
    result = {
        "format": "puregen-fast-eval",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": args.name or train.name,
        "train": {
            **train.info,
            "num_images": int(len(y_train)),
            "image_shape": [int(v) for v in x_train.shape[1:]],
            "class_names": list(train.class_names),
        },
        "test": {**test.describe(), "num_images_used": int(n_test)},
        "attack": None
        if trigger is None
        else {
            "trigger": str(Path(args.trigger).absolute()),
            "trigger_shape": list(trigger.shape),
            "target_class": args.target_class,
            "scales": [float(s) for s in args.trigger_scale],
            "quantize": args.quantize,
        },
        "classifier": clf.config,
        "metrics": metrics,
        "history": clf.history,
        "device": dev_info,
        "timings": {
            "data_s": round(t_data, 4),
            "train_s": round(clf.train_seconds, 4),
            "train_images_per_s": round(clf.train_images_per_s, 2),
            "eval_s": round(t_eval, 4),
        },
        "versions": {"puregen_fast": __version__, "torch": torch.__version__},
    }
    if args.json:
        _write_json(args.json, result)
    print(format_table([result]))
    train_acc = clf.history[-1]["train_acc"] if clf.history else 0.0
    if train_acc >= 0.9 and metrics["natural_acc"] < 2 / k_train:
        print(
            f"eval run: warning: {100 * train_acc:.0f}% training accuracy (last epoch, augmented) "
            f"but {100 * metrics['natural_acc']:.0f}% natural test accuracy: the training images "
            f"may differ in kind from the test images (e.g. purification removed frequencies the "
            f"test set has). With --arch airbench, try --whiten-eps 0.05 or --arch resnet18.",
            file=sys.stderr,
        )
    if not args.quiet:
        print(
            f"eval run: {len(y_train)} training images, {clf.config['epochs']:g} epochs of "
            f"{args.arch} in {clf.train_seconds:.1f}s ({clf.train_images_per_s:.0f} img/s) on "
            f"{dev_info['name']} ({device})" + (f"; results -> {args.json}" if args.json else ""),
            file=sys.stderr,
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand."""
    cmd = getattr(args, "eval_command", None)
    if cmd == "poison":
        return _cmd_poison(args)
    if cmd == "run":
        return _cmd_run(args)
    if cmd == "table":
        return _cmd_table(args)
    if cmd == "trigger":
        return _cmd_trigger(args)
    raise UsageError("choose an eval subcommand: poison, run, table or trigger")
