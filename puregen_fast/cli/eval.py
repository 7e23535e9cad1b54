"""``puregen-fast eval``: the paper's evaluation of a defense (natural accuracy and poison success
of a classifier trained on the, possibly purified, training set).

Subcommands::

    puregen-fast eval poison --dataset NAME [--data-dir D] [--split train] --trigger T.npy
        --target-class K [--count 500] [--random-select] [--quantize trunc|round]
        --out POISONED.npz
    puregen-fast eval poison --dataset NAME ... --attack narcissus|gradient-matching|
        bullseye-polytope [--poisons hf:SunayBhat1/puregen-poisons | DIR]
        [--poisons-dataset NAME] --target-class K [--narcissus-size 32 --narcissus-eps 8]
        [--bp-poisons 50 --bp-mode linear-transfer|fine-tune --bp-iters 800 --bp-repeat 1]
        --out POISONED.npz
    puregen-fast eval run (--train DIR | --train-npz F.npz | --train-dataset NAME
        [--train-data-dir D] [--train-split train]) --test-dataset NAME [--test-data-dir D]
        [--test-split test] [--trigger T.npy --target-class K [--trigger-scale 1 ...]]
        [--arch airbench|resnet18] [--epochs E] [--batch-size B] [--lr LR] [--seed S]
        [--device auto|cpu|cuda] [--limit-test N] [--json OUT] [--quiet]
    puregen-fast eval table RESULT.json ...
    puregen-fast eval trigger --size H W --eps E [--kind uniform|checker] --out T.npy
    puregen-fast eval trigger --method narcissus --dataset NAME [--data-dir D] --target-class K
        --ood-dataset NAME [--ood-data-dir D] [--size 32 32] [--eps 2*16/255] [--rounds R]
        [--surrogate-arch airbench|resnet18] [--surrogate-epochs E] ... --out T.npy

The experiment itself is `puregen_fast.eval.run`, the metrics and the table
`puregen_fast.eval.metrics`; this module parses and checks the flags and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from puregen_fast.cli import argtypes as at
from puregen_fast.cli.argtypes import count_or_all, int_at_least, int_list
from puregen_fast.data.datasets import DATASETS, SPLITS, default_test_split, open_dataset
from puregen_fast.errors import UsageError
from puregen_fast.eval.classifier import (
    ARCHS,
    MAX_CROP_PAD,
    default_config,
    undertrained_message,
)
from puregen_fast.eval.metrics import format_table
from puregen_fast.eval.narcissus import (
    NarcissusConfig,
    check_on_victim,
    judge_trigger,
    synthesize_narcissus,
    target_rate,
)
from puregen_fast.eval.poison import QUANTIZE, make_trigger, save_poisoned_npz, save_trigger
from puregen_fast.eval.poisons import (
    ATTACKS,
    AUTHORS_DATASETS,
    BP_MODES,
    HF_REPO,
    POISON_DATASETS,
    PoisonSpec,
    authors_dataset,
    poison_with_published,
)
from puregen_fast.eval.run import (
    Attack,
    EvalSet,
    Experiment,
    Outcome,
    TrainSource,
    load_results,
    poison_to_npz,
    run_experiment,
    save_result,
)
from puregen_fast.runtime import resolve_device

__all__ = ["add_arguments", "run"]

# ----------------------------------------------------------------------------- arguments


_widths = int_list(1, 4096, max_len=8)  # airbench 64,256,256; resnet18 64


def _add_poison_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="the training set")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="as for purify")
    p.add_argument("--split", default="train", help="(default %(default)s)")
    p.add_argument(
        "--trigger",
        metavar="FILE",
        default=None,
        help=".npy trigger, shape (1, 3, h, w) or (3, h, w), in the [-1, 1] image space "
        "(or --attack for the authors' published poisons)",
    )
    p.add_argument(
        "--target-class",
        metavar="K",
        type=at.class_index,
        required=True,
        help="the target class (the trial folder <k> for gradient-matching and "
        "bullseye-polytope)",
    )
    a = p.add_argument_group("the authors' published poisons (instead of --trigger)")
    a.add_argument("--attack", choices=ATTACKS, default=None)
    a.add_argument(
        "--poisons",
        metavar="SRC",
        default=f"hf:{HF_REPO}",
        help="a local copy of the poisons dataset, or hf:owner/name (default %(default)s; "
        "only the files needed are fetched)",
    )
    a.add_argument(
        "--poisons-dataset",
        metavar="NAME",
        default=None,
        help="the data set the poisons were made for (default: --dataset; needed with npz "
        "or imagefolder)",
    )
    a.add_argument(
        "--target-image", metavar="FILE|DIR", default=None,
        help="gradient-matching: the trial's target.pickle, or the folder holding the authors' "
        "Poisons/ (their <data_dir>) or GradientMatching/ (default: looked for beside the poisons)",
    )  # fmt: skip
    a.add_argument("--narcissus-size", type=int_at_least(1, 1024), default=32, help="(default 32)")
    a.add_argument(
        "--narcissus-eps", type=int_at_least(1, 255), default=8, help="pixel levels (default 8)"
    )
    a.add_argument("--bp-poisons", type=int, choices=(5, 50), default=50)
    a.add_argument("--bp-mode", choices=tuple(BP_MODES), default="linear-transfer")
    a.add_argument("--bp-iters", type=at.steps, default=800)
    a.add_argument("--bp-repeat", type=int_at_least(1, 100), default=1, help="5 poisons: 1, 3 or 5")
    p.add_argument(
        "--count",
        metavar="N|all",
        type=count_or_all,
        default=500,
        help="images of the target class to poison, or all of them (default %(default)s, the "
        "authors' CIFAR-10 setting: 1%% of the training set)",
    )
    p.add_argument(
        "--random-select",
        action="store_true",
        help="poison N random images of the class (with --seed) instead of the last N",
    )
    p.add_argument("--seed", type=at.seed, default=0, help="for --random-select")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="trunc",
        help="float -> uint8: trunc (torchvision ToPILImage, the authors' bytes; default) or round",
    )
    p.add_argument("--out", metavar="FILE.npz", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training set (one of)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", metavar="DIR", help="a `puregen-fast purify` output folder")
    src.add_argument("--train-npz", metavar="FILE", help="an .npz (e.g. from `eval poison`)")
    src.add_argument("--train-dataset", choices=DATASETS, help="a data set as it is (no defense)")
    g.add_argument("--train-data-dir", metavar="DIR", default=None)
    g.add_argument("--train-split", default="train")
    g.add_argument("--limit-train", metavar="N", type=at.count, default=None)
    t = p.add_argument_group("test set")
    t.add_argument("--test-dataset", choices=DATASETS, required=True)
    t.add_argument("--test-data-dir", metavar="DIR", default=None)
    t.add_argument(
        "--test-split", default=None, help="default: test (tinyimagenet: val; npz: the file)"
    )
    t.add_argument("--limit-test", metavar="N", type=at.count, default=None, help="first N only")
    a = p.add_argument_group("attack (optional: without it only natural accuracy)")
    a.add_argument("--trigger", metavar="FILE", default=None, help="the Narcissus trigger .npy")
    a.add_argument("--target-class", metavar="K", type=at.class_index, default=None)
    a.add_argument(
        "--trigger-scale",
        metavar="M",
        type=at.float_in(1e-6, 1e6),
        nargs="+",
        default=[1.0],
        help="test-time trigger multipliers (default 1; the authors also report 2 and 3, the "
        "Narcissus paper uses 3)",
    )
    a.add_argument("--quantize", choices=QUANTIZE, default="trunc", help="as for eval poison")


def _add_classifier_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("classifier")
    c.add_argument("--arch", choices=ARCHS, default="airbench")
    c.add_argument(
        "--epochs",
        type=at.epochs,
        default=None,
        help="default: airbench 10, resnet18 200 (the paper's)",
    )
    c.add_argument(
        "--batch-size", type=at.batch_size, default=None, help="airbench 1024, resnet18 128"
    )
    c.add_argument(
        "--lr",
        type=at.learning_rate,
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
        type=at.float_in(1e-12, 1e6),
        default=None,
        help="airbench: eps of the patch-whitening init (default 5e-4, airbench's); raise it "
        "(e.g. 0.05) when training data lacks the test set's high frequencies",
    )
    c.add_argument("--tta", choices=("auto", "none", "flip"), default="auto")
    c.add_argument(
        "--steps",
        type=at.steps,
        default=None,
        help="train for this many optimiser steps (instead of --epochs)",
    )
    c.add_argument(
        "--crop-pad",
        type=int_at_least(0, MAX_CROP_PAD),
        default=None,
        help="random-crop padding of the augmentation (airbench 2, resnet18 4; 0: no crops)",
    )
    c.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    c.add_argument("--seed", type=at.seed, default=0)
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    o = p.add_argument_group("output")
    o.add_argument("--name", default=None, help="the row name in the table (default: derived)")
    o.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress bar (the table still prints)")


def _add_trigger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        choices=("synthetic", "narcissus"),
        default="synthetic",
        help="synthetic: a --kind pattern (tests, demos); narcissus: the attack (Zeng et al. "
        "2023), optimised against a surrogate",
    )
    p.add_argument(
        "--size", type=int_at_least(1, 1024), nargs=2, metavar=("H", "W"), default=[32, 32]
    )
    p.add_argument(
        "--eps",
        type=at.float_in(0.0, 2.0, lo_open=True),
        default=16 / 255 * 2,
        help="L-inf amplitude in the [-1, 1] space (default 2*16/255: 16 pixel levels)",
    )
    p.add_argument("--kind", choices=("uniform", "checker"), default="uniform")
    p.add_argument("--seed", type=at.seed, default=0)
    p.add_argument("--out", metavar="FILE.npy", required=True)
    n = p.add_argument_group("narcissus")
    n.add_argument("--dataset", choices=DATASETS, help="the set whose target class is attacked")
    n.add_argument("--data-dir", metavar="DIR", default=None)
    n.add_argument("--split", default="train")
    n.add_argument("--target-class", metavar="K", type=at.class_index, default=None)
    n.add_argument(
        "--count",
        metavar="N",
        type=at.count,
        default=None,
        help="target-class examples the attacker has (default: all of the class)",
    )
    n.add_argument(
        "--ood-dataset",
        choices=DATASETS,
        help="public out-of-distribution images with their own classes (Narcissus: "
        "Tiny-ImageNet for CIFAR-10); resized to the images' size",
    )
    n.add_argument("--ood-data-dir", metavar="DIR", default=None)
    n.add_argument("--ood-split", default="train")
    n.add_argument("--limit-ood", metavar="N", type=at.count, default=None)
    d = NarcissusConfig()
    n.add_argument("--rounds", type=at.steps, default=d.rounds, help="(default %(default)s)")
    n.add_argument("--lr", type=at.learning_rate, default=d.lr, help="(default %(default)s)")
    n.add_argument("--batch-size", type=at.batch_size, default=d.batch_size)
    n.add_argument("--surrogate-arch", choices=ARCHS, default=d.surrogate_arch)
    n.add_argument("--surrogate-epochs", type=at.epochs, default=d.surrogate_epochs)
    n.add_argument(
        "--surrogate-widths",
        type=_widths,
        default=None,
        help="as --widths of eval run (default: the architecture's)",
    )
    n.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    n.add_argument(
        "--check-victim", metavar="ARCH", choices=ARCHS, default=None,
        help="before calling the trigger successful, train a fresh ARCH victim on --dataset with "
        "the trigger on the target examples and measure it on held-apart images of the other "
        "classes (default: not checked, and the report says so)",
    )  # fmt: skip
    n.add_argument("--json", metavar="OUT", default=None, help="write the surrogate's figures")
    n.add_argument("--quiet", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommands: poison, run, table, trigger."""
    sub = parser.add_subparsers(
        dest="eval_command", metavar="{poison,run,experiment,photos,table,trigger}", required=True
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
    _add_data_args(r)
    _add_classifier_args(r)
    from puregen_fast.cli.eval_experiment import add_experiment_arguments, add_photos_arguments

    x = sub.add_parser(
        "experiment",
        help="the paper's protocol: poison, purify with each defense, train, the table",
        description="Poison a training set, purify it with each defense (through the engine and "
        "the shard writer), train each classifier with each seed, and write the table "
        "(markdown, JSON, PNG chart). Rerunning reuses every finished step and cell.",
    )
    add_experiment_arguments(x)
    add_photos_arguments(
        sub.add_parser(
            "photos",
            help="write a small real-image set: scikit-image's photos cut into tiles",
            description="Cut the sample photographs bundled with scikit-image into tiles, the "
            "photograph as the class, and write train/test/heldout/pood .npz files.",
        )
    )
    t = sub.add_parser("table", help="print the table of several `eval run --json` results")
    t.add_argument("results", nargs="+", metavar="RESULT.json")
    g = sub.add_parser(
        "trigger",
        help="synthesise a Narcissus trigger (--method narcissus) or write a synthetic one",
    )
    _add_trigger_args(g)


# ----------------------------------------------------------------------------- checks


def _check_split(flag: str, name: str, split: str) -> None:
    if name in SPLITS and split not in SPLITS[name]:
        raise UsageError(
            f"{flag} {split!r} is not a split of {name}; choose one of {', '.join(SPLITS[name])}"
        )


def _check_out(out: Path, suffix: str) -> None:
    if out.suffix != suffix:
        raise UsageError(f"--out {out}: the file name must end in {suffix}")


def _check_out_folder(out: Path) -> None:
    """Create ``out``'s folder (as ``purify --out`` does); a path through a file is an error."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create its folder {out.parent} ({e})") from e


def _validate_run(args: argparse.Namespace) -> None:
    """The flags of ``eval run`` that can be checked before reading anything."""
    if (args.trigger is None) != (args.target_class is None):
        raise UsageError("--trigger and --target-class go together (give both, or neither)")
    if args.train_dataset is None and (
        args.train_data_dir is not None or args.train_split != "train"
    ):
        raise UsageError("--train-data-dir / --train-split apply only with --train-dataset")
    if args.test_split is None:
        args.test_split = default_test_split(args.test_dataset)
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


def _train_source(args: argparse.Namespace) -> TrainSource:
    if args.train is not None:
        return TrainSource("purified", path=args.train)
    if args.train_npz is not None:
        p = Path(args.train_npz).expanduser()
        if not p.is_file():
            raise UsageError(f"--train-npz {p}: no such file")
        return TrainSource("npz", path=args.train_npz)
    _check_split("--train-split", args.train_dataset, args.train_split)
    if args.train_dataset in ("imagefolder", "npz") and not args.train_data_dir:
        raise UsageError(f"--train-dataset {args.train_dataset} needs --train-data-dir")
    return TrainSource(
        "dataset", path=args.train_data_dir, dataset=args.train_dataset, split=args.train_split
    )


def _experiment(args: argparse.Namespace) -> Experiment:
    """The checked flags of ``eval run`` as plain settings."""
    attack = None
    if args.trigger is not None:
        scales = tuple(args.trigger_scale)
        attack = Attack(args.trigger, args.target_class, scales, args.quantize)
    cfg = default_config(
        args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        widths=args.widths,
        seed=args.seed,
        tta=None if args.tta == "auto" else args.tta,
        whiten_eps=args.whiten_eps,
        steps=args.steps,
        crop_pad=args.crop_pad,
        flip=False if args.no_flip else None,
    )
    test = EvalSet(args.test_dataset, args.test_data_dir, args.test_split, args.limit_test)
    return Experiment(_train_source(args), test, cfg, attack, args.limit_train, args.name)


# ----------------------------------------------------------------------------- commands


def _poison_spec(args: argparse.Namespace) -> PoisonSpec:
    """The published poison set the flags of ``eval poison --attack`` name."""
    name, _ = authors_dataset(args.dataset, args.poisons_dataset)
    if args.poisons_dataset is None and name not in AUTHORS_DATASETS:
        raise UsageError(
            f"--poisons-dataset: name the data set the poisons were made for (one of "
            f"{', '.join(POISON_DATASETS[args.attack])}); --dataset {args.dataset} does not"
        )
    spec = PoisonSpec(
        args.attack, name, args.target_class, args.narcissus_size, args.narcissus_eps,
        args.bp_poisons, args.bp_mode, args.bp_iters, args.bp_repeat,
    )  # fmt: skip
    spec.check()
    return spec


def _cmd_poison_published(args: argparse.Namespace, out: Path) -> int:
    if args.trigger is not None:
        raise UsageError("--trigger and --attack exclude each other (a trigger file, or the "
                         "authors' published poisons)")  # fmt: skip
    if args.target_image is not None and args.attack != "gradient-matching":
        raise UsageError(f"--target-image applies to --attack gradient-matching, not "
                         f"{args.attack}")  # fmt: skip
    spec = _poison_spec(args)  # before reading the data set: a bad flag fails fast
    ds = open_dataset(args.dataset, args.data_dir, args.split, quiet=args.quiet)
    k = len(ds.class_names)
    if spec.attack == "narcissus" and args.target_class >= k:
        raise UsageError(f"--target-class {args.target_class}: {ds.name} has {k} classes")
    ps = poison_with_published(
        ds.images, ds.labels, list(ds.class_names), spec, args.poisons, count=args.count,
        last_n=not args.random_select, seed=args.seed, quantize=args.quantize,
        gm_target=args.target_image,
    )  # fmt: skip
    save_poisoned_npz(ps, out)
    if not args.quiet:
        note = authors_dataset(args.dataset, args.poisons_dataset)[1]
        for line in filter(None, [note, str(ps.extra.get("poisoning", ""))]):
            print(f"eval poison: {line}", file=sys.stderr)
        print(
            f"eval poison: {spec.title}: {ps.poison_idx.size} of {len(ds)} images poisoned "
            f"(class {ps.target_class}, {ds.class_names[ps.target_class]}) -> {out}",
            file=sys.stderr,
        )
    return 0


def _cmd_poison(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    _check_out(out, ".npz")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    _check_out_folder(out)
    _check_split("--split", args.dataset, args.split)
    if args.dataset in ("imagefolder", "npz") and not args.data_dir:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir")
    if args.attack is not None:
        return _cmd_poison_published(args, out)
    if args.trigger is None:
        raise UsageError("give --trigger FILE.npy, or --attack for the authors' published poisons")
    ps, ds = poison_to_npz(
        args.dataset,
        args.data_dir,
        args.split,
        args.trigger,
        args.target_class,
        args.count,
        out,
        last_n=not args.random_select,
        seed=args.seed,
        quantize=args.quantize,
        quiet=args.quiet,
    )
    if not args.quiet:
        which = "all" if args.count is None else "random" if args.random_select else "last"
        print(
            f"eval poison: {len(ps.poison_idx)} ({which}) images of class {args.target_class} "
            f"({ds.class_names[args.target_class]}) of {len(ds)} poisoned -> {out}",
            file=sys.stderr,
        )
    return 0


def _cmd_narcissus(args: argparse.Namespace, out: Path) -> int:
    for flag, v in (("--dataset", args.dataset), ("--target-class", args.target_class),
                    ("--ood-dataset", args.ood_dataset)):  # fmt: skip
        if v is None:
            raise UsageError(f"--method narcissus needs {flag}")
    _check_split("--split", args.dataset, args.split)
    _check_split("--ood-split", args.ood_dataset, args.ood_split)
    for flag, name, d, dflag in (
        ("--dataset", args.dataset, args.data_dir, "--data-dir"),
        ("--ood-dataset", args.ood_dataset, args.ood_data_dir, "--ood-data-dir"),
    ):
        if name in ("imagefolder", "npz") and not d:
            raise UsageError(f"{flag} {name} needs {dflag}")
    if args.json is not None and Path(args.json).expanduser().is_dir():
        raise UsageError(f"--json {args.json}: is a folder; give a file name")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from e
    cfg = NarcissusConfig(
        eps=args.eps, size=(args.size[0], args.size[1]), rounds=args.rounds, lr=args.lr,
        batch_size=args.batch_size, surrogate_arch=args.surrogate_arch,
        surrogate_epochs=args.surrogate_epochs, surrogate_widths=args.surrogate_widths,
        seed=args.seed,
    )  # fmt: skip
    ds = open_dataset(args.dataset, args.data_dir, args.split, quiet=args.quiet)
    k = len(ds.class_names)
    if args.target_class >= k:
        raise UsageError(f"--target-class {args.target_class}: {ds.name} has {k} classes")
    cfg.check(tuple(ds.images.shape[1:3]))
    ood = open_dataset(args.ood_dataset, args.ood_data_dir, args.ood_split, quiet=args.quiet,
                       limit=args.limit_ood)  # fmt: skip
    members = np.flatnonzero(ds.labels == args.target_class)
    if members.size == 0:
        raise UsageError(f"--target-class {args.target_class}: no images of it in --dataset")
    if args.count is not None:
        if args.count > members.size:
            raise UsageError(f"--count {args.count}: the class has {members.size} images")
        members = np.sort(np.random.default_rng(args.seed).choice(members, args.count, False))
    res = synthesize_narcissus(
        np.asarray(ds.images[members]), np.asarray(ood.images), ood.labels, cfg,
        device=device, quiet=args.quiet,
    )  # fmt: skip
    save_trigger(res.trigger, out)
    # the data set's other classes: images the attacker never used (held apart)
    others = np.asarray(ds.images[np.flatnonzero(ds.labels != args.target_class)])
    rates = {f"x{m:g}": target_rate(res, others, m) for m in (1.0, 3.0)}
    rates = {"clean": target_rate(res, others, None), **rates}
    victim = None
    if args.check_victim:
        victim = check_on_victim(res.trigger, np.asarray(ds.images), ds.labels,
                                 args.target_class, members, args.check_victim, seed=args.seed,
                                 device=device, quiet=args.quiet)  # fmt: skip
    report = judge_trigger(rates, res.trigger, cfg.eps, victim)
    if args.json:
        save_result(args.json, {
            "format": "puregen-fast-narcissus", "trigger": str(out.absolute()),
            "target_class": args.target_class, "target_examples": int(members.size),
            "ood_images": len(ood), "held_apart_images": len(others),
            "surrogate_target_rate": rates, "loss_per_round": res.history,
            "best_round": res.best_round, "seconds": res.seconds, "config": res.config,
            "verdict": report.verdict, "success": report.success, "reasons": report.reasons,
            "warnings": report.warnings, "budget_used": report.budget_used, "victim": victim,
        })  # fmt: skip
    print(
        f"eval trigger: Narcissus trigger for class {args.target_class} "
        f"({ds.class_names[args.target_class]}) from {members.size} target and {len(ood)} "
        f"POOD images in {res.seconds:.0f}s -> {out}\n"
        f"surrogate on the {len(others)} other-class images of --dataset (never used): "
        f"classified as the target {100 * rates['clean']:.1f}% clean, "
        f"{100 * rates['x1']:.1f}% with the trigger x1, {100 * rates['x3']:.1f}% x3"
    )
    for line in report.lines():
        print(f"eval trigger: {line}")
    return 0


def _cmd_trigger(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    _check_out(out, ".npy")
    _check_out_folder(out)
    if args.method == "narcissus":
        return _cmd_narcissus(args, out)
    if args.dataset is not None or args.ood_dataset is not None:
        raise UsageError("--dataset / --ood-dataset apply to --method narcissus only")
    save_trigger(make_trigger(args.kind, tuple(args.size), args.eps, args.seed), out)
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    print(format_table(load_results(args.results)))
    return 0


def _report_run(args: argparse.Namespace, res: Outcome) -> None:
    """The warning for a suspicious result and the closing summary, on stderr."""
    clf, rec = res.classifier, res.record
    k = len(rec["train"]["class_names"])
    natural = rec["metrics"]["natural_acc"]
    train_acc = clf.history[-1]["train_acc"] if clf.history else 0.0
    if train_acc >= 0.9 and natural < 2 / k:
        print(
            f"eval run: warning: {100 * train_acc:.0f}% training accuracy (last epoch, augmented) "
            f"but {100 * natural:.0f}% natural test accuracy: the training images "
            f"may differ in kind from the test images (e.g. purification removed frequencies the "
            f"test set has). With --arch airbench, try --whiten-eps 0.05 or --arch resnet18.",
            file=sys.stderr,
        )
    fit = rec["metrics"].get("fit_acc")
    warn = undertrained_message(fit, clf) if fit is not None else None
    if warn:
        print(f"eval run: warning: {warn}", file=sys.stderr)
    if not args.quiet:
        print(
            f"eval run: {rec['train']['num_images']} training images, "
            f"{clf.config['total_steps']} steps (batch {clf.config['batch_size_used']}) of "
            f"{args.arch} in {clf.train_seconds:.1f}s "
            f"({clf.train_images_per_s:.0f} img/s) on {rec['device']['name']} ({clf.device})"
            + (f"; results -> {args.json}" if args.json else ""),
            file=sys.stderr,
        )


def _note(message: str) -> None:
    print(f"eval run: note: {message}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    _validate_run(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from e
    exp = _experiment(args)
    res = run_experiment(exp, device, quiet=args.quiet, note=None if args.quiet else _note)
    if args.json:
        save_result(args.json, res.record)
    print(format_table([res.record]))
    _report_run(args, res)
    return 0


def _cmd_photos(args: argparse.Namespace) -> int:
    from puregen_fast.cli.eval_experiment import run_photos_command

    return run_photos_command(args)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from puregen_fast.cli.eval_experiment import run_experiment_command

    return run_experiment_command(args)


def run(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand."""
    commands = {
        "poison": _cmd_poison,
        "run": _cmd_run,
        "experiment": _cmd_experiment,
        "photos": _cmd_photos,
        "table": _cmd_table,
        "trigger": _cmd_trigger,
    }
    cmd = commands.get(getattr(args, "eval_command", None))
    if cmd is None:
        raise UsageError("choose an eval subcommand: poison, run, table or trigger")
    return cmd(args)
