"""Every input of an ``eval experiment``, found before anything is purified or trained: the
data sets, each target's trigger or poison files, the target image of the triggerless attacks
and the generative models, each with where it came from (the flag, or the authors' layout
that put it there). A missing input is one UsageError at the start, naming the flag that
supplies it, not a failure after hours of training.

The authors keep some inputs outside their poisons dataset: Gradient Matching's target image
is read from ``<data_dir>/Poisons/GradientMatching/...`` (utils/classifier.py 1125) while the
poisons come from ``<data_dir>/PureGen_Poisons/GradientMatching/...`` (utils/purification.py
90), and Bullseye Polytope's target is a frog of the training split itself (utils/classifier.py
1133-1135); `puregen_fast.eval.poisons.find_gm_target` and ``bp_target`` look there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from puregen_fast.errors import UsageError
from puregen_fast.eval.poisons import (
    BP_TARGET_SKIP,
    PoisonSpec,
    authors_dataset,
    bp_target,
    find_gm_target,
    locate_poisons,
)

__all__ = ["Found", "Plan", "find_inputs", "format_inputs", "inputs_record", "trigger_file"]


class Plan(Protocol):
    """What `find_inputs` reads of an `puregen_fast.eval.experiment.Protocol` (named here, not
    imported: the experiment imports this module)."""

    dataset: str
    test: Any
    attack: str
    targets: tuple[int, ...]
    trigger: str | None
    poisons: str | None
    poisons_dataset: str | None
    target_image: str | None
    classifiers: tuple[Any, ...]
    trigger_at_test: str


@dataclass(frozen=True)
class Found:
    """One input: ``what`` it is, for which ``target`` (None: every target), the file
    (``path``) and ``source``, what put it there."""

    what: str
    target: int | None
    path: str
    source: str


def trigger_file(trigger: str | os.PathLike[str], target: int, n_targets: int) -> Path:
    """``--trigger FILE|DIR``'s file for ``target``: the folder's ``best_noise_lab<k>.npy``, or
    the file itself when there is one target; UsageError naming the flag otherwise."""
    t = Path(trigger).expanduser()
    if t.is_dir():
        f = t / f"best_noise_lab{target}.npy"
        if not f.is_file():
            raise UsageError(f"--trigger {t}: no best_noise_lab{target}.npy for target class "
                             f"{target} in the folder")  # fmt: skip
        return f
    if not t.is_file():
        raise UsageError(f"--trigger {t}: no such file or folder")
    if n_targets > 1:
        raise UsageError(f"--trigger {t}: one file for {n_targets} target classes; give a "
                         f"folder of best_noise_lab<k>.npy, one per class")  # fmt: skip
    return t


def _spec(p: Plan, train_name: str, target: int) -> PoisonSpec:
    return PoisonSpec(p.attack, authors_dataset(train_name, p.poisons_dataset)[0], target)


def find_inputs(
    p: Plan, train_name: str, train_source: str, train_labels: np.ndarray,
    test_source: str, num_classes: int, image_hw: tuple[int, int],
) -> list[Found]:  # fmt: skip
    """Every input of ``p`` (module docstring), checked to exist; UsageError for the first
    one missing, naming the flag that gives it."""
    if p.trigger_at_test not in ("applied", "file"):
        raise UsageError(f"trigger_at_test {p.trigger_at_test!r}: choose applied or file")
    if p.target_image is not None and p.attack != "gradient-matching":
        raise UsageError(f"--target-image applies to --attack gradient-matching, not {p.attack}")
    one_file = p.target_image is not None and Path(p.target_image).expanduser().is_file()
    if one_file and len(p.targets) > 1:
        raise UsageError(f"--target-image {p.target_image}: one file for {len(p.targets)} trials;"
                         " give the folder holding Poisons/ or GradientMatching/")  # fmt: skip
    found = [Found("training set", None, train_source, f"--dataset {p.dataset}"),
             Found("test set", None, test_source, f"--test-dataset {p.test.dataset}")]  # fmt: skip
    note = authors_dataset(train_name, p.poisons_dataset)[1]
    for target in p.targets:
        if p.attack == "narcissus" and p.trigger is not None:
            f = trigger_file(p.trigger, target, len(p.targets))
            found.append(Found("trigger", target, str(f), f"--trigger {p.trigger}"))
            continue
        spec = _spec(p, train_name, target)
        spec.check(num_classes if p.attack == "narcissus" else None)
        if spec.dataset == "stl10" and image_hw != (96, 96):
            raise UsageError(
                f"--poisons-dataset stl10: the authors resize the STL-10 trigger to 96x96, "
                f"STL-10's size, but the training images are {image_hw[1]}x{image_hw[0]}"
            )
        root = locate_poisons(spec, p.poisons)
        src = f"--poisons {p.poisons}" + (f"; {note}" if note else "")
        files = [root / f for f in spec.required_files()]
        if p.attack == "narcissus":
            why = src
            if spec.dataset == "stl10":
                why += (f"; STL-10 class {target} takes CIFAR-10 class {spec.trigger_index}'s "
                        "trigger (utils/purification.py 102-105)")  # fmt: skip
            found.append(Found("trigger", target, str(files[0]), why))
            continue
        found += [Found("poisons", target, str(f), src) for f in files]
        if p.attack == "gradient-matching":
            path, why = find_gm_target(spec, root, p.target_image)
            found.append(Found("target image", target, str(path), why))
        else:
            i = bp_target(train_labels, target)
            found.append(Found(
                "target image", target, f"{train_source} image {i}",
                f"frog number {target + BP_TARGET_SKIP + 1} of the training set "
                "(utils/classifier.py 1134); the authors' victim trains on the first 50 images "
                "a class, so never sees it, ours on the whole set: not yet their protocol",
            ))  # fmt: skip
    for c in p.classifiers:
        opts = dict(c.options)
        if opts.get("pretrained") is not None:
            f = Path(opts["pretrained"]).expanduser()
            if not f.is_file():
                raise UsageError(f"--classifier {c.label}: pretrained={f}: no such file (the "
                                 "authors' ckpt-ResNet18-4800.t7)")  # fmt: skip
            found.append(Found("pretrained network", None, str(f), f"--classifier {c.label}"))
    return found


def format_inputs(found: list[Found]) -> list[str]:
    """One line per input, as the run prints them."""
    out = []
    for f in found:
        who = "" if f.target is None else f" (target {f.target})"
        out.append(f"input: {f.what}{who}: {f.path} <- {f.source}")
    return out


def inputs_record(found: list[Found]) -> list[dict[str, Any]]:
    """The inputs as plain data, for ``results.json``."""
    return [{"what": f.what, "target": f.target, "path": f.path, "source": f.source}
            for f in found]  # fmt: skip
