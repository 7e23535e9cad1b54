"""``puregen-fast eval experiment``: the paper's protocol in one command (poison -> purify with
each defense -> train each classifier per seed -> the table), `puregen_fast.eval.experiment`'s
`run_protocol`. This module parses and checks the flags and prints the table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from puregen_fast.cli import argtypes as at
from puregen_fast.cli.argtypes import count_or_all, int_at_least
from puregen_fast.config import EngineConfig, add_arguments
from puregen_fast.config import flag as field_flag
from puregen_fast.data.datasets import DATASETS, SPLITS, default_test_split
from puregen_fast.errors import UsageError
from puregen_fast.eval.experiment import (
    DROP_FRAC,
    SWEEPABLE,
    Protocol,
    defenses,
    parse_classifier_spec,
    parse_sweep,
    run_protocol,
)
from puregen_fast.eval.poison import QUANTIZE
from puregen_fast.eval.protocols import PROFILES, describe_profile, profile_settings
from puregen_fast.eval.run import EvalSet
from puregen_fast.runtime import resolve_device

__all__ = ["add_experiment_arguments", "run_experiment_command"]

ATTACKS = ("narcissus", "gradient-matching", "bullseye-polytope")
# the engine's settings this command sets its own way: the method per --defenses, the device by
# the run's --device (victims and engine alike); every other `EngineConfig` field is a flag made
# as purify makes it
ENGINE_ELSEWHERE = {"method": "--defenses", "device": "--device"}
ENGINE_DEST = "engine_"  # args.engine_<field>: apart from the command's own values


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``eval experiment``."""
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, choices=DATASETS, help="the training set")
    d.add_argument("--data-dir", metavar="DIR", default=None, help="as for purify")
    d.add_argument("--split", default="train")
    d.add_argument("--test-dataset", required=True, choices=DATASETS)
    d.add_argument("--test-data-dir", metavar="DIR", default=None)
    d.add_argument("--test-split", default=None, help="default: test (tinyimagenet: val)")
    d.add_argument("--limit-test", metavar="N", type=at.count, default=None)
    p.add_argument(
        "--protocol", choices=PROFILES, default="ours",
        help="the victims and the measurement as one profile: ours (airbench and ResNet-18, "
        "trigger x1 and x3) or paper (the authors' ResNet-18 recipe, trigger x1 and x2); "
        "printed at the start and stored in results.json (default %(default)s)",
    )  # fmt: skip
    a = p.add_argument_group("attack")
    a.add_argument("--attack", choices=ATTACKS, default="narcissus")
    a.add_argument(
        "--trigger",
        metavar="FILE|DIR",
        default=None,
        help="narcissus: a trigger .npy (one target class) or a folder of best_noise_lab<k>.npy "
        "(e.g. from `eval trigger --method narcissus`)",
    )
    a.add_argument(
        "--poisons",
        metavar="SRC",
        default=None,
        help="the authors' published poisons: a local copy or hf:SunayBhat1/puregen-poisons",
    )
    a.add_argument(
        "--poisons-dataset", default=None, help="the data set the poisons were made for"
    )
    a.add_argument(
        "--target-class",
        metavar="K",
        type=at.class_index,
        nargs="+",
        required=True,
        help="one or more target classes (gradient-matching, bullseye-polytope: trial numbers);"
        " several give the mean and the worst class",
    )
    a.add_argument("--count", metavar="N|all", type=count_or_all, default=argparse.SUPPRESS,
                   help="narcissus: training images of the target class to poison, or all of "
                   "them (default: the --protocol's: 500; paper on CINIC-10: 900)")  # fmt: skip
    a.add_argument("--random-select", action=argparse.BooleanOptionalAction, default=None,
                   help="poison random images of the class instead of the last ones (default: "
                   "the --protocol's: the last; paper on CINIC-10: random)")  # fmt: skip
    a.add_argument(
        "--target-image", metavar="FILE|DIR", default=None,
        help="gradient-matching: the trials' target.pickle (one trial), or the folder holding "
        "the authors' Poisons/ (their <data_dir>) or GradientMatching/; default: beside the "
        "poisons, then <data_dir>/Poisons as the authors keep it",
    )  # fmt: skip
    a.add_argument("--quantize", choices=QUANTIZE, default="trunc", help="as for eval poison")
    a.add_argument(
        "--trigger-scale", metavar="M", type=at.float_in(1e-6, 1e6), nargs="+", default=None,
        help="test-time trigger multipliers (default: the --protocol's, 1 3 or 1 2)",
    )  # fmt: skip
    f = p.add_argument_group("defenses (the engine's settings, as for purify)")
    f.add_argument(
        "--defenses",
        default="none,jpeg,ebm",
        help=f"comma-separated, from {','.join(defenses())} (default %(default)s); drop: "
        "train without the --drop-frac share of highest EBM energy (detect and drop)",
    )
    f.add_argument(
        "--drop-frac", type=at.float_in(0.0, 1.0, lo_open=True), default=None,
        help=f"drop: the share of the training set left out, the images of highest EBM energy "
        f"(default {DROP_FRAC:g}; on the README's photo experiment no share from 0.05 to 0.2 "
        "removed the backdoor)",
    )
    f.add_argument("--ebm", metavar="SRC", default=None,
                   help="default: the authors' published EBM (as purify)")  # fmt: skip
    f.add_argument(
        "--ebm-poisoned", metavar="SRC", default=None,
        help="an EBM trained on the poisoned training set itself (e.g. `train ebm --dataset npz "
        "--data-dir` an `eval poison` output): each EBM defense also runs with it, as its own row",
    )  # fmt: skip
    f.add_argument("--ddpm", metavar="SRC", default=None,
                   help="default: the authors' published DDPM (as purify)")  # fmt: skip
    f.add_argument(
        "--sweep", metavar="NAME=V1,V2,...", action="append", default=None,
        help="vary an engine setting: each defense it changes runs once per value (several "
        "--sweep: every combination), one row each, and curve.png draws poison success against "
        f"natural accuracy per setting; NAME one of "
        f"{', '.join(k.replace('_', '-') for k in SWEEPABLE)}, e.g. ebm-steps=20,40,80,150",
    )  # fmt: skip
    f.add_argument("--purify-batch-size", type=at.batch_size, default=64)
    c = p.add_argument_group("classifiers")
    c.add_argument(
        "--classifier",
        metavar="SPEC",
        action="append",
        default=None,
        help="ARCH[:KEY=VALUE,...], repeatable (default: the --protocol's victims), e.g. "
        "airbench:widths=32/64/64,steps=300 or resnet18:widths=16,flip=off; ARCH also a preset: "
        "resnet18-paper, resnet18-bp-linear or resnet18-bp-finetune (these two need "
        "pretrained=FILE); keys: epochs, "
        "steps, batch_size, lr, widths, crop_pad, flip, tta, whiten_eps, momentum, "
        "weight_decay, label_smoothing, schedule (step|triangular|milestones), milestones "
        "(epochs, e.g. 15/25/35), optimizer (sgd|adam), pretrained, train_params (all|linear), "
        "frozen_bn, warmup_frac, nesterov, "
        "pad_mode (reflect|zeros), normalize (data|cifar10|tinyimagenet), name",
    )
    c.add_argument("--seeds", type=at.seed_list, default=(0, 1, 2), help="default 0,1,2")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="the experiment folder; rerunning reuses every finished step and cell",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bars (cell lines stay)")
    o.add_argument("--preview", metavar="N", type=at.preview, default=None,
                   help="each purified copy's folder gets preview.png: N poisoned training "
                   "images, evenly spaced, above the defense's output, each image's change (RMS "
                   "in levels) under it")  # fmt: skip
    _add_engine_arguments(p, f)


def engine_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """`EngineConfig` field -> this command's flag for it (`ENGINE_ELSEWHERE` included)."""
    return {a.dest.removeprefix(ENGINE_DEST): a.option_strings[-1] for a in p._actions
            if a.dest.startswith(ENGINE_DEST)} | ENGINE_ELSEWHERE  # fmt: skip


def _add_engine_arguments(p: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> None:
    """The engine's flags from `EngineConfig`, as purify's (type, range, choices, help), added
    last: a field whose flag this command already has for something else is --purify-<name>
    (--seed would read as the victims' --seeds, so the engine's is --purify-seed)."""
    taken = {s for a in p._actions for s in a.option_strings}
    rename = {f.name: "--purify-" + field_flag(f.name)[2:]
              for f in dataclasses.fields(EngineConfig)
              if f.name == "seed" or field_flag(f.name) in taken}  # fmt: skip
    add_arguments(p, EngineConfig, skip=tuple(ENGINE_ELSEWHERE), rename=rename, group=group,
                  unset=True, dest_prefix=ENGINE_DEST)  # fmt: skip


def _protocol(args: argparse.Namespace) -> Protocol:
    if args.test_split is None:
        args.test_split = default_test_split(args.test_dataset)
    for flag, name, split in (("--split", args.dataset, args.split),
                              ("--test-split", args.test_dataset, args.test_split)):  # fmt: skip
        if name in SPLITS and split not in SPLITS[name]:
            raise UsageError(f"{flag} {split!r} is not a split of {name}; choose one of "
                             f"{', '.join(SPLITS[name])}")  # fmt: skip
    for flag, name, d in (("--dataset", args.dataset, args.data_dir),
                          ("--test-dataset", args.test_dataset, args.test_data_dir)):  # fmt: skip
        if name in ("imagefolder", "npz") and not d:
            dflag = "--data-dir" if flag == "--dataset" else "--test-data-dir"
            raise UsageError(f"{flag} {name} needs {dflag}")
    prof = profile_settings(args.protocol, args.dataset, args.poisons_dataset)
    if args.protocol == "paper" and args.attack == "bullseye-polytope" and not args.classifier:
        raise UsageError(
            "--protocol paper --attack bullseye-polytope: the authors' victim is their pretrained "
            "ResNet-18; give --classifier resnet18-bp-linear:pretrained=FILE (or "
            "resnet18-bp-finetune) with FILE their ckpt-ResNet18-4800.t7"
        )
    specs = (tuple(parse_classifier_spec(s) for s in args.classifier) if args.classifier
             else prof["classifiers"])  # fmt: skip
    engine = {k.removeprefix(ENGINE_DEST): v for k, v in vars(args).items()
              if k.startswith(ENGINE_DEST)}  # fmt: skip
    if engine.get("quantize") is None:  # --purify-quantize not given: the protocol's
        engine["quantize"] = prof["purify_quantize"]
    purify = {"ebm": args.ebm, "ddpm": args.ddpm, "batch_size": args.purify_batch_size,
              "drop_frac": args.drop_frac, **engine}  # fmt: skip
    return Protocol(
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        test=EvalSet(args.test_dataset, args.test_data_dir, args.test_split, args.limit_test),
        attack=args.attack,
        targets=tuple(args.target_class),
        defenses=tuple(d.strip() for d in args.defenses.split(",") if d.strip()),
        classifiers=specs,
        seeds=tuple(args.seeds),
        trigger=args.trigger,
        poisons=args.poisons,
        poisons_dataset=args.poisons_dataset,
        count=getattr(args, "count", prof["count"]),  # absent: not given
        last_n=prof["last_n"] if args.random_select is None else not args.random_select,
        target_image=args.target_image,
        trigger_at_test=prof["trigger_at_test"],
        quantize=args.quantize,
        scales=tuple(args.trigger_scale or prof["scales"]),
        purify=tuple(sorted((k, v) for k, v in purify.items() if v is not None)),
        sweep=tuple(parse_sweep(s) for s in args.sweep or ()),
        ebm_poisoned=args.ebm_poisoned,
        profile=args.protocol,
    )


def run_experiment_command(args: argparse.Namespace) -> int:
    """``eval experiment``: run the protocol, print the markdown table on stdout."""
    proto = _protocol(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from e
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give a folder")

    def log(line: str) -> None:
        print(f"eval experiment: {line}", file=sys.stderr, flush=True)

    log(describe_profile(proto.profile, proto.dataset, proto.poisons_dataset))
    if args.classifier or args.trigger_scale:
        log("--classifier/--trigger-scale given: they replace the profile's victims/scales")

    res = run_protocol(proto, out, device, quiet=args.quiet, log=log, preview=args.preview)
    print((out / "table.md").read_text(), end="")
    log(
        f"{len(res['cells'])} cells ({res['cells_reused']} reused) in {res['seconds']:.0f}s on "
        f"{res['device'].get('name', device)}; {out / 'results.json'}, {out / 'table.md'}, "
        f"{out / 'chart.png'}, {out / 'curve.png'}"
    )
    return 0


def add_photos_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``eval photos``."""
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the .npz files")
    p.add_argument("--size", type=int_at_least(8, 1024), default=32, help="tile side (default 32)")
    p.add_argument("--train-per-class", type=int_at_least(1, 100_000), default=100)
    p.add_argument("--test-per-class", type=int_at_least(1, 100_000), default=30)
    p.add_argument("--heldout-per-class", type=int_at_least(0, 100_000), default=20)
    p.add_argument("--seed", type=at.seed, default=0)


def run_photos_command(args: argparse.Namespace) -> int:
    """``eval photos``: write the real-image set (`puregen_fast.eval.photos`)."""
    from puregen_fast.eval.photos import write_photo_sets

    paths = write_photo_sets(
        args.out,
        size=args.size,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        heldout_per_class=args.heldout_per_class,
        seed=args.seed,
    )
    for split, path in paths.items():
        print(f"eval photos: {split}: {path}", file=sys.stderr)
    return 0
