"""The paper's evaluation of a defense, end to end: natural accuracy and poison success of a
classifier trained on the, possibly purified, training set (the metrics:
`puregen_fast.eval.metrics`).

The typical experiment: ``poison_to_npz`` (``eval poison``) writes a Narcissus-poisoned copy of a
training set as ``.npz``; ``puregen-fast purify --dataset npz --data-dir POISONED.npz ...``
purifies it; ``run_experiment`` (``eval run --train PURIFIED_DIR``) trains a classifier on the
result and measures it on the clean test set. Its steps, each usable alone: `load_data` (the
training set, purified output included, and the test set), `check_task`, `load_attack`,
`train_classifier`, `evaluate_predictions`, `build_record`.

``run_protocol`` (``eval experiment``) runs the whole protocol in one go, for several defenses,
classifiers, seeds and target classes, resumable cell by cell (see its section below).

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
from puregen_fast.eval.metrics import evaluate_predictions, image_change, mean_image_change
from puregen_fast.eval.poison import PoisonedSet, load_trigger, poison_dataset, save_poisoned_npz
from puregen_fast.runtime import describe_device
from puregen_fast.version import __version__

__all__ = [
    "DEFENSES",
    "ClassifierSpec",
    "Protocol",
    "check_protocol",
    "parse_classifier_spec",
    "run_protocol",
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
    count: int,
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


# ----------------------------------------------------------------------------- the protocol
#
# `eval experiment`: the paper's protocol in one run. Poison the training set (any attack) ->
# purify it with each defense through the engine and the shard writer (`purify_dataset`, so an
# interrupted purification resumes) -> train each classifier with each seed -> the table.
#
# The output folder is content-addressed: the poisoned set lives under a digest of the attack
# settings and the training data, each purified copy under a digest of that plus the defense
# settings (model sha256s included), and each cell's result under a digest of everything that
# decides it. A rerun (after Ctrl-C, a crash, or with more seeds, defenses or classifiers) reuses
# every finished piece whose settings are unchanged and computes only the rest.

DEFENSES = ("none", "jpeg", "ebm", "ddpm", "ebm+ddpm", "reps", "filt")
EXPERIMENT_FORMAT = "puregen-fast-experiment"
_CELL_FORMAT = "puregen-fast-experiment-cell"
# classifier options a --classifier spec may set (TrainConfig fields), with their parsers
_SPEC_KEYS: dict[str, Callable[[str], Any]] = {
    "epochs": float,
    "steps": int,
    "batch_size": int,
    "lr": float,
    "widths": lambda v: tuple(int(w) for w in v.replace("x", "/").split("/") if w),
    "crop_pad": int,
    "flip": lambda v: {"1": True, "true": True, "on": True, "0": False, "false": False,
                       "off": False}[v.lower()],  # fmt: skip
    "tta": str,
    "whiten_eps": float,
    "momentum": float,
    "weight_decay": float,
    "label_smoothing": float,
    "schedule": str,
    "warmup_frac": float,
}


@dataclass(frozen=True)
class ClassifierSpec:
    """One victim of the protocol: ``arch`` (`ARCHS`) with ``options`` (TrainConfig fields set
    over the preset's defaults), shown in the table as ``name``."""

    arch: str
    options: tuple[tuple[str, Any], ...] = ()
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.arch

    def config(self, seed: int) -> TrainConfig:
        from puregen_fast.eval.classifier import default_config

        return default_config(self.arch, seed=seed, **dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        opts = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return {"arch": self.arch, "options": opts, "name": self.label}


def parse_classifier_spec(text: str) -> ClassifierSpec:
    """``ARCH[:KEY=VALUE,...]``, e.g. ``airbench:widths=32/64/64,steps=300`` or
    ``resnet18:widths=16,batch_size=64,flip=off``; ``name=...`` sets the table label.
    UsageError naming ``--classifier`` for an unknown architecture, key or value."""
    from puregen_fast.eval.classifier import ARCHS

    arch, _, rest = text.strip().partition(":")
    if arch not in ARCHS:
        raise UsageError(f"--classifier {text!r}: unknown architecture {arch!r}; "
                         f"choose one of {', '.join(ARCHS)}")  # fmt: skip
    opts: dict[str, Any] = {}
    name = ""
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise UsageError(f"--classifier {text!r}: {item!r} is not KEY=VALUE")
        if key == "name":
            name = val.strip()
            continue
        if key not in _SPEC_KEYS:
            raise UsageError(f"--classifier {text!r}: unknown option {key!r}; choose from "
                             f"{', '.join(['name', *_SPEC_KEYS])}")  # fmt: skip
        try:
            opts[key] = _SPEC_KEYS[key](val.strip())
        except (ValueError, KeyError):
            raise UsageError(f"--classifier {text!r}: bad value {val!r} for {key}") from None
    if arch == "airbench" and "widths" in opts and len(opts["widths"]) != 3:
        raise UsageError(f"--classifier {text!r}: airbench takes three widths, e.g. 32/64/64")
    if arch == "resnet18" and "widths" in opts and len(opts["widths"]) != 1:
        raise UsageError(f"--classifier {text!r}: resnet18 takes one base width, e.g. 16")
    return ClassifierSpec(arch, tuple(sorted(opts.items())), name)


@dataclass(frozen=True)
class Protocol:
    """Everything `run_protocol` does.

    ``attack``: ``narcissus`` (a trigger from ``trigger``, an .npy file or a folder of
    ``best_noise_lab<k>.npy``, or else the authors' published ones from ``poisons``),
    ``gradient-matching`` or ``bullseye-polytope`` (the authors' poisons from ``poisons``;
    ``targets`` are then their trial numbers). ``purify``: the engine's settings for every
    defense (``ebm``/``ddpm`` sources, steps, ``jpeg_quality``, ``seed``, ``batch_size``, ...).
    """

    dataset: str
    data_dir: str | None
    test: EvalSet
    attack: str
    targets: tuple[int, ...]
    defenses: tuple[str, ...]
    classifiers: tuple[ClassifierSpec, ...]
    seeds: tuple[int, ...]
    split: str = "train"
    trigger: str | None = None
    poisons: str | None = None
    poisons_dataset: str | None = None
    count: int = 500
    last_n: bool = True
    quantize: str = "trunc"
    scales: tuple[float, ...] = (1.0, 3.0)
    purify: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["test"] = {k: getattr(self.test, k) for k in self.test.__dataclass_fields__}
        d["classifiers"] = [c.to_dict() for c in self.classifiers]
        d["purify"] = dict(self.purify)
        for k in ("targets", "defenses", "seeds", "scales"):
            d[k] = list(d[k])
        return d


def _digest(obj: Any, n: int = 12) -> str:
    import hashlib

    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _array_digest(x: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    x = np.asarray(x)
    h.update(repr((x.dtype.str, x.shape)).encode())
    for s in range(0, len(x), 4096):
        h.update(np.ascontiguousarray(x[s : s + 4096]).tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def check_protocol(p: Protocol) -> None:
    """UsageError (naming the flag) for settings that cannot run, before anything is read."""
    from puregen_fast.eval.classifier import ARCHS

    attacks = ("narcissus", "gradient-matching", "bullseye-polytope")
    if p.attack not in attacks:
        raise UsageError(f"--attack {p.attack!r}: choose one of {', '.join(attacks)}")
    if not p.targets:
        raise UsageError("--target-class: give at least one target class")
    if len(set(p.targets)) != len(p.targets) or min(p.targets) < 0:
        raise UsageError(f"--target-class {list(p.targets)}: distinct classes >= 0 expected")
    bad = [d for d in p.defenses if d not in DEFENSES]
    if bad or not p.defenses:
        raise UsageError(f"--defenses {','.join(p.defenses)}: unknown {', '.join(bad) or '(none)'}"
                         f"; choose from {','.join(DEFENSES)}")  # fmt: skip
    if len(set(p.defenses)) != len(p.defenses):
        raise UsageError(f"--defenses {','.join(p.defenses)}: a defense is listed twice")
    if not p.classifiers or any(c.arch not in ARCHS for c in p.classifiers):
        raise UsageError(f"--classifier: give one or more of {', '.join(ARCHS)}")
    labels = [c.label for c in p.classifiers]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--classifier: two classifiers share the name {labels}; add name=...")
    if not p.seeds or len(set(p.seeds)) != len(p.seeds):
        raise UsageError(f"--seeds {list(p.seeds)}: distinct seeds expected")
    if p.attack == "narcissus" and p.trigger is None and p.poisons is None:
        raise UsageError(
            "--attack narcissus needs --trigger FILE|DIR (e.g. from `eval trigger --method "
            "narcissus`) or --poisons SRC (the authors' triggers)"
        )
    if p.attack != "narcissus" and p.trigger is not None:
        raise UsageError(f"--trigger applies to --attack narcissus, not {p.attack}")
    if p.attack != "narcissus" and p.poisons is None:
        raise UsageError(f"--attack {p.attack} needs --poisons SRC (the authors' poisons: a "
                         f"folder or hf:SunayBhat1/puregen-poisons)")  # fmt: skip


Log = Callable[[str], None]


def _trigger_file(p: Protocol, target: int) -> Path:
    t = Path(p.trigger or "").expanduser()
    if t.is_dir():
        f = t / f"best_noise_lab{target}.npy"
        if not f.is_file():
            raise UsageError(f"--trigger {t}: no best_noise_lab{target}.npy for target class "
                             f"{target} in the folder")  # fmt: skip
        return f
    if not t.is_file():
        raise UsageError(f"--trigger {t}: no such file or folder")
    if len(p.targets) > 1:
        raise UsageError(f"--trigger {t}: one file for {len(p.targets)} target classes; give a "
                         f"folder of best_noise_lab<k>.npy, one per class")  # fmt: skip
    return t


def _poison(p: Protocol, train: Dataset, target: int, out: Path, log: Log) -> Path:
    """The poisoned training set for ``target`` as .npz (made once: its name is a digest of
    the attack settings, the trigger's bytes and the training images)."""
    from puregen_fast.data.io import file_digest

    key: dict[str, Any] = {
        "attack": p.attack, "target": target, "count": p.count, "last_n": p.last_n,
        "quantize": p.quantize, "train": train.describe(), "poisons": p.poisons,
        "poisons_dataset": p.poisons_dataset,
        "images": _array_digest(train.images),
    }  # fmt: skip
    trig_path = None
    if p.attack == "narcissus" and p.trigger is not None:
        trig_path = _trigger_file(p, target)
        key["trigger_sha256"] = file_digest(trig_path)
    folder = out / f"poison-{_slug(p.attack)}-{target}-{_digest(key)}"
    path = folder / "poisoned.npz"
    if path.is_file():
        return path
    if trig_path is not None:
        ps = poison_dataset(
            train.images, train.labels, load_trigger(trig_path, tuple(train.images.shape[1:3])),
            target, p.count, class_names=list(train.class_names), last_n=p.last_n,
            quantize=p.quantize,
        )  # fmt: skip
    else:
        from puregen_fast.eval.poisons import PoisonSpec, poison_with_published

        spec = PoisonSpec(p.attack, p.poisons_dataset or train.name, target)
        ps = poison_with_published(
            train.images, train.labels, list(train.class_names), spec, p.poisons,
            count=p.count, last_n=p.last_n, quantize=p.quantize,
        )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "attack.json", key)
    save_poisoned_npz(ps, path)
    log(f"poisoned {len(ps.poison_idx)} training images ({p.attack}, target {target}) -> {path}")
    return path


def _purifier(defense: str, pur: Mapping[str, Any], models: Mapping[str, Any], device):
    from puregen_fast.purifier import Purifier

    keys = ("ebm_steps", "ebm_eps", "ebm_temp", "ddpm_steps", "reps", "filter_frac",
            "jpeg_quality", "seed", "backend", "precision")  # fmt: skip
    kw = {k: pur[k] for k in keys if pur.get(k) is not None}
    ebm = models.get("ebm") if defense in ("ebm", "ebm+ddpm", "reps", "filt") else None
    ddpm = models.get("ddpm") if defense in ("ddpm", "ebm+ddpm", "reps") else None
    if defense == "filt" and pur.get("ddpm"):
        ddpm = models.get("ddpm")
    try:
        return Purifier(method=defense, ebm=ebm, ddpm=ddpm, device=device, **kw)
    except ValueError as e:
        raise UsageError(f"--defenses {defense}: {e}") from e


def _purifier_identity(purifier) -> dict:
    d = dict(purifier.describe())
    for k in ("backend_reason", "backend_requested", "conv_impl", "conv_impl_reason", "device"):
        d.pop(k, None)
    for k in ("ebm", "ddpm"):
        if isinstance(d.get(k), dict):
            d[k] = {kk: vv for kk, vv in d[k].items() if kk != "source"}
    return d


def _purify(
    poisoned: Path, defense: str, purifier, pur: Mapping[str, Any], quiet: bool, log: Log
) -> tuple[Path, dict]:
    """``poisoned`` through the engine and the shard writer into a folder next to it, named by
    a digest of the defense's settings; an unfinished folder is resumed, a finished one reused."""
    from puregen_fast.data.manifest import MANIFEST
    from puregen_fast.pipeline import purify_dataset

    ident = _purifier_identity(purifier)
    folder = poisoned.parent / f"{_slug(defense)}-{_digest(ident)}"
    if (folder / MANIFEST).is_file():
        return folder, ident
    ds = open_dataset("npz", poisoned, "train", quiet=True)
    t0 = time.perf_counter()
    purify_dataset(
        ds, purifier, folder, batch_size=min(int(pur.get("batch_size") or 64), len(ds)),
        resume=folder.exists(), quiet=quiet,
        extra_manifest={"command": {"eval_experiment": True, "defense": defense}},
    )  # fmt: skip
    log(f"purified {len(ds)} images with {defense} in {time.perf_counter() - t0:.1f}s -> {folder}")
    return folder, ident


def _attack_eval(poisoned: Path) -> dict[str, Any]:
    """What the metrics need, read back from the poisoned .npz: the trigger (Narcissus) or the
    target image and the poison class (Gradient Matching, Bullseye Polytope)."""
    with np.load(poisoned, allow_pickle=False) as z:
        out: dict[str, Any] = {"target_class": int(z["target_class"])}
        if "trigger" in z.files and z["trigger"].size:
            out["trigger"] = np.asarray(z["trigger"], np.float32)
        if "target_image" in z.files:
            out["target_image"] = np.asarray(z["target_image"], np.uint8).reshape(
                -1, *z["x"].shape[1:]
            )
    return out


def _cell_metrics(
    clf: Classifier, x_test: np.ndarray, y_test: np.ndarray, att: Mapping[str, Any],
    scales: Sequence[float], quantize: str,
) -> dict[str, Any]:  # fmt: skip
    if "trigger" in att:
        return evaluate_predictions(
            clf.predict, x_test, y_test, trigger=att["trigger"],
            target_class=att["target_class"], scales=scales, quantize=quantize,
        )  # fmt: skip
    m = evaluate_predictions(clf.predict, x_test, y_test)
    if "target_image" not in att:
        raise UsageError("the poison set names no target image (target.pickle), so the "
                         "target misclassification cannot be measured")  # fmt: skip
    pred = clf.predict(att["target_image"])
    m["target_misclassification"] = float(np.mean(pred == att["target_class"]))
    m["target_predictions"] = [int(v) for v in pred]
    return m


def _cell(
    key: dict[str, Any], cells_dir: Path, compute: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """A cell's record: reused from ``cells_dir`` when one with this key's digest is there,
    else computed and written atomically. Returns (record, reused)."""
    name = f"{_slug(key['defense'])}__{_slug(key['classifier']['name'])}__t{key['target']}"
    path = cells_dir / f"{name}__s{key['seed']}__{_digest(key)}.json"
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
            if rec.get("format") == _CELL_FORMAT and rec.get("key") == json.loads(
                json.dumps(key, default=str)
            ):
                return rec, True
        except (OSError, ValueError):
            pass  # a damaged record is computed again
    rec = {"format": _CELL_FORMAT, "key": key, **compute()}
    atomic_write_json(path, rec, sort_keys=False)
    return rec, False


def _train_cell(
    cfg: TrainConfig, x_tr: np.ndarray, y_tr: np.ndarray, k: int, x_test: np.ndarray,
    y_test: np.ndarray, att: Mapping[str, Any], p: Protocol, device: torch.device, quiet: bool,
) -> dict[str, Any]:  # fmt: skip
    """One cell: train, measure, check that the net fits its training set."""
    from puregen_fast.eval.classifier import fit_accuracy, undertrained_message

    clf = train_classifier(x_tr, y_tr, k, cfg, device=device, quiet=quiet)
    t1 = time.perf_counter()
    m = _cell_metrics(clf, x_test, y_test, att, p.scales, p.quantize)
    fit = fit_accuracy(clf, x_tr, y_tr)
    warn = undertrained_message(fit, clf)
    return {
        "metrics": m,
        "fit_acc": fit,
        "warnings": [warn] if warn else [],
        "classifier_config": clf.config,
        "device": describe_device(clf.device),
        "timings": {"train_s": round(clf.train_seconds, 3),
                    "eval_s": round(time.perf_counter() - t1, 3)},
    }  # fmt: skip


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def run_protocol(
    p: Protocol,
    out: str | os.PathLike[str],
    device: torch.device,
    *,
    quiet: bool = False,
    log: Log | None = None,
) -> dict[str, Any]:
    """Run the protocol (section comment above) into ``out``; returns the result (as written
    to ``results.json``: the plan, every cell and the summary) and writes ``table.md`` and
    ``chart.png`` beside it. ``log`` receives one line per finished step and cell."""
    from puregen_fast.eval.metrics import format_protocol_table, save_chart, summarize_cells
    from puregen_fast.models.checkpoints import DEFAULT_DDPM, DEFAULT_EBM, load_ddpm, load_ebm

    check_protocol(p)
    say: Log = log or (lambda s: None)
    root = Path(out).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / "cells").mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {root}: cannot create the folder ({e})") from e
    atomic_write_json(root / "plan.json", p.to_dict(), sort_keys=False)

    train = open_dataset(p.dataset, p.data_dir, p.split, quiet=quiet)
    t = p.test
    test = open_dataset(t.dataset, t.data_dir, t.split, quiet=quiet)
    n_test = len(test) if t.limit is None else min(len(test), t.limit)
    x_test, y_test = np.asarray(test.images[:n_test]), np.asarray(test.labels[:n_test], np.int64)
    if tuple(train.images.shape[1:]) != tuple(x_test.shape[1:]):
        raise UsageError(f"--dataset images are {train.images.shape[1:3]} but --test-dataset "
                         f"images are {x_test.shape[1:3]}: they must match")  # fmt: skip
    k = len(train.class_names)
    if len(test.class_names) != k:
        raise UsageError(f"--dataset has {k} classes but --test-dataset "
                         f"{len(test.class_names)}: they must be the same classes")  # fmt: skip
    if p.attack == "narcissus" and max(p.targets) >= k:
        raise UsageError(f"--target-class {max(p.targets)}: the data set has {k} classes "
                         f"(0..{k - 1})")  # fmt: skip
    test_key = {"describe": test.describe(), "n": n_test, "images": _array_digest(x_test)}

    # the models: as purify, the authors' published checkpoints unless --ebm/--ddpm is given
    pur = dict(p.purify)
    models: dict[str, Any] = {}
    if any(d in ("ebm", "ebm+ddpm", "reps", "filt") for d in p.defenses):
        models["ebm"] = load_ebm(pur.get("ebm") or DEFAULT_EBM)
    if any(d in ("ddpm", "ebm+ddpm", "reps") for d in p.defenses) or (
        "filt" in p.defenses and pur.get("ddpm")
    ):
        models["ddpm"] = load_ddpm(pur.get("ddpm") or DEFAULT_DDPM)

    total = len(p.targets) * len(p.defenses) * len(p.classifiers) * len(p.seeds)
    cells: list[dict[str, Any]] = []
    changes: dict[str, list[dict]] = {}  # defense -> image_change per target
    done = reused = 0
    t_start = time.perf_counter()
    for target in p.targets:
        poisoned = _poison(p, train, target, root, say)
        att = _attack_eval(poisoned)
        with np.load(poisoned, allow_pickle=False) as z:
            x_poisoned = z["x"]  # what each defense is measured against
        for defense in p.defenses:
            purifier = _purifier(defense, pur, models, device)
            folder, ident = _purify(poisoned, defense, purifier, pur, quiet, say)
            from puregen_fast.data.reader import load_purified

            data = load_purified(folder)
            x_tr, y_tr = np.asarray(data.images), np.asarray(data.labels, np.int64)
            ch = image_change(x_poisoned, x_tr)
            changes.setdefault(defense, []).append(ch)
            if defense != "none":
                psnr = "identical" if ch["psnr_db"] is None else f"PSNR {ch['psnr_db']:.1f} dB"
                say(f"{defense} changed the images by {ch['rms']:.2f} levels RMS ({psnr})")
            for spec in p.classifiers:
                for seed in p.seeds:
                    key = {
                        "defense": defense, "target": target, "seed": seed,
                        "classifier": spec.to_dict(), "attack": p.attack,
                        "poisoned": poisoned.parent.name, "purifier": ident,
                        "test": test_key, "scales": list(p.scales), "quantize": p.quantize,
                    }  # fmt: skip

                    def compute(spec=spec, seed=seed, x_tr=x_tr, y_tr=y_tr, att=att):
                        return _train_cell(spec.config(seed), x_tr, y_tr, k, x_test, y_test,
                                           att, p, device, quiet)  # fmt: skip

                    rec, was = _cell(key, root / "cells", compute)
                    cells.append(rec)
                    done += 1
                    reused += was
                    m = rec["metrics"]
                    ps = " ".join(
                        f"x{q['scale']:g} {_fmt_pct(q['poison_success'])}"
                        for q in m.get("poison", [])
                    )
                    if "target_misclassification" in m:
                        ps = f"target {_fmt_pct(m['target_misclassification'])}"
                    secs = rec["timings"]["train_s"]
                    say(f"[{done}/{total}] {defense} | {spec.label} | target {target} | seed "
                        f"{seed}: natural {_fmt_pct(m['natural_acc'])}, poison {ps}"
                        + (" (reused)" if was else f" ({secs:.0f}s)"))  # fmt: skip
                    for w in rec.get("warnings", []):
                        say(f"warning: {defense} | {spec.label} | seed {seed}: {w}")
    change = {d: mean_image_change(v) for d, v in changes.items()}
    summary = summarize_cells(cells, p.defenses, [c.label for c in p.classifiers], change)
    result = {
        "format": EXPERIMENT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": p.to_dict(),
        "summary": summary,
        "cells": cells,
        "device": describe_device(device),
        "seconds": round(time.perf_counter() - t_start, 2),
        "cells_reused": reused,
        "versions": {"puregen_fast": __version__, "torch": torch.__version__},
    }
    atomic_write_json(root / "results.json", result, sort_keys=False)
    table = format_protocol_table(summary, p.scales)
    from puregen_fast.data.io import atomic_write

    atomic_write(root / "table.md", table + "\n")
    save_chart(summary, root / "chart.png", title=_chart_title(p, train))
    return result


def _chart_title(p: Protocol, train: Dataset) -> str:
    src = Path(train.source).name if train.source else train.name
    return f"{p.attack} on {src}: {len(p.seeds)} seed(s), target(s) {list(p.targets)}"
