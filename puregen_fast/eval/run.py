"""``eval run``: train a classifier on one training set (possibly purified) and measure natural
accuracy and poison success on the clean test set (the metrics: `puregen_fast.eval.metrics`).

The typical use: ``poison_to_npz`` (``eval poison``) writes a Narcissus-poisoned copy of a
training set as ``.npz``; ``puregen-fast purify --dataset npz --data-dir POISONED.npz ...``
purifies it; ``run_experiment`` (``eval run --train PURIFIED_DIR``) trains a classifier on the
result and measures it on the clean test set. Its steps, each usable alone: `load_data` (the
training set, purified output included, and the test set), `check_task`, `load_attack`,
`train_classifier`, `evaluate_predictions`, `build_record`. The whole protocol over many
defenses, victims and seeds is `puregen_fast.eval.experiment`.

Error messages name the command-line flag a value comes from (`TrainSource.flag`), as the rest
of `eval` does, so ``puregen-fast eval`` can pass them on unchanged.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puregen_fast.data.datasets import Dataset, open_dataset
from puregen_fast.data.io import atomic_write_json
from puregen_fast.errors import UsageError
from puregen_fast.eval.classifier import Classifier, TrainConfig, train_classifier
from puregen_fast.eval.metrics import evaluate_predictions
from puregen_fast.eval.poison import PoisonedSet, load_trigger, poison_dataset, save_poisoned_npz
from puregen_fast.runtime import describe_device
from puregen_fast.version import __version__

__all__ = [
    "Attack",
    "EvalSet",
    "Experiment",
    "Outcome",
    "RunData",
    "TrainSet",
    "TrainSource",
    "build_record",
    "check_task",
    "load_attack",
    "load_data",
    "load_results",
    "load_train_set",
    "poison_to_npz",
    "run_experiment",
    "save_result",
]

Note = Callable[[str], None]  # receives remarks worth telling the user (not errors)

# ----------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class TrainSource:
    """Where the training set comes from. ``kind``: ``purified`` (``path`` is a purify output
    folder), ``npz`` (``path`` is an .npz file, e.g. from `poison_to_npz`) or ``dataset``
    (``dataset`` as it is, no defense; ``path`` its data folder or None for the cache)."""

    kind: str
    path: str | None = None
    dataset: str | None = None
    split: str = "train"

    @property
    def flag(self) -> str:
        """The ``eval run`` flag that names this source (for messages)."""
        return {"purified": "--train", "npz": "--train-npz"}.get(self.kind, "--train-dataset")


@dataclass(frozen=True)
class EvalSet:
    """The clean test set: ``dataset`` (``data_dir`` or the cache), ``split``, first ``limit``."""

    dataset: str
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = None


@dataclass(frozen=True)
class Attack:
    """The trigger (an .npy path) and target class to measure, at test-time ``scales``."""

    trigger: str
    target_class: int
    scales: tuple[float, ...] = (1.0,)
    quantize: str = "trunc"


@dataclass(frozen=True)
class Experiment:
    """One ``eval run``: train ``classifier`` on ``train`` (first ``limit_train`` images),
    measure it on ``test`` and, with ``attack``, the poison success. ``name``: the table row."""

    train: TrainSource
    test: EvalSet
    classifier: TrainConfig
    attack: Attack | None = None
    limit_train: int | None = None
    name: str | None = None


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


def _method_name(manifest: Mapping[str, Any]) -> str:
    """A short row name from a purify manifest, e.g. ``ebm-150``, ``ddpm-75``, ``jpeg-q75``."""
    pur = manifest.get("purifier") or {}
    method = pur.get("method") or manifest.get("config", {}).get("method", "?")
    # from what the engine recorded (the settings its method reads), not from the method's name
    models = "+".join(f"{k}{pur[k].get('steps')}" for k in ("ebm", "ddpm")
                      if isinstance(pur.get(k), dict))  # fmt: skip
    extras = [f"{tag}{pur[k]}" for k, tag in (("reps", "x"), ("filter_frac", "filt"),
                                              ("jpeg_quality", "q")) if k in pur]  # fmt: skip
    detail = " ".join(filter(None, [models, *extras]))
    return f"{method} ({detail})" if detail else str(method)


def _purified_train_set(path: str) -> TrainSet:
    from puregen_fast.data.reader import load_purified

    pur = load_purified(path)
    man = pur.manifest
    ds = man.get("dataset", {})
    info: dict[str, Any] = {
        "kind": "purified",
        "path": str(Path(path).absolute()),
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


def _npz_train_set(path: str, quiet: bool) -> TrainSet:
    p = Path(path).expanduser()
    ds = open_dataset("npz", p, "train", quiet=quiet)
    info = {"kind": "npz", "path": str(p.absolute())}
    info.update(_npz_poison_info(p) or {})
    name = p.name + (" (poisoned)" if "poison_count" in info else "")
    return TrainSet(np.asarray(ds.images), ds.labels, ds.class_names, name, info)


def _dataset_train_set(name: str, data_dir: str | None, split: str, quiet: bool) -> TrainSet:
    ds = open_dataset(name, data_dir, split, quiet=quiet)
    info = {"kind": "dataset", "dataset": ds.name, "split": ds.split, "source": ds.source}
    if ds.name == "npz":
        info.update(_npz_poison_info(ds.source) or {})
    row = f"{ds.name}/{ds.split} (no defense)"
    return TrainSet(np.asarray(ds.images), ds.labels, ds.class_names, row, info)


def load_train_set(source: TrainSource, *, quiet: bool = False) -> TrainSet:
    """The training set ``source`` names, with what is known about it (`TrainSet.info`)."""
    if source.kind == "purified" and source.path is not None:
        return _purified_train_set(source.path)
    if source.kind == "npz" and source.path is not None:
        return _npz_train_set(source.path, quiet)
    if source.kind == "dataset" and source.dataset is not None:
        return _dataset_train_set(source.dataset, source.path, source.split, quiet)
    raise ValueError(f"incomplete training set source {source}")


@dataclass
class RunData:
    """The arrays an experiment trains and tests on (limits applied), and where they came from."""

    train: TrainSet
    test: Dataset
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seconds: float  # reading both sets


def load_data(exp: Experiment, *, quiet: bool = False) -> RunData:
    """Step 1: the training set (`load_train_set`) and the test set, cut to their limits."""
    t0 = time.perf_counter()
    train = load_train_set(exp.train, quiet=quiet)
    t = exp.test
    test = open_dataset(t.dataset, t.data_dir, t.split, quiet=quiet)
    secs = time.perf_counter() - t0
    x_train, y_train = train.images, np.asarray(train.labels, np.int64)
    if exp.limit_train is not None:
        x_train, y_train = x_train[: exp.limit_train], y_train[: exp.limit_train]
    n_test = len(test) if t.limit is None else min(len(test), t.limit)
    x_test, y_test = test.images[:n_test], np.asarray(test.labels[:n_test], np.int64)
    return RunData(train, test, x_train, y_train, x_test, y_test, secs)


def check_task(data: RunData, exp: Experiment, note: Note | None = None) -> None:
    """Step 2: train and test must describe the same task (image size, number of classes)."""
    src, test_name = exp.train.flag, exp.test.dataset
    x_train, x_test = data.x_train, data.x_test
    if tuple(x_train.shape[1:]) != tuple(x_test.shape[1:]):
        raise UsageError(
            f"{src} images are {x_train.shape[2]}x{x_train.shape[1]} but --test-dataset "
            f"{test_name} images are {x_test.shape[2]}x{x_test.shape[1]}: they must match"
        )
    k_train, k_test = len(data.train.class_names), len(data.test.class_names)
    if k_train != k_test:
        raise UsageError(
            f"{src} has {k_train} classes but --test-dataset {test_name} has {k_test}; "
            f"train and test must have the same classes"
        )
    if list(data.train.class_names) != list(data.test.class_names) and note is not None:
        note(
            "class names differ between the training and the test set (labels are matched by index)"
        )


def load_attack(
    attack: Attack | None, data: RunData, note: Note | None = None
) -> np.ndarray | None:
    """Step 3: the trigger, checked against the test images and the number of classes."""
    if attack is None:
        return None
    k = len(data.test.class_names)
    if attack.target_class >= k:
        raise UsageError(
            f"--target-class {attack.target_class}: the data sets have {k} classes (0..{k - 1})"
        )
    trigger = load_trigger(attack.trigger, tuple(data.x_test.shape[1:3]))
    recorded = data.train.info.get("poison_target_class")
    if recorded is not None and recorded != attack.target_class and note is not None:
        note(
            f"the training set was poisoned for class {recorded}, "
            f"but --target-class is {attack.target_class}"
        )
    return trigger


def build_record(
    exp: Experiment,
    data: RunData,
    trigger: np.ndarray | None,
    clf: Classifier,
    metrics: dict,
    eval_seconds: float,
) -> dict[str, Any]:
    """The result as ``eval run --json`` writes it and ``eval table`` reads it."""
    a = exp.attack
    attack = None
    if a is not None and trigger is not None:
        attack = {
            "trigger": str(Path(a.trigger).absolute()),
            "trigger_shape": list(trigger.shape),
            "target_class": a.target_class,
            "scales": [float(s) for s in a.scales],
            "quantize": a.quantize,
        }
    return {
        "format": "puregen-fast-eval",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": exp.name or data.train.name,
        "train": {
            **data.train.info,
            "num_images": int(len(data.y_train)),
            "image_shape": [int(v) for v in data.x_train.shape[1:]],
            "class_names": list(data.train.class_names),
        },
        "test": {**data.test.describe(), "num_images_used": int(len(data.y_test))},
        "attack": attack,
        "classifier": clf.config,
        "metrics": metrics,
        "history": clf.history,
        "device": describe_device(clf.device),
        "timings": {
            "data_s": round(data.seconds, 4),
            "train_s": round(clf.train_seconds, 4),
            "train_images_per_s": round(clf.train_images_per_s, 2),
            "eval_s": round(eval_seconds, 4),
        },
        "versions": {"puregen_fast": __version__, "torch": torch.__version__},
    }


@dataclass
class Outcome:
    """What `run_experiment` returns: the record (`build_record`) and the trained classifier."""

    record: dict[str, Any]
    classifier: Classifier


def run_experiment(
    exp: Experiment,
    device: torch.device,
    *,
    quiet: bool = False,
    note: Note | None = None,
) -> Outcome:
    """Train on ``exp.train``, measure on ``exp.test``: the steps of the module doc in order."""
    data = load_data(exp, quiet=quiet)
    check_task(data, exp, note)
    trigger = load_attack(exp.attack, data, note)
    k = len(data.train.class_names)
    clf = train_classifier(
        data.x_train, data.y_train, k, exp.classifier, device=device, quiet=quiet
    )
    a = exp.attack
    t1 = time.perf_counter()
    metrics = evaluate_predictions(
        clf.predict,
        data.x_test,
        data.y_test,
        trigger=trigger,
        target_class=None if a is None else a.target_class,
        scales=(1.0,) if a is None else a.scales,
        quantize="trunc" if a is None else a.quantize,
    )
    from puregen_fast.eval.classifier import fit_accuracy

    # the net on its own (unaugmented) training images: under 90% it is undertrained
    metrics["fit_acc"] = fit_accuracy(clf, data.x_train, data.y_train)
    record = build_record(exp, data, trigger, clf, metrics, time.perf_counter() - t1)
    return Outcome(record, clf)


# ----------------------------------------------------------------------------- results


def save_result(path: str | os.PathLike[str], record: dict) -> None:
    """Write a result record as JSON (keys in record order), atomically."""
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(p, record, sort_keys=False)
    except OSError as e:
        raise UsageError(f"--json {p}: cannot write ({e})") from e


def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict]:
    """Result records written by `save_result`; UsageError naming a file that is not one."""
    results = []
    for f in paths:
        try:
            r = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{f}: not a readable JSON file ({e})") from e
        if not isinstance(r, dict) or "metrics" not in r:
            raise UsageError(f"{f}: not an `eval run --json` result (no 'metrics')")
        results.append(r)
    return results


# ----------------------------------------------------------------------------- poisoning


def poison_to_npz(
    dataset: str,
    data_dir: str | None,
    split: str,
    trigger: str,
    target_class: int,
    count: int | None,
    out: str | os.PathLike[str],
    *,
    last_n: bool = True,
    seed: int = 0,
    quantize: str = "trunc",
    quiet: bool = False,
) -> tuple[PoisonedSet, Dataset]:
    """Poison ``count`` images of ``target_class`` of a data set with the trigger at path
    ``trigger`` (`puregen_fast.eval.poison`) and write the set to ``out`` (.npz)."""
    ds = open_dataset(dataset, data_dir, split, quiet=quiet)
    k = len(ds.class_names)
    if target_class >= k:
        raise UsageError(f"--target-class {target_class}: {ds.name} has {k} classes (0..{k - 1})")
    trig = load_trigger(trigger, tuple(ds.images.shape[1:3]))
    ps = poison_dataset(
        ds.images,
        ds.labels,
        trig,
        target_class,
        count,
        class_names=list(ds.class_names),
        last_n=last_n,
        seed=seed,
        quantize=quantize,
    )
    save_poisoned_npz(ps, out)
    return ps, ds
